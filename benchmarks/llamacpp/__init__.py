"""The llama.cpp baseline: build it (setup.sh), convert our checkpoints to GGUF (convert.py), time its decode
(bench.py).

Run from the repository root as modules, e.g. `python -m benchmarks.llamacpp.bench`; README.md beside this file.
"""
