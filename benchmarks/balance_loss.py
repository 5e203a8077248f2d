"""Load-balancing losses for training the default model, at the scope the balance is computed over.

Switch Transformer's loss for one group of tokens routed over E experts with top-k:

    loss = E * sum_e f_e * P_e,   f_e = share of the group's routed (token, slot) pairs sent to e (no gradient),
                                  P_e = mean router probability of e over the group's tokens

It is k when the group is perfectly balanced. What decides how specialised experts may become is the group
(see "Demons in the Detail", arXiv 2501.11873):

- "model":    transformers' Qwen3-MoE loss: every layer's tokens pooled, experts matched by id across layers,
              so an always-on expert in one layer is balanced by the same id elsewhere (the first default model);
- "layer":    each layer on its own over the whole batch, averaged over layers;
- "sequence": each layer and each sequence on its own (the strictest: every sequence must spread its tokens);
- "global":   each layer on its own, f_e counted over this batch and the previous `window - 1` ones (a larger
              balance scope than one batch; P_e stays this batch's, so only this batch carries gradient);
- "mixed":    the mean of "layer" and "sequence": the batch balanced, and each sequence pulled towards it.

The loops in tests/test_balance_loss.py are the plain twin of this code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SCOPES = ("model", "layer", "sequence", "global", "mixed")


def routed_counts(router_logits: Sequence[torch.Tensor], top_k: int, batch: int) -> torch.Tensor:
    """[L, B, E] routed (token, slot) pairs per layer, sequence and expert; logits per layer [B*T, E]."""
    # L=layers, B=sequences, T=tokens per sequence, E=experts
    out = []
    for logits in router_logits:
        num_experts = logits.shape[-1]
        top = logits.detach().topk(top_k, dim=-1).indices.view(batch, -1, top_k)  # [B, T, k]
        counts = torch.zeros(batch, num_experts, device=logits.device)
        counts.scatter_add_(1, top.reshape(batch, -1), torch.ones(top.reshape(batch, -1).shape, device=logits.device))
        out.append(counts)
    return torch.stack(out)


def balance_loss(
    router_logits: Sequence[torch.Tensor],
    top_k: int,
    batch: int,
    scope: str = "layer",
    past_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, this batch's routed counts [L, E]); `past_counts` [L, E] are earlier batches' (scope "global")."""
    if scope not in SCOPES:
        raise ValueError(f"unknown balance scope {scope!r}; choose one of {SCOPES}")
    counts = routed_counts(router_logits, top_k, batch)  # [L, B, E]
    probs = torch.stack([lg.float().softmax(dim=-1).view(batch, -1, lg.shape[-1]) for lg in router_logits])
    num_layers, _, tokens, num_experts = probs.shape  # [L, B, T, E]
    if scope == "mixed":
        layer, _ = balance_loss(router_logits, top_k, batch, "layer")
        sequence, _ = balance_loss(router_logits, top_k, batch, "sequence")
        return (layer + sequence) / 2, counts.sum(dim=1)
    if scope == "model":
        f = counts.sum(dim=(0, 1)) / (num_layers * batch * tokens)  # [E]
        p = probs.mean(dim=(0, 1, 2))
        loss = num_experts * (f * p).sum()
    elif scope == "sequence":
        f = counts / tokens  # [L, B, E]
        p = probs.mean(dim=2)
        loss = num_experts * (f * p).sum(-1).mean()
    else:
        layer_counts = counts.sum(dim=1)  # [L, E]
        rows = batch * tokens
        if scope == "global" and past_counts is not None:
            f = (layer_counts + past_counts) / (layer_counts + past_counts).sum(-1, keepdim=True) * top_k
        else:
            f = layer_counts / rows
        p = probs.mean(dim=(1, 2))  # [L, E]
        loss = num_experts * (f * p).sum(-1).mean()
    return loss, counts.sum(dim=1)
