"""Speed of the consistency metrics on a Qwen3-30B-A3B-shaped synthetic trace (issue 3, part 5).

Trace: 64 sequences x 512 tokens, 48 MoE layers, 128 experts, top-8, sticky routing (each expert of the
previous token is kept with probability --stickiness, the rest drawn from a skewed per-layer popularity).
Work timed: model-level and per-layer SRP at m = 4, 16, 64, 256, and SCH (at every m), LRU and Belady at
rho = 1, 2, 3, model level and per layer. Then the plain-Python twins on a subset, extrapolated linearly
in sequences (and, for per-layer figures, in layers) to the same work; the report says what was run.

    python benchmarks/bench_consistency.py
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from offload_engine.tracing.consistency import (capacity_for_ratio, hit_rate, hit_rates, srp_from_histogram,
                                                srp_histograms)
from offload_engine.tracing.consistency.reference import ref_hits, ref_srp
from offload_engine.tracing.trace_file import RoutingTrace

MS = (4, 16, 64, 256)
RATIOS = ("1", "2", "3")


@numba.njit(cache=False)
def _sticky_ids(n_seq, n_tok, n_lay, n_exp, k, stickiness, seed):  # pragma: no cover - compiled
    np.random.seed(seed)
    ids = np.empty((n_seq, n_tok, n_lay, k), np.int16)
    taken = np.zeros(n_exp, np.bool_)
    for lay in range(n_lay):
        weights = np.random.random(n_exp) ** 3 + 0.02  # skewed popularity, different per layer
        cdf = np.cumsum(weights)
        cdf /= cdf[-1]
        for n in range(n_seq):
            for t in range(n_tok):
                taken[:] = False
                filled = 0
                if t > 0:
                    for j in range(k):
                        e = ids[n, t - 1, lay, j]
                        if np.random.random() < stickiness:
                            ids[n, t, lay, filled] = e
                            taken[e] = True
                            filled += 1
                while filled < k:
                    e = np.searchsorted(cdf, np.random.random())
                    if e < n_exp and not taken[e]:
                        ids[n, t, lay, filled] = e
                        taken[e] = True
                        filled += 1
    return ids


def sticky_trace(n_seq=64, n_tok=512, n_lay=48, n_exp=128, k=8, stickiness=0.6, seed=0) -> RoutingTrace:
    ids = _sticky_ids(n_seq, n_tok, n_lay, n_exp, k, stickiness, seed)
    return RoutingTrace(expert_ids=ids, num_experts=n_exp, moe_layers=np.arange(n_lay), model="synthetic-qwen3-30b-a3b")


def run_fast(trace: RoutingTrace) -> dict:
    times = {}
    t0 = time.perf_counter()
    hist = srp_histograms(trace, MS)
    model_srp = [srp_from_histogram(hist.sum(axis=0)[i, : m + 1], m) for i, m in enumerate(MS)]
    layer_srp = [[srp_from_histogram(hist[lay, i, : m + 1], m) for i, m in enumerate(MS)]
                 for lay in range(trace.num_layers)]
    times["srp (model + per layer, 4 m)"] = time.perf_counter() - t0
    figures = {"srp16": model_srp[1].srp, "rho_hat16": model_srp[1].rho_hat,
               "layer_srp16_mean": float(np.mean([s[1].srp for s in layer_srp]))}
    for scope, layers in (("model", [None]), ("per layer", list(range(trace.num_layers)))):
        for policy in ("sch", "lru", "belady"):
            t0 = time.perf_counter()
            for layer in layers:
                caps = [capacity_for_ratio(trace, r, layer) for r in RATIOS]
                for m in (MS if policy == "sch" else (None,)):
                    rates = hit_rates(trace, policy, caps, m=m, layer=layer)  # all sizes in one call
                    if layer is None and m in (None, 16):
                        figures.update({f"{policy} rho={r}": h.hit_rate for r, h in zip(RATIOS, rates)})
            times[f"{policy} ({scope}{', 4 m' if policy == 'sch' else ''}, 3 rho)"] = time.perf_counter() - t0
    return {"times": times, "figures": figures}


def run_twins(trace: RoutingTrace, n_sub: int, layers_sub: int) -> dict:
    """Twin seconds, extrapolated to the full work, for each timed family (same keys as run_fast)."""
    sub = RoutingTrace(expert_ids=trace.expert_ids[:n_sub], num_experts=trace.num_experts,
                       moe_layers=trace.moe_layers)
    scale_n = trace.num_sequences / n_sub
    scale_l = trace.num_layers / layers_sub
    est = {}
    t0 = time.perf_counter()
    for lay in range(layers_sub):
        for m in MS:
            ref_srp(sub, m, lay)
    per_layer = (time.perf_counter() - t0) * scale_n * scale_l
    # the model group has exactly the per-layer groups' (window, expert) pairs, each counted alike
    est["srp (model + per layer, 4 m)"] = 2 * per_layer
    for policy in ("sch", "lru", "belady"):
        t0 = time.perf_counter()
        for r in RATIOS:
            c = capacity_for_ratio(trace, r, None)
            for m in (MS if policy == "sch" else (None,)):
                ref_hits(sub, policy, c, m, None)
        est[f"{policy} (model{', 4 m' if policy == 'sch' else ''}, 3 rho)"] = (time.perf_counter() - t0) * scale_n
        t0 = time.perf_counter()
        for lay in range(layers_sub):
            for r in RATIOS:
                c = capacity_for_ratio(trace, r, lay)
                for m in (MS if policy == "sch" else (None,)):
                    ref_hits(sub, policy, c, m, lay)
        est[f"{policy} (per layer{', 4 m' if policy == 'sch' else ''}, 3 rho)"] = (
            (time.perf_counter() - t0) * scale_n * scale_l)
    return est


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--twin-sequences", type=int, default=1, help="sequences the plain-Python twins run on")
    p.add_argument("--twin-layers", type=int, default=2, help="layers the per-layer twins run on")
    p.add_argument("--skip-twins", action="store_true")
    args = p.parse_args()

    t0 = time.perf_counter()
    trace = sticky_trace()
    print(f"trace: {trace.expert_ids.shape} built in {time.perf_counter() - t0:.1f} s "
          f"(numba threads available: {numba.config.NUMBA_NUM_THREADS})")
    t0 = time.perf_counter()
    tiny = sticky_trace(2, 20, 2, 8, 2, 0.5, 1)
    srp_histograms(tiny, [2])
    hit_rate(tiny, "sch", 2, m=2)
    compile_s = time.perf_counter() - t0
    print(f"numba compile (one-off, a tiny trace): {compile_s:.1f} s")
    fast = run_fast(trace)
    total = sum(fast["times"].values())
    print("\nfast (numba), full trace:")
    for name, sec in fast["times"].items():
        print(f"  {name:<34} {sec:8.2f} s")
    print(f"  {'total':<34} {total:8.2f} s   (+ {compile_s:.1f} s compile = {total + compile_s:.2f} s)")
    print("\nmodel-level figures: " + ", ".join(f"{k} {v:.3f}" for k, v in fast["figures"].items()))
    if args.skip_twins:
        return
    twins = run_twins(trace, args.twin_sequences, args.twin_layers)
    print(f"\nplain-Python twins on {args.twin_sequences} sequence(s) (per-layer: {args.twin_layers} layers), "
          "extrapolated linearly to the full trace:")
    for name, sec in twins.items():
        print(f"  {name:<34} {sec:10.0f} s   speed-up x{sec / fast['times'][name]:,.0f}")
    twin_total = sum(twins.values())
    print(f"  {'total':<34} {twin_total:10.0f} s   speed-up x{twin_total / total:,.0f}")


if __name__ == "__main__":
    main()
