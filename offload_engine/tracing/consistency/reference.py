"""Plain-Python twins: each definition of docs/routing-consistency.md evaluated directly.

Slow on purpose and independent of the fast code (no numpy arithmetic, no shared helpers beyond the
trace): the tests and the benchmark compare the two. -1 handling is the same as the fast code's: a
sequence ends after its last token with any id; a -1 inside it is a missing cell that requests nothing.
"""

from __future__ import annotations

from fractions import Fraction
from statistics import mean, pstdev, stdev

from ..trace_file import RoutingTrace


def ref_sequences(trace: RoutingTrace, layer: int | None) -> list[list[list[int]]]:
    """Per sequence, per token (up to its length), the group's requests in order (global ids at model level)."""
    e_count = trace.num_experts
    out = []
    for seq in trace.expert_ids.tolist():
        end = 0
        for t, tok in enumerate(seq):
            if any(e >= 0 for row in tok for e in row):
                end = t + 1
        tokens = []
        for tok in seq[:end]:
            layers = range(len(tok)) if layer is None else [layer]
            tokens.append([(e if layer is not None else lay * e_count + e) for lay in layers
                           for e in tok[lay] if e >= 0])
        out.append(tokens)
    return out


def ref_srp(trace: RoutingTrace, m: int, layer: int | None = None) -> dict:
    """SRP by enumerating every (window, expert) pair and every threshold j = 0..m, in Fractions."""
    group = trace.num_experts if layer is not None else trace.num_experts * trace.num_layers
    pairs = []  # f of every (window, expert) pair
    for tokens in ref_sequences(trace, layer):
        for s in range(len(tokens) - m + 1):
            window = [set(tok) for tok in tokens[s:s + m]]
            for e in range(group):
                pairs.append(sum(1 for tok in window if e in tok))
    actual = sum(pairs)
    best, best_j, best_pred = Fraction(-1), 0, 0
    for j in range(m + 1):
        tp = sum(f for f in pairs if f >= j)
        pred = sum(m for f in pairs if f >= j)
        f1 = Fraction(2 * tp, max(pred + actual, 1))
        if f1 > best:
            best, best_j, best_pred = f1, j, pred
    return {
        "srp": best, "threshold": best_j,
        "rho_hat": Fraction(best_pred, actual) if actual else Fraction(0),
        "act_r": Fraction(actual, m * len(pairs)) if pairs else Fraction(0),
        "histogram": [sum(1 for f in pairs if f == c) for c in range(m + 1)],
    }


def ref_hits(trace: RoutingTrace, policy: str, capacity: int, m: int | None = None,
             layer: int | None = None) -> tuple[list[int], list[int]]:
    """(hits, requests) per sequence, simulating the pseudocode line by line with dicts and sets."""
    all_hits, all_reqs = [], []
    for tokens in ref_sequences(trace, layer):
        stream = [x for tok in tokens for x in tok]
        next_use = [len(stream)] * len(stream)  # next request of the same expert; len(stream) if none
        upcoming: dict[int, int] = {}
        for p in range(len(stream) - 1, -1, -1):
            next_use[p] = upcoming.get(stream[p], len(stream))
            upcoming[stream[p]] = p
        need = {}
        for tok in tokens[:m or 0]:
            for x in tok:
                need[x] = need.get(x, 0) + 1
        cache, seen, last, uses, nxt = set(), set(), {}, {}, {}
        hits = distinct = clock = pos = 0
        for i, tok in enumerate(tokens):
            for x in tok:
                if x in seen:
                    hits += x in cache
                else:
                    hits += distinct < capacity
                    distinct += 1
            for x in tok:
                seen.add(x)
                if x not in cache and capacity > 0:
                    if len(cache) >= capacity:
                        if policy == "sch":
                            victim = min(cache, key=lambda y: (need.get(y, 0), last[y]))
                        elif policy == "lru":
                            victim = min(cache, key=lambda y: last[y])
                        elif policy == "lfu":
                            victim = min(cache, key=lambda y: (uses[y], last[y]))
                        else:
                            victim = max(cache, key=lambda y: (nxt[y], -last[y]))
                        cache.remove(victim)
                    cache.add(x)
                clock += 1
                need[x] = need.get(x, 0) - 1
                last[x] = clock
                uses[x] = uses.get(x, 0) + 1
                nxt[x] = next_use[pos]
                pos += 1
            if m is not None and i + m < len(tokens):
                for x in tokens[i + m]:
                    need[x] = need.get(x, 0) + 1
        all_hits.append(hits)
        all_reqs.append(len(stream))
    return all_hits, all_reqs


