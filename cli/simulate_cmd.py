"""`moe-offload simulate TRACE`: replay a routing trace through the engine's own cache and eviction policies."""

from __future__ import annotations

import argparse
import json

from offload_engine.atomic_write import check_not_an_input
from offload_engine.errors import ConfigError

from .consistency_cmd import _csv, _num_experts, _plot_path
from .run_options import EXPERT_DTYPES, bounded_int

REPLAY_POLICIES = ("lru", "belady", "predictive")  # offload_engine.tracing.replay.REPLAY_POLICIES, without its imports
REPLAY_PREDICTORS = ("history", "none")


def _check_slots(text: str) -> None:
    bounded_int(1, 10**7)(text)


def _check_budget(text: str) -> None:
    from offload_engine.errors import MemoryBudgetError
    from offload_engine.planning.memory_plan import parse_bytes

    try:
        parse_bytes(text)
    except MemoryBudgetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _check_policy(text: str) -> None:
    if text not in REPLAY_POLICIES:
        raise argparse.ArgumentTypeError(f"unknown policy {text!r}; choose from {', '.join(REPLAY_POLICIES)}")


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help="replay a routing trace through the engine's cache: hits and misses per "
                                         "cache size and policy", description=__doc__)
    p.add_argument("trace", metavar="TRACE", help="routing trace .npz (see offload_engine/tracing/trace_file.py)")
    p.add_argument("--slots", type=_csv("--slots", _check_slots), default=("32", "64", "128"),
                   help="cache sizes in expert slots, shared by all layers (default 32,64,128)")
    p.add_argument("--memory-budget", type=_csv("--memory-budget", _check_budget), default=None, metavar="SIZE,...",
                   help="instead of --slots: memory budgets, each turned into the slots the memory plan of --model "
                        "gives (with --expert-dtype: in that format, so int4 holds about 3.6x the experts of bf16)")
    p.add_argument("--model", default=None, metavar="DIR|HUB_ID",
                   help="the model whose memory plan (the CPU's: on CUDA the allocator's rounding, and int8/int4's "
                        "expansion, take some more) turns --memory-budget into slots (default: the bundled model)")
    p.add_argument("--max-context", type=bounded_int(1, 1 << 30), default=None, metavar="N",
                   help="the context the memory plan of --memory-budget holds (default: the model's, at most 4096)")
    p.add_argument("--expert-dtype", choices=EXPERT_DTYPES, default="auto",
                   help="the experts' format for --memory-budget (default auto: as the checkpoint stores them)")
    p.add_argument("--policies", type=_csv("--policies", _check_policy), default=REPLAY_POLICIES,
                   help="lru, belady (clairvoyant) and/or predictive (default: all three)")
    p.add_argument("--predictor", choices=REPLAY_PREDICTORS, default="history",
                   help="what the predictive policy is told about the next layers: history (routing history, "
                        "learned as the replay goes) or none (its own usage counts only); default history")
    p.add_argument("--num-experts", type=_num_experts, default=None,
                   help="routed experts per layer, for trace files that do not store num_experts")
    p.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--plot", metavar="OUT.png", type=_plot_path, default=None,
                   help="draw hit rate against cache size for each policy (the extension picks the format)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (shown only when stderr is a terminal)")
    return p


