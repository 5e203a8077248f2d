"""The `moe-offload` command line; installed as `offload_engine.cli`."""
