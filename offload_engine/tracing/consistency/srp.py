"""SRP (Segment Routing best Performance): how well one set of experts per m-token window covers it.

Definitions: docs/routing-consistency.md. Counts are pooled over all sequences, windows and
experts of a group (one layer, or the whole model) before the threshold is maximised.
-1 cells activate nothing; padded tokens end the sequence (see offload_engine.tracing.trace_file).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numba
import numpy as np

from ..trace_file import RoutingTrace


@dataclass(frozen=True)
class SrpResult:
    """SRP of one group at segment length m, with the pooled histogram it came from."""

    m: int
    srp: float  # max_j F1[j]
    threshold: int  # j*, the first argmax
    rho_hat: float  # P[j*] / A: experts kept per window / experts active per token
    act_r: float  # A / P[0]
    histogram: tuple[int, ...]  # H[c], c = 0..m: (window, expert) pairs with f == c


def srp_from_histogram(hist: np.ndarray | tuple[int, ...], m: int) -> SrpResult:
    """SRP, threshold, rho_hat and act_r from a pooled histogram H[0..m], in exact rationals.

    >>> r = srp_from_histogram((2, 0, 2), 2)  # two experts always on, two never, m = 2
    >>> r.srp, r.threshold, r.rho_hat, r.act_r
    (1.0, 1, 1.0, 0.5)
    """
    h = [int(x) for x in hist]
    if len(h) != m + 1:
        raise ValueError(f"histogram has {len(h)} bins, expected m + 1 = {m + 1}")
    tail_pairs = [0] * (m + 2)  # sum_{c >= j} H[c]
    tail_acts = [0] * (m + 2)  # sum_{c >= j} c * H[c]
    for c in range(m, -1, -1):
        tail_pairs[c] = tail_pairs[c + 1] + h[c]
        tail_acts[c] = tail_acts[c + 1] + c * h[c]
    actual = tail_acts[0]
    best, best_j = Fraction(-1), 0
    for j in range(m + 1):
        f1 = Fraction(2 * tail_acts[j], max(m * tail_pairs[j] + actual, 1))
        if f1 > best:
            best, best_j = f1, j
    predicted = m * tail_pairs[best_j]
    return SrpResult(
        m=m,
        srp=float(best),
        threshold=best_j,
        rho_hat=float(Fraction(predicted, actual)) if actual else 0.0,
        act_r=float(Fraction(actual, m * tail_pairs[0])) if tail_pairs[0] else 0.0,
        histogram=tuple(h),
    )


@numba.njit(cache=False)
def _layer_histograms(ids, lengths, num_experts, ms, max_m):  # pragma: no cover - compiled
    # ids [N, T, L, k]; H [L, len(ms), max_m + 1]; each expert's activations become +1 / -1 events over
    # window starts (its windows begin at p - m + 1 and end after p), swept once: O(activations) per m.
    n_seq, n_tok, n_lay, k = ids.shape
    hist = np.zeros((n_lay, ms.shape[0], max_m + 1), np.int64)
    count = np.zeros(num_experts, np.int64)
    start = np.zeros(num_experts + 1, np.int64)
    fill = np.zeros(num_experts, np.int64)
    pos = np.zeros(n_tok * k, np.int64)
    big = 1 << 60
    for n in range(n_seq):
        t_n = lengths[n]
        for lay in range(n_lay):
            count[:] = 0
            for t in range(t_n):
                for j in range(k):
                    e = ids[n, t, lay, j]
                    if e >= 0:
                        count[e] += 1
            for e in range(num_experts):
                start[e + 1] = start[e] + count[e]
                fill[e] = start[e]
            for t in range(t_n):  # positions per expert, ascending
                for j in range(k):
                    e = ids[n, t, lay, j]
                    if e >= 0:
                        pos[fill[e]] = t
                        fill[e] += 1
            for mi in range(ms.shape[0]):
                m = ms[mi]
                n_win = t_n - m + 1
                if n_win <= 0:
                    continue
                absent = 0
                for e in range(num_experts):
                    a = count[e]
                    if a == 0:
                        absent += 1
                        continue
                    b = start[e]
                    i_up = 0
                    i_dn = 0
                    cur = 0
                    s = 0
                    while s < n_win:
                        nu = pos[b + i_up] - m + 1 if i_up < a else big
                        nd = pos[b + i_dn] + 1 if i_dn < a else big
                        nxt = nu if nu <= nd else nd
                        if nxt > s:
                            end = nxt if nxt < n_win else n_win
                            hist[lay, mi, cur] += end - s
                            s = end
                        elif nu <= nd:
                            cur += 1
                            i_up += 1
                        else:
                            cur -= 1
                            i_dn += 1
                hist[lay, mi, 0] += absent * n_win
    return hist


def srp_histograms(trace: RoutingTrace, ms: tuple[int, ...] | list[int]) -> np.ndarray:
    """int64 [L, len(ms), max(ms) + 1]: pooled H[c] per layer and segment length (bins past m are 0).

    The model-level histogram is the sum over layers: the model group's (window, expert) pairs are the
    union of every layer's.
    """
    ms_arr = np.asarray([_check_m(m) for m in ms], dtype=np.int64)
    return _layer_histograms(trace.expert_ids, trace.lengths(), trace.num_experts, ms_arr, int(ms_arr.max()))


def srp(trace: RoutingTrace, m: int, layer: int | None = None) -> SrpResult:
    """SRP of the whole model (layer=None) or of one layer (its position 0..L-1) at segment length m."""
    hist = srp_histograms(trace, [m])[:, 0, : m + 1]
    return srp_from_histogram(hist.sum(axis=0) if layer is None else hist[layer], m)


def _check_m(m: int) -> int:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"segment length must be an integer >= 1, got {m!r}")
    return int(m)
