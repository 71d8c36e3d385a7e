"""Geva et al. 2023, "Dissecting recall of factual associations in auto-regressive language
models" (``methods.md`` G1-G7).
"""
