"""The consistency report: every figure for a trace in one dataclass, as JSON, as a table and as a plot.

Its LRU, LFU and Belady hit rates are SCH's companions, under SCH's rules (sch_simulator.py), as the metric
definitions give them; the table says so, and names `moe-offload simulate` for the engine's own cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from ...atomic_write import atomic_output
from ..trace_file import RoutingTrace
from .sch_simulator import HitRate, capacity_for_ratio, hit_rates
from .specialisation import (
    DomainSpecialisation,
    LoadBalance,
    VocabularySpecialisation,
    domain_specialisation,
    load_balance,
    vocabulary_specialisation,
)
from .srp import SrpResult, srp_from_histogram, srp_histograms

CACHE_POLICIES = ("lru", "lfu", "belady")  # the companion rates, under SCH's rules
RULES_NOTE = ("LRU, LFU and Belady follow SCH's rules (each sequence on its own, warm start, one lookup per token):",
              "they compare with SCH; the engine's own cache is replayed by `moe-offload simulate`")
NEEDS_EXTERNAL_TOOLS = {"pgf"}  # matplotlib lists it, but saving runs LaTeX


@dataclass(frozen=True)
class GroupFigures:
    """The figures of one group (the whole model or one layer); indices follow the report's m and rho."""

    srp: tuple[SrpResult, ...]  # [m]
    sch: tuple[tuple[HitRate, ...], ...]  # [m][rho]
    lru: tuple[HitRate, ...]  # [rho]; these three under SCH's rules
    lfu: tuple[HitRate, ...]
    belady: tuple[HitRate, ...]


@dataclass(frozen=True)
class ConsistencyReport:
    trace_summary: str
    m_labels: tuple[str, ...]  # segment lengths as the user wrote them
    ratio_labels: tuple[str, ...]  # cache ratios as the user wrote them
    model: GroupFigures
    layers: tuple[GroupFigures, ...] | None  # by position in the trace's layer axis
    moe_layers: tuple[int, ...]
    load_balance: LoadBalance
    domain: DomainSpecialisation | None
    vocabulary: VocabularySpecialisation | None


def _group(trace: RoutingTrace, hist, ms, ratios, layer: int | None) -> GroupFigures:
    caps = [capacity_for_ratio(trace, r, layer) for r in ratios]
    return GroupFigures(
        srp=tuple(srp_from_histogram(hist[i, : m + 1], m) for i, m in enumerate(ms)),
        sch=tuple(hit_rates(trace, "sch", caps, m=m, layer=layer) for m in ms),
        lru=hit_rates(trace, "lru", caps, layer=layer),
        lfu=hit_rates(trace, "lfu", caps, layer=layer),
        belady=hit_rates(trace, "belady", caps, layer=layer),
    )


def consistency_report(trace: RoutingTrace, segment_lengths: Sequence[int], cache_ratios: Sequence[str],
                       per_layer: bool = False, m_labels: Sequence[str] | None = None,
                       source: str | None = None) -> ConsistencyReport:
    """All figures of the report; cache ratios are decimal strings (or numbers) read exactly as fractions."""
    labels = tuple(m_labels) if m_labels is not None else tuple(str(int(m)) for m in segment_lengths)
    # A segment longer than every sequence has no window and a look-ahead over the whole sequence: its
    # figures are those of T + 1, computed without bins for lengths no sequence reaches.
    ms = [min(int(m), trace.num_tokens + 1) for m in segment_lengths]
    ratios = [Fraction(str(r)) for r in cache_ratios]
    hist = srp_histograms(trace, ms)  # [L, len(ms), max m + 1]
    layers = None
    if per_layer:
        layers = tuple(_group(trace, hist[lay], ms, ratios, lay) for lay in range(trace.num_layers))
    moe_layers = tuple(int(x) for x in trace.moe_layers)
    name = trace.model or source or "trace"
    summary = (f"{name}: {trace.num_sequences} sequences x {trace.num_tokens} tokens, {trace.num_layers} MoE layers "
               f"({_span(moe_layers)}), {trace.num_experts} experts, top-{trace.k}")
    return ConsistencyReport(
        trace_summary=summary,
        m_labels=labels,
        ratio_labels=tuple(str(r) for r in cache_ratios),
        model=_group(trace, hist.sum(axis=0), ms, ratios, None),
        layers=layers,
        moe_layers=moe_layers,
        load_balance=load_balance(trace, 16),
        domain=domain_specialisation(trace, 16),
        vocabulary=vocabulary_specialisation(trace, 20),
    )


def _span(layers: tuple[int, ...]) -> str:
    contiguous = layers == tuple(range(layers[0], layers[0] + len(layers)))
    return f"layers {layers[0]}..{layers[-1]}" if contiguous and len(layers) > 1 else f"layers {list(layers)}"


def _group_json(g: GroupFigures, mk: tuple[str, ...], rk: tuple[str, ...]) -> dict:
    return {
        "srp": {m: s.srp for m, s in zip(mk, g.srp)},
        "rho_hat": {m: s.rho_hat for m, s in zip(mk, g.srp)},
        "sch": {m: {r: h.hit_rate for r, h in zip(rk, row)} for m, row in zip(mk, g.sch)},
        **{p: {r: h.hit_rate for r, h in zip(rk, getattr(g, p))} for p in CACHE_POLICIES},
    }


