"""Analyses of the four papers (one module per method); added by later issues."""
