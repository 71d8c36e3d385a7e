"""Lv et al. 2024, "Interpreting key mechanisms of factual recall in transformer-based language
models" (``methods.md`` L1-L7).
"""