def run(args: argparse.Namespace) -> int:
    from offload_engine.foresight.predictors import HistoryPredictor
    from offload_engine.tracing.replay import replay_all
    from offload_engine.tracing.trace_file import load_trace

    if args.plot:
        check_not_an_input(args.plot, "--plot", [("the trace", args.trace)])
    trace = load_trace(args.trace, num_experts=args.num_experts)
    budgets = _slots_for_budgets(args, trace) if args.memory_budget else {}
    slots = sorted(set(budgets.values())) if budgets else [int(c) for c in args.slots]
    too_few = [c for c in slots if c < trace.k]
    if too_few:
        raise ConfigError(f"--slots {too_few[0]} cannot hold one layer call's {trace.k} experts; use at least {trace.k}")
    factory = None
    if args.predictor == "history":
        factory = lambda: HistoryPredictor(trace.num_layers, trace.num_experts, trace.k)  # noqa: E731
    results = replay_all(trace, slots, list(args.policies), factory, use_predictor=args.predictor != "none",
                         progress=not args.quiet)
    if args.as_json:
        out = {str(c): {p: {"hits": r.hits, "misses": r.misses, "hit_rate": r.hit_rate}
                        for p, r in row.items()} for c, row in results.items()}
        if budgets:
            out["budgets"] = {b: {"slots": c, "expert_dtype": args.expert_dtype} for b, c in budgets.items()}
        print(json.dumps(out, indent=1))
    else:
        print(format_table(trace, results, args.trace))
        for budget, c in budgets.items():
            print(f"budget {budget} ({args.expert_dtype}): {c} slots")
    if args.plot:
        plot_replay(results, args.plot, f"{trace.model or args.trace}: {trace.num_sequences} sequences, "
                                        f"{trace.num_layers} MoE layers x {trace.num_experts} experts, top-{trace.k}")
    return 0


def _slots_for_budgets(args, trace) -> dict[str, int]:
    """Each budget's expert slots in the memory plan of --model, its experts held as --expert-dtype."""
    from dataclasses import replace

    import offload_engine
    from offload_engine.loading import inspect_checkpoint, make_plan
    from offload_engine.planning.memory_plan import parse_bytes
    from offload_engine.run_config import RunConfig

    model = args.model or offload_engine.DEFAULT_MODEL
    run = RunConfig.build(device="cpu", expert_dtype=args.expert_dtype, max_context=args.max_context, progress=False)
    inspected = inspect_checkpoint(model, run)  # once: only the budget differs between the plans
    if (inspected.spec.num_moe_layers, inspected.spec.num_experts) != (trace.num_layers, trace.num_experts):
        raise ConfigError(f"--model {model} has {inspected.spec.num_moe_layers} MoE layers of "
                          f"{inspected.spec.num_experts} experts, the trace {trace.num_layers} of "
                          f"{trace.num_experts}: pass the model the trace was recorded with")
    return {budget: make_plan(inspected, replace(run, memory_budget=parse_bytes(budget))).expert_slots
            for budget in args.memory_budget}


def format_table(trace, results, source: str) -> str:
    policies = list(next(iter(results.values())))
    total = trace.num_layers * trace.num_experts
    lines = [f"Replay of {trace.model or source}: {trace.num_sequences} sequences, {trace.num_layers} MoE layers x "
             f"{trace.num_experts} experts ({total} in all), top-{trace.k}; each token one decode step, one cache "
             "shared by all layers, cold start",
             "", f"  {'slots':>7}  {'rho':>5}  " + "  ".join(f"{p:>10}" for p in policies)]
    for c, row in results.items():
        rho = c / (trace.k * trace.num_layers)
        lines.append(f"  {c:>7}  {rho:>5.2f}  " + "  ".join(f"{row[p].hit_rate:>10.3f}" for p in policies))
    lines.append("")
    lines.append("hit rate = hits / (hits + misses); rho = slots / experts active per token (k x layers)")
    return "\n".join(lines)


def plot_replay(results, path: str, title: str) -> None:
    from offload_engine.atomic_write import atomic_output
    from offload_engine.tracing.consistency.report import plot_format

    image_format = plot_format(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    try:
        for policy in next(iter(results.values())):
            ax.plot(sizes, [results[c][policy].hit_rate for c in sizes], marker="o", label=policy)
        ax.set(xlabel="cache slots (shared by all layers)", ylabel="hit rate", title=title)
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_output(path) as f:
            fig.savefig(f, format=image_format, dpi=110)
    finally:
        plt.close(fig)
