"""Weights packed once in oneDNN's blocked layout, for the matrix products that run on the CPU: the experts
computed on the CPU (experts/packed_experts.py) and, on a CPU device, the model's own linear layers.

A bf16 `F.linear` on an x86 CPU with AVX-512 runs oneDNN, which reorders the weight into its blocked layout on
every call before the product: one token's product reads the weight, writes the reordered copy and reads it
again (measured on this project's 2-core VM at Qwen3-30B-A3B's expert shape: 12-15 GB/s from one thread
against 30 GB/s from a weight reordered beforehand). Reordering each expert's weights once, on its first
call on the CPU (torch.ops.mkldnn._reorder_linear_weight), and calling oneDNN's product on them
(_linear_pointwise) gives the same bits: the same kernel over the same blocks, without the reorder. An
attention projection or an LM head gains as much; a small product (the bundled model's 256 x 256) saves only
the reorder's few microseconds of its ~15.

That holds only where F.linear itself takes oneDNN. Where it does not (fp32 goes to MKL, bf16 without AVX-512
to PyTorch's own kernel, other builds elsewhere) the products would differ in their last bits, so
`packing_is_exact` compares the two on this machine, for the run's dtype, before anything is packed, and the
experts are then computed as stored.
"""

from __future__ import annotations

import torch
from torch import nn

# Shapes the probe compares: the experts' own (gate_up [2I, H], down [H, I]) are added; these catch a kernel
# choice that depends on small or odd sizes.
PROBE_SHAPES = ((64, 48), (130, 70), (256, 128))  # [out, in]
PROBE_ROWS = (1, 3, 17, 64)


def packing_is_exact(dtype: torch.dtype, shapes: tuple[tuple[int, int], ...] = (), bias: bool = False) -> bool:
    """True where a product with a packed weight is bit for bit F.linear's, for `dtype` on this machine:
    every probe shape (and `shapes`, [out, in]) at several row counts, random values (with a bias too)."""
    ops = getattr(torch.ops, "mkldnn", None)
    if dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available() or ops is None:
        return False
    generator = torch.Generator().manual_seed(0)
    try:
        for out_features, in_features in PROBE_SHAPES + tuple(shapes):
            weight = (torch.randn(out_features, in_features, generator=generator) * 0.05).to(dtype)
            b = torch.randn(out_features, generator=generator).to(dtype) if bias else None
            packed = pack(weight)
            for rows in PROBE_ROWS:
                x = torch.randn(rows, in_features, generator=generator).to(dtype)
                if not torch.equal(linear(x, packed), torch.nn.functional.linear(x, weight)):
                    return False
                if bias and not torch.equal(linear(x, packed, b), torch.nn.functional.linear(x, weight, b)):
                    return False
    except (RuntimeError, AttributeError, NotImplementedError):  # an op this build or CPU lacks
        return False
    return True


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] weight reordered into oneDNN's blocked layout (an opaque tensor; a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] times a packed weight's transpose (plus bias): F.linear(x, weight, bias) without the per-call
    reorder."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is packed (the plain weight is dropped: no memory added)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("packed", pack(layer.weight.detach()))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed, self.bias)


def pack_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Every nn.Linear of `model` (on the CPU, in `dtype`) replaced by a PackedLinear where packing gives the
    same bits here; a weight that another module shares (an LM head tied to the embedding) stays as it is,
    since packing it would hold it twice. Returns how many were packed."""
    linears = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == dtype]
    shapes = tuple({tuple(m.weight.shape) for _, m in linears})
    if not linears or not packing_is_exact(dtype, shapes, bias=any(m.bias is not None for _, m in linears)):
        return 0
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[p.data_ptr()] = owners.get(p.data_ptr(), 0) + 1
    packed = 0
    for name, m in linears:
        if owners[m.weight.data_ptr()] > 1:
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, PackedLinear(m))
        packed += 1
    return packed


