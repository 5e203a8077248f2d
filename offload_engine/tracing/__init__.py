"""Routing traces: recording them, their file format, replaying them through the engine's cache, and the
routing-consistency metrics computed on them.

Nothing is imported here, so that `python -m offload_engine.tracing.trace_file` finds no half-imported module.
"""
