"""Decisions made before a run: how the memory budget is spent, what this machine measures, where a cold
expert is computed, and how fast a model will decode."""
