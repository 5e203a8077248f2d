"""How far the next layers' own routers can see, read at two points of the residual stream.

`next-gate` (the engine's predictor) applies layer l + d's post-attention norm and router to the residual
entering layer l's MoE block, so its prediction is ready while layer l's experts run. The literature's
pre-attention predictors read one step later: the output of decoder layer l (the input of layer l + 1, before
its attention), so their prediction of layer l + 1 overlaps only that layer's attention. This script
measures recall@k of both readings on the tokens of a trace (e.g. the held-out trace of BENCHMARKS.md),
running the bundled model (or --model) through transformers, with hooks that copy the two residuals out.

    python benchmarks/next_gate_reach.py --trace heldout.npz [--model DIR] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def recall(predicted: torch.Tensor, chosen: torch.Tensor) -> tuple[int, int]:
    """Hits and total over the rows: experts of `chosen` [T, k] found among `predicted` [T, k]."""
    hits = (predicted.unsqueeze(-1) == chosen.unsqueeze(-2)).any(-1).sum()
    return int(hits), chosen.numel()


def main() -> None:
    from transformers import AutoModelForCausalLM
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, required=True, help="a trace with token_ids (moe-offload trace)")
    parser.add_argument("--model", type=Path, default=ROOT / "offload_engine" / "default_model")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--depth", type=int, default=3)
    args = parser.parse_args()

    tokens = np.load(args.trace)["token_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    layers = [layer for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    if len(layers) != len(model.model.layers):
        raise SystemExit("error: this script reads every decoder layer as a MoE layer; the model has dense ones")
    L = len(layers)
    block_input, layer_output, routing = {}, {}, {}
    hooks = []
    for i, layer in enumerate(layers):  # copies: the forward may reuse these tensors in place
        hooks.append(layer.post_attention_layernorm.register_forward_hook(
            lambda m, a, o, i=i: block_input.__setitem__(i, a[0].detach().clone())))
        hooks.append(layer.register_forward_hook(
            lambda m, a, o, i=i: layer_output.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach().clone())))
        hooks.append(layer.mlp.gate.register_forward_hook(
            lambda m, a, o, i=i: routing.__setitem__(i, o[2].detach().clone())))

    def router_choice(j: int, residual: torch.Tensor) -> torch.Tensor:
        return layers[j].mlp.gate(layers[j].post_attention_layernorm(residual.reshape(-1, residual.shape[-1])))[2]

    tally = {(where, d): [0, 0] for where in ("MoE block input", "decoder layer output") for d in range(1, args.depth + 1)}
    with torch.no_grad():
        for row in tqdm(tokens, desc="sequences", unit="seq"):
            model(torch.from_numpy(row.astype(np.int64))[None])
            chosen, inputs, outputs = dict(routing), dict(block_input), dict(layer_output)  # the hooks fire again below
            for layer in range(L):
                for d in range(1, args.depth + 1):
                    if layer + d >= L:
                        continue
                    target = chosen[layer + d].reshape(-1, chosen[layer + d].shape[-1])
                    for where, residual in (("MoE block input", inputs[layer]), ("decoder layer output", outputs[layer])):
                        hits, total = recall(router_choice(layer + d, residual), target)
                        tally[where, d][0] += hits
                        tally[where, d][1] += total
    for h in hooks:
        h.remove()
    print(f"next layers' routers, recall@k on {tokens.shape[0]} x {tokens.shape[1]} tokens of {args.trace} ({args.dtype})")
    for where in ("MoE block input", "decoder layer output"):
        cells = "  ".join(f"{d} ahead {tally[where, d][0] / max(1, tally[where, d][1]):.3f}" for d in range(1, args.depth + 1))
        print(f"  read at the {where:22s} {cells}")


if __name__ == "__main__":
    main()
