"""`moe-offload consistency TRACE`: local routing consistency (SRP, SCH, LRU/LFU/Belady) of a routing trace.

LRU, LFU and Belady are SCH's companion hit rates, under SCH's rules; `moe-offload simulate` replays the
engine's own cache.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from fractions import Fraction

from offload_engine.atomic_write import check_not_an_input, check_output_path
from offload_engine.errors import ConfigError, OffloadEngineError, short_repr
from offload_engine.tracing.trace_file import MAX_EXPERTS

# numba and matplotlib are imported by run() and the --plot check only: `--help` stays quick.
RATIO = re.compile(r"[0-9]*\.?[0-9]+(?:[eE]([+-]?[0-9]+))?|[0-9]+/[0-9]+")  # a decimal or p/q, as Fraction reads


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
            raise argparse.ArgumentTypeError(f"{kind}: expected a comma-separated list, got {short_repr(text)}")
        for x in items:
            check(x)
        if len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(f"{kind}: {short_repr(text)} repeats a value")
        return items
    return parse


def _check_m(x: str) -> None:
    # 18 digits: any longer segment than a sequence gives the same figures (see consistency_report)
    if not re.fullmatch(r"[0-9]{1,18}", x) or int(x) < 1:
        raise argparse.ArgumentTypeError(f"segment length {short_repr(x)} is not a whole number from 1 to 10^18")


def _check_ratio(x: str) -> None:
    match = RATIO.fullmatch(x)
    if not match:
        raise argparse.ArgumentTypeError(f"cache ratio {short_repr(x)} is not a number (write e.g. 0.5 or 2)")
    if match.group(1) and len(match.group(1).lstrip("+-").lstrip("0")) > 2:  # 1e400: before Fraction builds 10**400
        raise argparse.ArgumentTypeError(f"cache ratio {short_repr(x)} is out of range (write e.g. 0.5 or 2)")
    try:
        value = Fraction(x)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"cache ratio {x!r} is not a number (write e.g. 0.5 or 2)") from None
    if not 0 < value <= MAX_EXPERTS:  # a ratio above E / k is refused once the trace is read (run)
        raise argparse.ArgumentTypeError(f"cache ratio {x!r} must be > 0 and at most E / k (experts per layer / "
                                         "experts per token)")


def _num_experts(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= MAX_EXPERTS:
        raise argparse.ArgumentTypeError(f"--num-experts {short_repr(text)} is not a whole number from 1 to "
                                         f"{MAX_EXPERTS}")
    return int(text)


def _plot_path(text: str) -> str:
    """Refuse a plot the run could not write, before the work: a folder, a missing folder, no image format."""
    from offload_engine.tracing.consistency.report import plot_format

    try:
        check_output_path(text)
        plot_format(text)
    except (OffloadEngineError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help="routing consistency of a trace: SRP, SCH, and LRU/LFU/Belady under "
                                         "SCH's rules",
                              description=__doc__)
    p.add_argument("trace", metavar="TRACE", help="routing trace .npz (see offload_engine/tracing/trace_file.py)")
    p.add_argument("--segment-lengths", type=_csv("--segment-lengths", _check_m), default=("4", "16", "64", "256"),
                   help="segment lengths m for SRP and SCH (default 4,16,64,256); a segment longer than every "
                        "sequence has no SRP (n/a)")
    p.add_argument("--cache-ratios", type=_csv("--cache-ratios", _check_ratio), default=("0.5", "1", "2", "3"),
                   help="cache sizes as C / active experts per token (default 0.5,1,2,3); at most E / k, where "
                        "every expert is cached: a larger ratio is refused")
    p.add_argument("--per-layer", action="store_true", help="also report every layer on its own")
    p.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--plot", metavar="OUT.png", type=_plot_path, default=None,
                   help="draw hit rates and SRP to this image (its extension picks the format: .png, .pdf, .svg...)")
    p.add_argument("--num-experts", type=_num_experts, default=None,
                   help="routed experts per layer, for trace files that do not store num_experts")
    return p


def check_ratios(ratios: tuple[str, ...], num_experts: int, k: int) -> None:
    """A cache larger than a group (C > E for a layer, C > L*E for the model) is the same cache as the whole
    group: refuse it rather than print a C the simulation never used."""
    for ratio in ratios:
        if Fraction(ratio) * k > num_experts:
            raise ConfigError(f"cache ratio {ratio} asks for {Fraction(ratio) * k} of a layer's {num_experts} "
                              f"experts; use a ratio of at most E / k = {num_experts}/{k} "
                              f"({num_experts / k:.4g}), which caches every expert")


def run(args: argparse.Namespace) -> int:
    from offload_engine.tracing.consistency import consistency_report, format_report, plot_report, report_to_json
    from offload_engine.tracing.trace_file import load_trace

    cfg = ConsistencyConfig(trace=args.trace, segment_lengths=args.segment_lengths, cache_ratios=args.cache_ratios,
                            per_layer=args.per_layer, as_json=args.as_json, plot=args.plot,
                            num_experts=args.num_experts)
    if cfg.plot:
        check_not_an_input(cfg.plot, "--plot", [("the trace", cfg.trace)])
    trace = load_trace(cfg.trace, num_experts=cfg.num_experts)
    check_ratios(cfg.cache_ratios, trace.num_experts, trace.k)
    report = consistency_report(trace, [int(m) for m in cfg.segment_lengths], cfg.cache_ratios,
                                per_layer=cfg.per_layer, m_labels=cfg.segment_lengths, source=cfg.trace)
    print(json.dumps(report_to_json(report), indent=1) if cfg.as_json else format_report(report))
    if cfg.plot:
        plot_report(report, cfg.plot)
    return 0