def report_to_json(report: ConsistencyReport) -> dict:
    """{"model": {...}, "load_balance": {...}, "domain_specialisation": {...} | null,
    "vocabulary_specialisation": {...} | null, "layers": {"0": {...}, ...}} with m and rho keys exactly as the
    user wrote them."""
    out = {"model": _group_json(report.model, report.m_labels, report.ratio_labels),
           "load_balance": {"m": report.load_balance.m, "std": report.load_balance.std},
           "domain_specialisation": None if report.domain is None else
           {"m": report.domain.m, "domains": list(report.domain.domains), "score": report.domain.score},
           "vocabulary_specialisation": None if report.vocabulary is None else
           {"min_count": report.vocabulary.min_count, "score": report.vocabulary.score,
            "layers": [None if x != x else x for x in report.vocabulary.layer_scores]}}
    if report.layers is not None:
        out["layers"] = {str(i): _group_json(g, report.m_labels, report.ratio_labels)
                         for i, g in enumerate(report.layers)}
    return out


def _table(g: GroupFigures, report: ConsistencyReport, title: str) -> list[str]:
    w = 9
    lines = [title]
    lines.append("  segment length m".ljust(22) + "".join(m.rjust(w) for m in report.m_labels))
    # a segment longer than every sequence has no windows: there is no SRP to show, not an SRP of 0
    shown = lambda s, text: text if sum(s.histogram) else "n/a"  # noqa: E731
    lines.append("  SRP".ljust(22) + "".join(shown(s, f"{s.srp:.3f}").rjust(w) for s in g.srp))
    lines.append("  threshold j*".ljust(22) + "".join(shown(s, str(s.threshold)).rjust(w) for s in g.srp))
    lines.append("  rho_hat".ljust(22) + "".join(shown(s, f"{s.rho_hat:.2f}").rjust(w) for s in g.srp))
    lines.append("  cache ratio rho".ljust(22) + "".join(r.rjust(w) for r in report.ratio_labels))
    lines.append("  cache size C".ljust(22) + "".join(str(h.capacity).rjust(w) for h in g.lru))
    for m, row in zip(report.m_labels, g.sch):
        lines.append(f"  SCH hit rate m={m}".ljust(22) + "".join(f"{h.hit_rate:.3f}".rjust(w) for h in row))
    for p, label in zip(CACHE_POLICIES, ("LRU", "LFU", "Belady")):
        lines.append(f"  {label} hit rate".ljust(22) + "".join(f"{h.hit_rate:.3f}".rjust(w) for h in getattr(g, p)))
    return lines


def format_report(report: ConsistencyReport) -> str:
    """The human-readable table the `consistency` command prints."""
    lines = [f"Routing consistency of {report.trace_summary}", ""]
    lines += _table(report.model, report, "Model level (one group, one cache shared by all layers)")
    if report.layers is not None:
        for i, g in enumerate(report.layers):
            lines += [""] + _table(g, report, f"Layer {i} (model layer {report.moe_layers[i]})")
    lines.append("")
    lines.extend(RULES_NOTE)
    lines.append(f"Load balance: std of act_r over all experts (m=16, ddof 1) = {report.load_balance.std:.4f}")
    d = report.domain
    lines.append("Domain specialisation: " + (f"mean CV of act_r across {len(d.domains)} domains = {d.score:.3f}"
                                              if d else "n/a (needs domain labels, at least two)"))
    v = report.vocabulary
    lines.append("Vocabulary specialisation: " + (f"top-1 share of the main expert (token ids seen >= "
                                                  f"{v.min_count} times) = {v.score:.3f}" if v else
                                                  "n/a (needs token ids, some seen >= 20 times)"))
    return "\n".join(lines)


def plot_format(path: str | Path) -> str:
    """The image format of `path`, from its extension, as matplotlib names it; ValueError listing the choices.

    >>> plot_format("hit_rates.PNG")
    'png'
    """
    from matplotlib.backend_bases import FigureCanvasBase  # not pyplot: no backend is chosen here

    formats = set(FigureCanvasBase.get_supported_filetypes()) - NEEDS_EXTERNAL_TOOLS
    suffix = Path(path).suffix.lower().removeprefix(".")
    if suffix not in formats:
        raise ValueError(f"{path} does not end in an image format matplotlib writes; use one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    return suffix


def plot_report(report: ConsistencyReport, path: str | Path) -> None:
    """Model-level hit rate against cache ratio (SCH per m, LRU, LFU, Belady) and SRP against m, in the image
    format of the file name's extension; written atomically (a failed save leaves an earlier file as it was)."""
    image_format = plot_format(path)
    import matplotlib

    matplotlib.use("Agg")  # the one place a third-party registry is touched: no display needed
    import matplotlib.pyplot as plt

    rhos = [float(Fraction(r)) for r in report.ratio_labels]
    ms = [s.m for s in report.model.srp]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        for m, row in zip(report.m_labels, report.model.sch):
            left.plot(rhos, [h.hit_rate for h in row], marker="o", label=f"SCH m={m}")
        for p, label in zip(CACHE_POLICIES, ("LRU", "LFU", "Belady")):
            left.plot(rhos, [h.hit_rate for h in getattr(report.model, p)], marker="s", linestyle="--", label=label)
        left.set(xlabel="cache ratio rho (C / active experts per token)", ylabel="hit rate",
                 title="Cache hit rate (SCH's rules)")
        left.grid(alpha=0.3)
        left.legend(fontsize=8)
        right.plot(ms, [s.srp for s in report.model.srp], marker="o", label="model")
        if report.layers is not None:
            for i, g in enumerate(report.layers):
                right.plot(ms, [s.srp for s in g.srp], alpha=0.35, linewidth=0.8, label="layers" if i == 0 else None)
        if len(ms) > 1 and min(ms) > 0 and max(ms) / min(ms) >= 4:
            right.set_xscale("log", base=2)
        right.set(xlabel="segment length m", ylabel="SRP", title="Segment routing best performance")
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
        fig.suptitle(report.trace_summary, fontsize=9)
        fig.tight_layout()
        with atomic_output(path) as f:
            fig.savefig(f, format=image_format, dpi=110)
    finally:
        plt.close(fig)
