"""The cache simulator shared by SCH, LRU, LFU and Belady: one priority policy, one cache size, one pass.

Rules (../shared/docs/routing-consistency.md): the requests of a token are judged against the cache as it
was before the token (batched lookup), the first C distinct experts of a sequence count as hits (warm
start), then the requests are inserted in order, evicting the cached expert with the smallest priority.
Every policy here is a priority policy whose key does not depend on the cache contents, so one min-tree
over the group's experts finds the victim in O(log G): O(requests * log G) per sequence and cache size.
(A Mattson priority stack gets all sizes at once but walks O(C) per miss, slower at model level, where
C reaches 1152 for Qwen3-30B-A3B at rho = 3.)

Request streams: a layer group requests each token's k ids in score order; the model group requests
layer 0's ids, then layer 1's, ..., with global ids l * E + e. A -1 cell requests nothing; tokens past
the sequence's length (padding) do not exist. A sequence with no request is left out of the mean.
"""

from __future__ import annotations

import numba
import numpy as np

SCH, LRU, LFU, BELADY = 0, 1, 2, 3
POLICY_CODES = {"sch": SCH, "lru": LRU, "lfu": LFU, "belady": BELADY}


@numba.njit(cache=False)
def _build_stream(ids, n, t_n, layer, num_experts, items, tok_ptr):  # pragma: no cover - compiled
    # items: global ids of sequence n's requests in order; tok_ptr [t_n + 1]: token boundaries in items.
    n_lay = ids.shape[2]
    k = ids.shape[3]
    r = 0
    for t in range(t_n):
        tok_ptr[t] = r
        for lay in range(n_lay):
            if layer >= 0 and lay != layer:
                continue
            for j in range(k):
                e = ids[n, t, lay, j]
                if e >= 0:
                    items[r] = e if layer >= 0 else lay * num_experts + e
                    r += 1
    tok_ptr[t_n] = r
    return r


@numba.njit(cache=False)
def _tree_fix(tree, key, size, x):  # pragma: no cover - compiled
    # Recompute the min-key item on the path from leaf x to the root (-1 = no cached item below).
    node = (size + x) >> 1
    while node >= 1:
        a = tree[2 * node]
        b = tree[2 * node + 1]
        if a < 0:
            w = b
        elif b < 0:
            w = a
        elif key[b] < key[a]:
            w = b
        else:
            w = a
        tree[node] = w
        node >>= 1


@numba.njit(cache=False)
def simulate(ids, lengths, num_experts, layer, capacity, m, policy):  # pragma: no cover - compiled
    """(hits [N], requests [N]) of one policy at one cache size; layer = -1 for the model group."""
    n_seq, n_tok, n_lay, k = ids.shape
    groups = num_experts if layer >= 0 else n_lay * num_experts
    per_tok = k if layer >= 0 else n_lay * k
    items = np.zeros(n_tok * per_tok, np.int64)
    tok_ptr = np.zeros(n_tok + 1, np.int64)
    nextpos = np.zeros(n_tok * per_tok, np.int64)
    size = 1
    while size < groups:
        size *= 2
    tree = np.full(2 * size, -1, np.int64)
    key = np.zeros(size, np.int64)
    in_cache = np.zeros(groups, np.bool_)
    seen = np.zeros(groups, np.bool_)
    need = np.zeros(groups, np.int64)
    last = np.zeros(groups, np.int64)
    uses = np.zeros(groups, np.int64)
    upcoming = np.zeros(groups, np.int64)
    hits_out = np.zeros(n_seq, np.int64)
    req_out = np.zeros(n_seq, np.int64)
    for n in range(n_seq):
        t_n = lengths[n]
        n_req = _build_stream(ids, n, t_n, layer, num_experts, items, tok_ptr)
        req_out[n] = n_req
        if n_req == 0 or capacity <= 0:
            continue
        tree[:] = -1
        in_cache[:] = False
        seen[:] = False
        need[:] = 0
        uses[:] = 0
        big = n_req + 2
        if policy == BELADY:
            upcoming[:] = n_req  # never requested again = position n_req, the largest
            for r in range(n_req - 1, -1, -1):
                nextpos[r] = upcoming[items[r]]
                upcoming[items[r]] = r
        if policy == SCH:
            for r in range(tok_ptr[min(m, t_n)]):
                need[items[r]] += 1
        hits = 0
        distinct = 0
        cached = 0
        clock = 0
        for i in range(t_n):
            for r in range(tok_ptr[i], tok_ptr[i + 1]):  # 1. lookups against the pre-token cache
                x = items[r]
                if seen[x]:
                    hits += in_cache[x]
                else:
                    hits += distinct < capacity
                    distinct += 1
            for r in range(tok_ptr[i], tok_ptr[i + 1]):  # 2. inserts, in request order
                x = items[r]
                seen[x] = True
                if not in_cache[x]:
                    if cached >= capacity:
                        y = tree[1]
                        in_cache[y] = False
                        tree[size + y] = -1
                        _tree_fix(tree, key, size, y)
                        cached -= 1
                    in_cache[x] = True
                    tree[size + x] = x
                    cached += 1
                clock += 1
                last[x] = clock
                if policy == SCH:
                    need[x] -= 1
                    key[x] = need[x] * big + clock
                elif policy == LRU:
                    key[x] = clock
                elif policy == LFU:
                    uses[x] += 1
                    key[x] = uses[x] * big + clock
                else:
                    key[x] = (n_req - nextpos[r]) * big + clock
                _tree_fix(tree, key, size, x)
            if policy == SCH and i + m < t_n:  # token i + m enters the look-ahead window
                for r in range(tok_ptr[i + m], tok_ptr[i + m + 1]):
                    x = items[r]
                    need[x] += 1
                    if in_cache[x]:
                        key[x] = need[x] * big + last[x]
                        _tree_fix(tree, key, size, x)
        hits_out[n] = hits
    return hits_out, req_out


