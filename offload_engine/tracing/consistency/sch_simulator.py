"""The simulator of SCH's rules: SCH and its companion hit rates (LRU, LFU, Belady), one priority policy, one
cache size, one pass. Not the engine's cache: that is tracing/replay.py.

The rules are the published definitions' (docs/routing-consistency.md), fixed because SCH is defined with
them and the companion rates share them so that SCH is compared with LRU, LFU and Belady on equal terms:
- each sequence on its own, its cache reset (a mean of per-sequence hit rates);
- the requests of a token (at model level: every layer's, layer 0's first, with global ids l * E + e; each
  layer's k ids in score order) are judged against the cache as it was before the token (batched lookup);
- the first C distinct experts of a sequence count as hits (warm start);
- then the requests are inserted in order, evicting the cached expert with the smallest priority (which may
  be one the token itself requested);
- Belady's next use is the next request in the sequence's own stream.
The engine's cache, which replay.py reproduces with the engine's own classes, differs in each point: one
cache carried over from one sequence to the next and cold at the start, one lookup per layer call (its
distinct experts in ascending order, judged against the cache as the call finds it), victims never among the
call's own experts, Belady's next use in calls over the whole trace, pooled hits / requests. So the two give
different LRU and Belady hit rates for one trace (on the FLAME trace at one token's experts, 48: LRU 0.216
here, 0.212 replayed). These figures say whether a model's routing suits offloading, as the paper's;
replay's say what this engine's cache will do.

Every policy here is a priority policy whose key does not depend on the cache contents, so caches of
growing size nest (Mattson's inclusion property) and two exact engines are possible:
- `simulate_stack`: one pass for all sizes up to C_max with a priority stack, O(min(depth, C_max)) per
  request: the fast choice for a layer (C_max = 3k = 24 for Qwen3-30B-A3B at rho = 3);
- `simulate`: one pass per size with a min-tree over the group's experts, O(log G) per changed key,
  re-fixed lazily at the next eviction: the fast choice at model level, where C reaches 1152.

A -1 cell requests nothing; tokens past the sequence's length (padding) do not exist. A sequence with no
request is left out of the mean.
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
def _prepare(policy, items, tok_ptr, n_req, t_n, m, nextpos, upcoming, need):  # pragma: no cover - compiled
    """Per sequence: Belady's next-use positions; SCH's pending uses in the first look-ahead window."""
    if policy == BELADY:
        upcoming[:] = n_req  # never requested again = position n_req, the largest
        for r in range(n_req - 1, -1, -1):
            nextpos[r] = upcoming[items[r]]
            upcoming[items[r]] = r
    if policy == SCH:
        for r in range(tok_ptr[min(m, t_n)]):
            need[items[r]] += 1


@numba.njit(cache=False)
def _priority(policy, x, r, clock, big, n_req, need, uses, nextpos):  # pragma: no cover - compiled
    """The eviction key of expert x just used by request r (the smallest key is evicted first)."""
    if policy == SCH:
        need[x] -= 1
        return need[x] * big + clock
    if policy == LRU:
        return clock
    if policy == LFU:
        uses[x] += 1
        return uses[x] * big + clock
    return (n_req - nextpos[r]) * big + clock


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
    dirty = np.zeros(groups, np.bool_)  # key or residency changed since the tree last saw it
    dirty_list = np.zeros(groups, np.int64)
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
        dirty[:] = False
        n_dirty = 0
        big = n_req + 2
        _prepare(policy, items, tok_ptr, n_req, t_n, m, nextpos, upcoming, need)
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
                        for d in range(n_dirty):  # the tree is only needed here: fix each changed leaf once
                            _tree_fix(tree, key, size, dirty_list[d])
                            dirty[dirty_list[d]] = False
                        n_dirty = 0
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
                key[x] = _priority(policy, x, r, clock, big, n_req, need, uses, nextpos)
                if not dirty[x]:
                    dirty[x] = True
                    dirty_list[n_dirty] = x
                    n_dirty += 1
            if policy == SCH and i + m < t_n:  # token i + m enters the look-ahead window
                for r in range(tok_ptr[i + m], tok_ptr[i + m + 1]):
                    x = items[r]
                    need[x] += 1
                    if in_cache[x]:
                        key[x] = need[x] * big + last[x]
                        if not dirty[x]:
                            dirty[x] = True
                            dirty_list[n_dirty] = x
                            n_dirty += 1
        hits_out[n] = hits
    return hits_out, req_out



@numba.njit(cache=False)
def simulate_stack(ids, lengths, num_experts, layer, max_capacity, m, policy):  # pragma: no cover - compiled
    """(hits [N, max_capacity + 1], requests [N]): hits[n, C] for every C <= max_capacity in one pass.

    Mattson's priority stack: the cache of size C is always the stack's top C. A request at depth d
    moves to the top and the items above d bubble down, the lower-priority one carried at each step
    (it is the victim of the cache that ends there). The stack is cut at max_capacity, so a request
    costs O(min(d, max_capacity)): the choice when max_capacity is small (a layer), not for the model.
    """
    n_seq, n_tok, n_lay, k = ids.shape
    groups = num_experts if layer >= 0 else n_lay * num_experts
    per_tok = k if layer >= 0 else n_lay * k
    items = np.zeros(n_tok * per_tok, np.int64)
    tok_ptr = np.zeros(n_tok + 1, np.int64)
    nextpos = np.zeros(n_tok * per_tok, np.int64)
    depth_of = np.zeros(per_tok, np.int64)
    stack = np.zeros(max_capacity + 2, np.int64)  # 1-based positions
    pos = np.zeros(groups, np.int64)  # 0 = not in the (cut) stack
    key = np.zeros(groups, np.int64)
    seen = np.zeros(groups, np.bool_)
    need = np.zeros(groups, np.int64)
    last = np.zeros(groups, np.int64)
    uses = np.zeros(groups, np.int64)
    upcoming = np.zeros(groups, np.int64)
    hits_out = np.zeros((n_seq, max_capacity + 1), np.int64)
    req_out = np.zeros(n_seq, np.int64)
    for n in range(n_seq):
        t_n = lengths[n]
        n_req = _build_stream(ids, n, t_n, layer, num_experts, items, tok_ptr)
        req_out[n] = n_req
        if n_req == 0 or max_capacity <= 0:
            continue
        pos[:] = 0
        seen[:] = False
        need[:] = 0
        uses[:] = 0
        big = n_req + 2
        _prepare(policy, items, tok_ptr, n_req, t_n, m, nextpos, upcoming, need)
        distinct = 0
        height = 0
        clock = 0
        for i in range(t_n):
            lo = tok_ptr[i]
            for r in range(lo, tok_ptr[i + 1]):  # 1. depth in the pre-token stack: a hit for every C >= depth
                x = items[r]
                if seen[x]:
                    depth_of[r - lo] = pos[x]
                else:
                    distinct += 1
                    depth_of[r - lo] = distinct if distinct <= max_capacity else 0  # warm: hit iff distinct < C
            for r in range(lo, tok_ptr[i + 1]):
                d = depth_of[r - lo]
                if d > 0:
                    hits_out[n, d] += 1
            for r in range(lo, tok_ptr[i + 1]):  # 2. move each request to the top, in order
                x = items[r]
                seen[x] = True
                d = pos[x]
                if d != 1:
                    if height == 0:
                        stack[1] = x
                        pos[x] = 1
                        height = 1
                    else:
                        carry = stack[1]
                        stack[1] = x
                        pos[x] = 1
                        end = d if d > 0 else height + 1
                        for c in range(2, end):
                            y = stack[c]
                            if key[y] < key[carry]:
                                stack[c] = carry
                                pos[carry] = c
                                carry = y
                        if end <= max_capacity:
                            stack[end] = carry
                            pos[carry] = end
                            if d == 0:
                                height += 1
                        else:
                            pos[carry] = 0
                clock += 1
                last[x] = clock
                key[x] = _priority(policy, x, r, clock, big, n_req, need, uses, nextpos)
            if policy == SCH and i + m < t_n:
                for r in range(tok_ptr[i + m], tok_ptr[i + m + 1]):
                    x = items[r]
                    need[x] += 1
                    key[x] = need[x] * big + last[x]
    for n in range(n_seq):  # depth histogram -> hits at every cache size
        for c in range(1, max_capacity + 1):
            hits_out[n, c] += hits_out[n, c - 1]
    return hits_out, req_out


# --- the Python face of the simulator ---------------------------------------------------------------

from dataclasses import dataclass  # noqa: E402
from fractions import Fraction  # noqa: E402

from ..trace_file import RoutingTrace  # noqa: E402


@dataclass(frozen=True)
class HitRate:
    """One policy's hit rate under SCH's rules on one group at one cache size: the mean of per-sequence hit
    rates."""

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


STACK_MAX_CAPACITY = 64  # up to here one Mattson pass for all sizes beats one min-tree pass per size


def hit_rates(trace: RoutingTrace, policy: str, capacities: tuple[int, ...] | list[int], m: int | None = None,
              layer: int | None = None, method: str = "auto") -> tuple[HitRate, ...]:
    """Hit rates of `policy` at several cache sizes; `m` is required for "sch" only.

    method: "stack" (all sizes in one Mattson pass), "tree" (one min-tree pass per size) or "auto"
    (stack when the largest clamped size is <= STACK_MAX_CAPACITY). Both give identical counts.
    """
    if policy not in POLICY_CODES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICY_CODES)}")
    if policy == "sch" and (m is None or m < 1):
        raise ValueError(f"SCH needs a segment length m >= 1, got {m!r}")
    if any(c < 0 for c in capacities):
        raise ValueError(f"cache capacities must be >= 0, got {list(capacities)}")
    if layer is not None and not 0 <= layer < trace.num_layers:
        raise ValueError(f"layer must be in 0..{trace.num_layers - 1}, got {layer}")
    group = trace.num_experts * (1 if layer is not None else trace.num_layers)
    clamped = [min(c, group) for c in capacities]  # a cache of >= G experts never evicts: same as G
    args = (trace.expert_ids, trace.lengths(), trace.num_experts, -1 if layer is None else layer)
    seg = m if policy == "sch" else 0
    if method == "stack" or (method == "auto" and max(clamped, default=0) <= STACK_MAX_CAPACITY):
        all_hits, reqs = simulate_stack(*args, max(clamped, default=0), seg, POLICY_CODES[policy])
        per_size = [all_hits[:, c] for c in clamped]
    else:
        per_size, reqs = [], None
        for c in clamped:
            hits, reqs = simulate(*args, c, seg, POLICY_CODES[policy])
            per_size.append(hits)
        if reqs is None:
            reqs = np.zeros(trace.num_sequences, np.int64)
    used = reqs > 0
    return tuple(
        HitRate(policy=policy, capacity=c, m=m if policy == "sch" else None, layer=layer,
                hit_rate=float(np.mean(h[used] / reqs[used])) if used.any() else 0.0,
                hits=tuple(int(x) for x in h), requests=tuple(int(x) for x in reqs))
        for c, h in zip(capacities, per_size))


def hit_rate(trace: RoutingTrace, policy: str, capacity: int, m: int | None = None,
             layer: int | None = None, method: str = "auto") -> HitRate:
    """Simulate `policy` with a cache of `capacity` experts; `m` is required for "sch" only."""
    return hit_rates(trace, policy, [capacity], m=m, layer=layer, method=method)[0]
