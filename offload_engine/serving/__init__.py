"""Serving: the engine thread behind `OffloadEngine.submit` (scheduler.py, handle.py) and the OpenAI-compatible
HTTP server of `moe-offload serve` (openai_api.py, app.py)."""
