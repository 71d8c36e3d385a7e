"""Yan & Jia 2025, one-to-many factual recall: promote, then suppress (``methods.md`` Y1-Y5)."""