# --- the Python face of the simulator ---------------------------------------------------------------

from dataclasses import dataclass  # noqa: E402
from fractions import Fraction  # noqa: E402

from ..trace_file import RoutingTrace  # noqa: E402


@dataclass(frozen=True)
class HitRate:
    """One policy's hit rate on one group at one cache size: the mean of per-sequence hit rates."""

    policy: str  # "sch", "lru", "lfu" or "belady"
    capacity: int  # C, experts the cache holds
    m: int | None  # SCH look-ahead (segment length); None for the other policies
    layer: int | None  # position in the trace's layer axis; None = the whole model
    hit_rate: float
    hits: tuple[int, ...]  # per sequence
    requests: tuple[int, ...]  # per sequence; sequences with 0 requests are left out of the mean


def capacity_for_ratio(trace: RoutingTrace, ratio: float | str | Fraction, layer: int | None = None) -> int:
    """C = floor(rho * active experts per token of the group): rho * k for a layer, rho * k * L for the model.

    >>> import numpy as np
    >>> t = RoutingTrace(np.zeros((1, 1, 8, 6), np.int16) + np.arange(6, dtype=np.int16), 64, np.arange(8))
    >>> capacity_for_ratio(t, "2"), capacity_for_ratio(t, "0.5", layer=0)
    (96, 3)
    """
    rho = Fraction(str(ratio)) if not isinstance(ratio, Fraction) else ratio
    if rho < 0:
        raise ValueError(f"cache ratio must be >= 0, got {ratio}")
    active = trace.k if layer is not None else trace.k * trace.num_layers
    return int(rho * active)  # exact floor: "0.1" is 1/10, not a binary fraction


def hit_rate(trace: RoutingTrace, policy: str, capacity: int, m: int | None = None,
             layer: int | None = None) -> HitRate:
    """Simulate `policy` with a cache of `capacity` experts; `m` is required for "sch" only."""
    if policy not in POLICY_CODES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICY_CODES)}")
    if policy == "sch" and (m is None or m < 1):
        raise ValueError(f"SCH needs a segment length m >= 1, got {m!r}")
    if capacity < 0:
        raise ValueError(f"cache capacity must be >= 0, got {capacity}")
    if layer is not None and not 0 <= layer < trace.num_layers:
        raise ValueError(f"layer must be in 0..{trace.num_layers - 1}, got {layer}")
    group = trace.num_experts * (1 if layer is not None else trace.num_layers)
    hits, reqs = simulate(trace.expert_ids, trace.lengths(), trace.num_experts, -1 if layer is None else layer,
                          min(capacity, group),  # a cache of >= G experts never evicts: same as G
                          m if policy == "sch" else 0,
                          POLICY_CODES[policy])
    used = reqs > 0
    rate = float(np.mean(hits[used] / reqs[used])) if used.any() else 0.0
    return HitRate(policy=policy, capacity=capacity, m=m if policy == "sch" else None, layer=layer,
                   hit_rate=rate, hits=tuple(int(h) for h in hits), requests=tuple(int(r) for r in reqs))
