"""The history predictor's cost per token at real models' sizes (what the engine pays with --predictor history).

Each decode layer call observes the call's routing and predicts the engine's horizon (the next 3 layers and
the layer's own next call). Random routing of the given sizes, one sequence, after a few warm-up tokens; the
model itself is not needed: the predictor sees only expert ids.

    python benchmarks/bench_history_scale.py [--sizes "6x32x4,48x128x8,58x256x8"] [--tokens 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def per_token_s(layers: int, experts: int, top_k: int, tokens: int) -> float:
    from offload_engine.foresight.predictors.base import LayerContext, Paths
    from offload_engine.foresight.predictors.history import HistoryPredictor

    predictor = HistoryPredictor(layers, experts, top_k)
    paths = Paths.empty(1, layers, top_k)
    rng = np.random.default_rng(0)

    def token() -> None:
        for layer in range(layers):
            ids = rng.choice(experts, top_k, replace=False)[None].astype(np.int64)
            paths.observe(layer, ids)
            ctx = LayerContext(layer, ids, None, paths)
            predictor.observe(ctx)
            predictor.predict(ctx, layers, top_k)

    for _ in range(3):  # compile, and fill the tables a little
        token()
    start = time.perf_counter()
    for _ in range(tokens):
        token()
    return (time.perf_counter() - start) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="6x32x4,48x128x8,58x256x8",
                        help="MoE layers x experts x top-k, comma-separated (the bundled model, Qwen3-30B-A3B, "
                             "DeepSeek-V3)")
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()
    print("history predictor, observe + predict at every layer call")
    for size in args.sizes.split(","):
        layers, experts, top_k = (int(x) for x in size.split("x"))
        t = per_token_s(layers, experts, top_k, args.tokens)
        print(f"  {layers:3d} layers x {experts:4d} experts, top-{top_k}: {1e3 * t:8.2f} ms a token "
              f"({1e6 * t / layers:7.0f} us a layer call)")


if __name__ == "__main__":
    main()