def ref_hit_rate(trace: RoutingTrace, policy: str, capacity: int, m: int | None = None,
                 layer: int | None = None) -> float:
    """Mean of per-sequence hit rates over sequences with at least one request."""
    hits, reqs = ref_hits(trace, policy, capacity, m if policy == "sch" else None, layer)
    rates = [h / r for h, r in zip(hits, reqs) if r]
    return mean(rates) if rates else 0.0


def ref_act_r(trace: RoutingTrace, m: int, sequences: list[bool] | None = None) -> list[list[float]]:
    """act_r per (layer, expert): activations summed over every window / (m * windows)."""
    e_count, n_lay = trace.num_experts, trace.num_layers
    acts = [[0] * e_count for _ in range(n_lay)]
    windows = 0
    for n, seq in enumerate(trace.expert_ids.tolist()):
        if sequences is not None and not sequences[n]:
            continue
        length = max((t + 1 for t, tok in enumerate(seq) if any(e >= 0 for row in tok for e in row)), default=0)
        for s in range(length - m + 1):
            windows += 1
            for tok in seq[s:s + m]:
                for lay in range(n_lay):
                    for e in tok[lay]:
                        if e >= 0:
                            acts[lay][e] += 1
    return [[a / (m * windows) if windows else 0.0 for a in row] for row in acts]


def ref_load_balance(trace: RoutingTrace, m: int = 16) -> float:
    flat = [a for row in ref_act_r(trace, m) for a in row]
    return stdev(flat) if len(flat) > 1 else 0.0


def ref_domain_specialisation(trace: RoutingTrace, m: int = 16) -> float | None:
    if trace.domains is None or len(set(trace.domains)) < 2:
        return None
    names = sorted(set(trace.domains))
    per = [ref_act_r(trace, m, [d == name for d in trace.domains]) for name in names]
    cvs = []
    for lay in range(trace.num_layers):
        for e in range(trace.num_experts):
            vals = [p[lay][e] for p in per]
            if mean(vals) > 0:
                cvs.append(pstdev(vals) / mean(vals))
    return mean(cvs) if cvs else 0.0


def ref_vocabulary_specialisation(trace: RoutingTrace, min_count: int = 20) -> float | None:
    if trace.token_ids is None:
        return None
    seqs = trace.expert_ids.tolist()
    toks = trace.token_ids.tolist()
    expert_scores = []
    for lay in range(trace.num_layers):
        counts: dict[int, dict[int, int]] = {}
        for seq, tids in zip(seqs, toks):
            length = max((t + 1 for t, tok in enumerate(seq) if any(e >= 0 for row in tok for e in row)), default=0)
            for t in range(length):
                e, tid = seq[t][lay][0], tids[t]
                if e >= 0 and tid >= 0:
                    counts.setdefault(tid, {})
                    counts[tid][e] = counts[tid].get(e, 0) + 1
        assigned: dict[int, list[float]] = {}
        for per_expert in counts.values():
            total = sum(per_expert.values())
            if total >= min_count:
                top = max(per_expert.values())
                best = min(e for e, c in per_expert.items() if c == top)
                assigned.setdefault(best, []).append(top / total)
        expert_scores += [mean(v) for v in assigned.values()]
    return mean(expert_scores) if expert_scores else None
