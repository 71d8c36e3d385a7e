"""Methods in general use across the papers: causal tracing (Meng et al. 2022, as Yan & Jia 2025
use it) and the logit lens (nostalgebraist 2020).
"""
