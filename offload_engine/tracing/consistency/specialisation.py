"""Load balance, domain specialisation and vocabulary specialisation (docs/routing-consistency.md).

act_r of one expert is its window-weighted activation frequency at segment length m: the activations it
gets summed over every m-token window, divided by m * (number of windows). Missing cells activate nothing;
padded tokens are outside every window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..trace_file import RoutingTrace


@dataclass(frozen=True, eq=False)
class LoadBalance:
    """Standard deviation (ddof 1) of act_r over all experts of all layers."""

    m: int
    std: float
    act_r: np.ndarray  # float64 [L, E]


@dataclass(frozen=True, eq=False)
class DomainSpecialisation:
    """Mean over experts of the coefficient of variation (std, ddof 0, / mean) of act_r across domains."""

    m: int
    domains: tuple[str, ...]
    score: float
    cv: np.ndarray  # float64 [L, E]; NaN where the expert is never active (left out of the mean)


@dataclass(frozen=True, eq=False)
class VocabularySpecialisation:
    """Top-1 routing: per token id seen >= min_count times, the share going to its most frequent expert;
    an expert's score is the mean share over the token ids assigned to it."""

    min_count: int
    score: float  # mean over every (layer, expert) with at least one token id assigned
    layer_scores: tuple[float, ...]  # per layer: mean over its experts with a token id (NaN if none)
    expert_scores: np.ndarray  # float64 [L, E], NaN where no token id is assigned


def expert_act_r(trace: RoutingTrace, m: int, sequences: np.ndarray | None = None) -> np.ndarray:
    """float64 [L, E]: act_r of every expert at segment length m over `sequences` (a bool mask, default all)."""
    ids = trace.expert_ids  # [N, T, L, k]
    lengths = trace.lengths()
    n_win = np.maximum(lengths - m + 1, 0)  # [N]
    if sequences is not None:
        n_win = np.where(sequences, n_win, 0)
    t = np.arange(trace.num_tokens)[None, :]  # [1, T]
    # windows [s, s + m) with 0 <= s < n_win that contain token t
    cover = np.minimum(t, n_win[:, None] - 1) - np.maximum(0, t - m + 1) + 1  # [N, T]
    cover = np.where(n_win[:, None] > 0, np.maximum(cover, 0), 0)
    weight = np.broadcast_to(cover[:, :, None, None], ids.shape)
    valid = ids >= 0
    flat = (np.arange(trace.num_layers)[None, None, :, None] * trace.num_experts + ids)[valid]
    acts = np.bincount(flat, weights=weight[valid], minlength=trace.num_layers * trace.num_experts)
    denom = m * int(n_win.sum())
    return (acts / denom if denom else acts * 0.0).reshape(trace.num_layers, trace.num_experts)


def load_balance(trace: RoutingTrace, m: int = 16) -> LoadBalance:
    """Spread of expert usage: std (ddof 1) of act_r over all L * E experts."""
    act = expert_act_r(trace, m)
    return LoadBalance(m=m, std=float(np.std(act, ddof=1)) if act.size > 1 else 0.0, act_r=act)


def domain_specialisation(trace: RoutingTrace, m: int = 16) -> DomainSpecialisation | None:
    """None unless the trace carries domain labels with at least two distinct domains."""
    if trace.domains is None or len(set(trace.domains)) < 2:
        return None
    names = tuple(sorted(set(trace.domains)))
    labels = np.array(trace.domains)
    per_domain = np.stack([expert_act_r(trace, m, labels == d) for d in names])  # [D, L, E]
    mean = per_domain.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cv = np.where(mean > 0, per_domain.std(axis=0) / mean, np.nan)
    score = float(np.nanmean(cv)) if np.isfinite(cv).any() else 0.0
    return DomainSpecialisation(m=m, domains=names, score=score, cv=cv)


def vocabulary_specialisation(trace: RoutingTrace, min_count: int = 20) -> VocabularySpecialisation | None:
    """None unless the trace has token ids and some token id occurs >= min_count times in some layer."""
    if trace.token_ids is None:
        return None
    lengths = trace.lengths()
    inside = np.arange(trace.num_tokens)[None, :] < lengths[:, None]  # [N, T]
    scores = np.full((trace.num_layers, trace.num_experts), np.nan)
    for lay in range(trace.num_layers):
        top1 = trace.expert_ids[:, :, lay, 0]
        ok = inside & (trace.token_ids >= 0) & (top1 >= 0)
        tok, exp = trace.token_ids[ok].astype(np.int64), top1[ok].astype(np.int64)
        uniq, inv = np.unique(tok, return_inverse=True)
        counts = np.zeros((uniq.size, trace.num_experts), np.int64)  # [token ids, E]
        np.add.at(counts, (inv, exp), 1)
        total = counts.sum(axis=1)
        keep = total >= min_count
        best = counts[keep].argmax(axis=1)  # ties: smallest expert id
        share = counts[keep].max(axis=1) / total[keep]
        for e in np.unique(best):
            scores[lay, e] = share[best == e].mean()
    if not np.isfinite(scores).any():
        return None
    with np.errstate(invalid="ignore"):
        layer_scores = tuple(float(np.nanmean(row)) if np.isfinite(row).any() else float("nan") for row in scores)
    return VocabularySpecialisation(min_count=min_count, score=float(np.nanmean(scores)),
                                    layer_scores=layer_scores, expert_scores=scores)
