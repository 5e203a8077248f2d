"""Random small routing traces for the consistency tests (padding, missing cells, sticky routing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from offload_engine.tracing.trace_file import RoutingTrace

# Real routing of FLAME-MoE-290M, shipped in the repository (see data/flame-moe-290m/PROVENANCE.md).
FLAME = Path(__file__).resolve().parents[1] / "data" / "flame-moe-290m" / "flame_moe_290m_routing.npz"


def random_trace(rng: np.random.Generator, max_n: int = 3, max_t: int = 12, max_l: int = 3, max_k: int = 3,
                 max_e: int = 6, domains: bool = False, vocab: int = 0) -> RoutingTrace:
    n = int(rng.integers(1, max_n + 1))
    t = int(rng.integers(1, max_t + 1))
    lay = int(rng.integers(1, max_l + 1))
    k = int(rng.integers(1, max_k + 1))
    e = int(rng.integers(k, max(k, max_e) + 1))
    stick = rng.random()  # chance a token reuses the previous token's experts: makes hits happen
    ids = np.empty((n, t, lay, k), np.int16)
    for a in range(n):
        for c in range(lay):
            prev = rng.permutation(e)[:k]
            for b in range(t):
                if b and rng.random() < stick:
                    ids[a, b, c] = prev
                else:
                    prev = rng.permutation(e)[:k]
                    ids[a, b, c] = prev
    if rng.random() < 0.5:  # missing cells
        ids[rng.random(ids.shape) < 0.15] = -1
    if rng.random() < 0.5:  # padding at the end of some sequences
        for a in range(n):
            ids[a, int(rng.integers(0, t + 1)):] = -1
    token_ids = rng.integers(-1, vocab, size=(n, t)).astype(np.int32) if vocab else None
    labels = tuple(str(rng.choice(["code", "prose", "math"])) for _ in range(n)) if domains else None
    return RoutingTrace(expert_ids=ids, num_experts=e, moe_layers=np.arange(lay) + 1,
                        token_ids=token_ids, domains=labels)


def trace_from_lists(seqs: list[list[list[list[int]]]], num_experts: int) -> RoutingTrace:
    """[N][T][L][k] nested lists -> RoutingTrace."""
    ids = np.array(seqs, dtype=np.int16)
    return RoutingTrace(expert_ids=ids, num_experts=num_experts, moe_layers=np.arange(ids.shape[2]))
