"""`learned`: small heads trained on the engine's own traces to predict the routing 1..D MoE layers ahead.

For every MoE layer l and distance d (l + d < L) one head scores layer l + d's experts from what is known at
layer l:

    logits = W[l, d] @ rms(residual_l) + b[l, d] + sum over this token's experts a at l of U[l, d, a]

(a linear read of the residual stream, as the next layer's router is, plus the co-routing of the experts just
chosen); and, of the same form, one head per layer for the layer's own next call (the next token's routing at
l, L layers ahead), so the predictive cache has a prediction for every resident expert's next chance. Trained
with a softmax cross-entropy against the k experts really chosen, on traces recorded with hidden states
(`moe-offload trace --hidden-states`). Saved as safetensors plus a small JSON card.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import torch
from tqdm.auto import tqdm

from ...errors import ConfigError
from .base import LayerContext, Prediction, Predictor, target_layers

WEIGHTS_FILE = "predictor.safetensors"
CARD_FILE = "predictor.json"


def rms(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class LearnedPredictor(Predictor):
    name = "learned"
    needs_residual = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, path_weight: torch.Tensor, card: dict,
                 next_call: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        # L=layers, D=distances, E=experts, H=hidden; heads with l + d >= L are unused (zeros)
        self.weight, self.bias, self.path_weight = weight.float(), bias.float(), path_weight.float()  # [L,D,E,H] [L,D,E] [L,D,E,E]
        self.num_layers, self.max_depth, self.num_experts, self.hidden_size = weight.shape
        # each layer's head for its own next call, [L,E,H] [L,E] [L,E,E] (None: a predictor trained without them)
        self.next_call = None if next_call is None else tuple(t.float() for t in next_call)
        self.wraps = self.next_call is not None
        self.card = card
        # The engine asks at every decode layer call, so each layer's heads are stacked into one matrix that one
        # compiled call reads (tens of microseconds, where a torch op per head cost hundreds): the distances
        # with a target layer in this token, then the next-call head.
        self._heads = []
        for layer in range(self.num_layers):
            n = max(0, min(self.max_depth, self.num_layers - 1 - layer))  # distances with a target layer
            E, H = self.num_experts, self.hidden_size
            weights, biases, paths = self.weight[layer, :n], self.bias[layer, :n], self.path_weight[layer, :n]
            if self.next_call is not None:
                weights, biases, paths = (torch.cat([t, extra[layer][None]]) for t, extra in
                                          zip((weights, biases, paths), self.next_call))
            blocks = len(weights)
            self._heads.append((
                np.ascontiguousarray(weights.reshape(blocks * E, H).T.numpy()),  # [H, blocks*E]
                np.ascontiguousarray(biases.reshape(blocks * E).numpy()),
                np.ascontiguousarray(paths.permute(1, 0, 2).reshape(E, blocks * E).numpy()),
            ))
        # load (or compile) the kernel now, while the engine loads, not at the first token (numba: ~0.7 s)
        weight, bias, path = self._heads[0]
        _ranked_heads(np.zeros((1, self.hidden_size), np.float32), np.zeros((1, 1), np.int64), weight, bias, path,
                      0, self.num_experts, 1)

    def predict(self, ctx: LayerContext, depth: int, n: int) -> list[Prediction]:
        """The next min(depth, max_depth) layers of this token; with depth >= L, also this layer's own next
        call (where the predictor has its heads)."""
        if ctx.residual is None:
            return []
        L = self.num_layers
        targets = target_layers(ctx.layer, min(depth, self.max_depth), L, wraps=False)
        if self.next_call is not None and depth >= L:
            targets.append((L, ctx.layer))  # its block follows the distances' (all of them: depth >= max_depth)
        if not targets:
            return []
        x = ctx.staged if ctx.staged is not None else self.stage(ctx.layer, ctx.residual, depth, n).cpu().numpy()
        weight, bias, path = self._heads[ctx.layer]
        best = _ranked_heads(x, ctx.experts, weight, bias, path, len(targets), self.num_experts, n)
        return [Prediction(d, j, best[:, i]) for i, (d, j) in enumerate(targets)]

    def stage(self, layer: int, residual: torch.Tensor, depth: int, n: int) -> torch.Tensor:
        """The residual [rows, H] in float32, read to the host with the layer's routing (the heads run there)."""
        return residual.detach().float()

    def save(self, directory: Path) -> None:
        """predictor.safetensors (fp16 weights) and predictor.json (the card), each written whole or not at all."""
        from safetensors.torch import save

        from ...atomic_write import atomic_output

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.half().contiguous(), "bias": self.bias.contiguous(),
                   "path_weight": self.path_weight.half().contiguous()}
        if self.next_call is not None:
            weight, bias, path = self.next_call
            tensors.update({"next_call_weight": weight.half().contiguous(), "next_call_bias": bias.contiguous(),
                            "next_call_path_weight": path.half().contiguous()})
        with atomic_output(directory / WEIGHTS_FILE) as f:
            f.write(save(tensors))
        with atomic_output(directory / CARD_FILE) as f:
            f.write((json.dumps(self.card, indent=1) + "\n").encode())

    @classmethod
    def load(cls, directory: Path, num_layers: int, num_experts: int, hidden_size: int) -> "LearnedPredictor":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            card = json.loads((directory / CARD_FILE).read_text())
            tensors = load_file(str(directory / WEIGHTS_FILE))
            next_call = None
            if "next_call_weight" in tensors:  # predictors trained before these heads have none
                next_call = tuple(tensors[f"next_call_{name}"] for name in ("weight", "bias", "path_weight"))
            predictor = cls(tensors["weight"], tensors["bias"], tensors["path_weight"], card, next_call)
        except (OSError, ValueError, KeyError, IndexError, RuntimeError, SafetensorError) as e:  # shapes too
            raise ConfigError(f"{directory} is not a trained predictor ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              "train one with `moe-offload predictor train`") from None
        shape = (predictor.num_layers, predictor.num_experts, predictor.hidden_size)
        if shape != (num_layers, num_experts, hidden_size):
            raise ConfigError(f"predictor {directory} was trained for {shape[0]} MoE layers of {shape[1]} experts, "
                              f"hidden size {shape[2]}; this model has {num_layers}, {num_experts}, {hidden_size}")
        return predictor


@dataclass(frozen=True)
class TrainSettings:
    max_depth: int = 3
    epochs: int = 6
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    next_call: bool = True  # also a head per layer for its own next call (the next token's routing there)


def train_learned(ids: np.ndarray, hidden: np.ndarray, num_experts: int, settings: TrainSettings = TrainSettings(),
                  card: dict | None = None, progress: bool = True) -> LearnedPredictor:
    """ids [N, T, L, k] routing (-1 = padding), hidden [N, T, L, H] the residual entering each MoE block."""
    # N=sequences, T=tokens, L=layers, k=active, H=hidden, E=experts, D=distances
    N, T, L, k = ids.shape
    H, E, D = hidden.shape[-1], num_experts, settings.max_depth
    gen = torch.Generator().manual_seed(settings.seed)
    weight, bias, path_weight = torch.zeros(L, D, E, H), torch.zeros(L, D, E), torch.zeros(L, D, E, E)
    next_call = (torch.zeros(L, E, H), torch.zeros(L, E), torch.zeros(L, E, E)) if settings.next_call else None
    # (source layer, distance): the next layers of the token, and (l, L) the layer's own next call (token t + 1)
    pairs = [(l, d) for l in range(L) for d in range(1, D + 1) if l + d < L]
    pairs += [(l, L) for l in range(L)] if settings.next_call else []
    valid = (ids >= 0).all(axis=-1)  # [N, T, L]
    bar = tqdm(total=len(pairs) * settings.epochs, desc="training predictor heads", unit="epoch", disable=not progress)
    losses = {}
    for layer, d in pairs:
        shift, target_layer = divmod(layer + d, L)  # tokens ahead (0 or 1), and the target's layer
        src_valid, dst_valid = valid[:, :T - shift, layer], valid[:, shift:, target_layer]
        seq, tok = np.nonzero(src_valid & dst_valid)
        x = rms(torch.from_numpy(hidden[seq, tok, layer].astype(np.float32)))
        src = torch.from_numpy(ids[seq, tok, layer].astype(np.int64))  # [n, k]
        chosen = torch.from_numpy(ids[seq, tok + shift, target_layer].astype(np.int64))
        target = torch.zeros(len(seq), E).scatter_(1, chosen, 1.0 / k)
        lin = torch.nn.Linear(H, E)
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
        path = torch.nn.Parameter(torch.zeros(E, E))
        opt = torch.optim.AdamW([*lin.parameters(), path], lr=settings.lr, weight_decay=settings.weight_decay)
        for _ in range(settings.epochs):
            order = torch.randperm(len(seq), generator=gen)
            total = 0.0
            for start in range(0, len(seq), settings.batch_size):
                b = order[start:start + settings.batch_size]
                logits = lin(x[b]) + path[src[b]].sum(1)
                loss = -(target[b] * logits.log_softmax(-1)).sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(b)
            losses[f"{layer}+{d}"] = total / max(1, len(seq))
            bar.update()
        head = (lin.weight.detach(), lin.bias.detach(), path.detach())
        if d == L:
            for stack, value in zip(next_call, head):
                stack[layer] = value
        else:
            weight[layer, d - 1], bias[layer, d - 1], path_weight[layer, d - 1] = head
    bar.close()
    card = dict(card or {})
    card.update({"kind": "learned", "num_layers": L, "num_experts": E, "hidden_size": H, "top_k": k,
                 "max_depth": D, "next_call": settings.next_call, "train_tokens": int(valid.all(axis=2).sum()),
                 "settings": settings.__dict__, "final_loss": {p: round(v, 4) for p, v in losses.items()},
                 "uniform_loss": round(math.log(E), 4)})
    return LearnedPredictor(weight, bias, path_weight, card, next_call)


@numba.njit(cache=True, fastmath=True)
def _ranked_heads(x, experts, weight, bias, path, depths, num_experts, n):  # pragma: no cover - compiled
    """The heads of one layer (the module docstring's formula) on each row, best n experts per distance (ties:
    the lower id), as ranked() orders them, up to float rounding (the sums run in their own order, so near-ties
    may swap); [rows, depths, n]. One compiled call: the engine runs it at every decode layer call."""
    rows, H = x.shape
    E = num_experts
    out = np.empty((rows, depths, min(n, E)), dtype=np.int64)
    for r in range(rows):
        ms = 0.0
        for h in range(H):
            ms += x[r, h] * x[r, h]
        scale = 1.0 / np.sqrt(ms / H + 1e-6)
        logits = bias[:depths * E].copy()
        for h in range(H):
            xh = x[r, h] * scale
            for j in range(depths * E):
                logits[j] += xh * weight[h, j]
        for a in experts[r]:
            for j in range(depths * E):
                logits[j] += path[max(a, 0), j]
        for d in range(depths):
            order = np.argsort(-logits[d * E:(d + 1) * E], kind="mergesort")
            out[r, d] = order[:out.shape[2]]
    return out
