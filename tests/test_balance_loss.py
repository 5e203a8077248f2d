"""The default model's balance loss (benchmarks/balance_loss.py) against plain loops, scope by scope."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from balance_loss import SCOPES, balance_loss  # noqa: E402


def switch_loss(groups, E, k):
    """Switch Transformer's E * sum_e f_e * P_e over one group of token rows (logit lists), with loops."""
    f, p = [0.0] * E, [0.0] * E
    for logits in groups:
        z = [math.exp(x - max(logits)) for x in logits]
        probs = [x / sum(z) for x in z]
        for e in sorted(range(E), key=lambda e: -logits[e])[:k]:
            f[e] += 1
        for e in range(E):
            p[e] += probs[e]
    n = len(groups)
    return E * sum((f[e] / n) * (p[e] / n) for e in range(E))


def twin(router_logits, k, batch, scope, past=None):
    L, E = len(router_logits), router_logits[0].shape[-1]
    rows = [lg.tolist() for lg in router_logits]  # [L][B*T][E]
    T = len(rows[0]) // batch
    if scope == "model":
        return switch_loss([r for layer in rows for r in layer], E, k)
    if scope == "sequence":
        return sum(switch_loss(rows[l][b * T:(b + 1) * T], E, k) for l in range(L) for b in range(batch)) / (L * batch)
    total = 0.0
    for l in range(L):
        if scope in ("layer", "mixed") or past is None:
            total += switch_loss(rows[l], E, k)
            continue
        counts = [0.0] * E  # "global": f over this batch and the earlier ones, P over this batch
        for r in rows[l]:
            for e in sorted(range(E), key=lambda e: -r[e])[:k]:
                counts[e] += 1
        counts = [c + float(past[l][e]) for e, c in enumerate(counts)]
        f = [c / sum(counts) * k for c in counts]
        p = [sum(math.exp(x - max(r)) / sum(math.exp(y - max(r)) for y in r) for r in rows[l] for x in [r[e]]) / len(rows[l])
             for e in range(E)]
        total += E * sum(fe * pe for fe, pe in zip(f, p))
    total /= L
    if scope == "mixed":
        return (total + twin(router_logits, k, batch, "sequence")) / 2
    return total


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("seed", range(4))
def test_balance_loss_equals_its_plain_loop_twin(scope, seed):
    gen = torch.Generator().manual_seed(seed)
    L, B, T, E, k = 3, 2, 5, 6, 2
    logits = [torch.randn(B * T, E, generator=gen) * 2 for _ in range(L)]
    past = torch.randint(0, 30, (L, E), generator=gen).float() if scope == "global" else None
    loss, counts = balance_loss(logits, k, B, scope, past)
    assert float(loss) == pytest.approx(twin(logits, k, B, scope, past), rel=1e-5)
    assert counts.shape == (L, E) and counts.sum(-1).tolist() == [B * T * k] * L


def test_a_balanced_router_scores_k_and_one_always_on_expert_scores_more():
    E, k, n = 8, 2, 64
    even = [torch.zeros(n, E)]  # ties: every expert equally likely (P = 1/E); top-k picks vary by index only
    assert float(balance_loss(even, k, 1, "layer")[0]) == pytest.approx(k, rel=0.5)
    skewed = torch.zeros(n, E)
    skewed[:, 0] = 10.0
    assert float(balance_loss([skewed], k, 1, "layer")[0]) > 2 * k


def test_per_layer_scope_sees_what_pooling_over_layers_hides():
    """Layer 0 always uses expert 0, layer 1 always expert 1: pooled over layers the ids look balanced-ish,
    per layer each is fully skewed."""
    n, E, k = 32, 4, 1
    a, b = torch.full((n, E), -5.0), torch.full((n, E), -5.0)
    a[:, 0], b[:, 1] = 5.0, 5.0
    pooled = float(balance_loss([a, b], k, 1, "model")[0])
    per_layer = float(balance_loss([a, b], k, 1, "layer")[0])
    assert per_layer > pooled * 1.5
