"""Fact datasets and loaders; added by the datasets issue."""
