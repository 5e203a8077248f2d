"""`moe-offload consistency TRACE`: local routing consistency (SRP, SCH, LRU/LFU/Belady) of a routing trace."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from fractions import Fraction

from offload_engine.consistency import consistency_report, format_report, plot_report, report_to_json
from offload_engine.trace_file import load_trace


@dataclass(frozen=True)
class ConsistencyConfig:
    trace: str
    segment_lengths: tuple[str, ...]  # as written; parsed values below
    cache_ratios: tuple[str, ...]
    per_layer: bool
    as_json: bool
    plot: str | None
    num_experts: int | None


def _csv(kind: str, check):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(","))
        if not items or any(not x for x in items):
            raise argparse.ArgumentTypeError(f"{kind}: expected a comma-separated list, got {text!r}")
        for x in items:
            check(x)
        if len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(f"{kind}: {text!r} repeats a value")
        return items
    return parse


def _check_m(x: str) -> None:
    if not x.isdigit() or int(x) < 1:
        raise argparse.ArgumentTypeError(f"segment length {x!r} is not an integer >= 1")


def _check_ratio(x: str) -> None:
    try:
        value = Fraction(x)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"cache ratio {x!r} is not a number (write e.g. 0.5 or 2)") from None
    if value <= 0 or not math.isfinite(float(value)):
        raise argparse.ArgumentTypeError(f"cache ratio {x!r} must be > 0")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--num-experts {text!r} is not an integer >= 1")
    return int(text)


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help="routing consistency of a trace: SRP, SCH, LRU/LFU/Belady hit rates",
                              description=__doc__)
    p.add_argument("trace", metavar="TRACE", help="routing trace .npz (see offload_engine/trace_file.py)")
    p.add_argument("--segment-lengths", type=_csv("--segment-lengths", _check_m), default=("4", "16", "64", "256"),
                   help="segment lengths m for SRP and SCH (default 4,16,64,256)")
    p.add_argument("--cache-ratios", type=_csv("--cache-ratios", _check_ratio), default=("0.5", "1", "2", "3"),
                   help="cache sizes as C / active experts per token (default 0.5,1,2,3)")
    p.add_argument("--per-layer", action="store_true", help="also report every layer on its own")
    p.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--plot", metavar="OUT.png", default=None, help="draw hit rates and SRP to this PNG")
    p.add_argument("--num-experts", type=_positive_int, default=None,
                   help="routed experts per layer, for trace files that do not store num_experts")
    return p


def run(args: argparse.Namespace) -> int:
    cfg = ConsistencyConfig(trace=args.trace, segment_lengths=args.segment_lengths, cache_ratios=args.cache_ratios,
                            per_layer=args.per_layer, as_json=args.as_json, plot=args.plot,
                            num_experts=args.num_experts)
    trace = load_trace(cfg.trace, num_experts=cfg.num_experts)
    report = consistency_report(trace, [int(m) for m in cfg.segment_lengths], cfg.cache_ratios,
                                per_layer=cfg.per_layer, m_labels=cfg.segment_lengths, source=cfg.trace)
    print(json.dumps(report_to_json(report), indent=1) if cfg.as_json else format_report(report))
    if cfg.plot:
        plot_report(report, cfg.plot)
    return 0
