"""Synthetic tasks that test long-range memory (sorting by frequency, ...)."""
