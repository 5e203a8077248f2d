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

It does not hold everywhere: fp32 goes to MKL and bf16 without AVX-512 to PyTorch's own kernel, and even with
oneDNN a small product (few rows, few outputs: a shared expert's one-output gate, a tiny model's layers) may
take another of its kernels, which sums in another order. So packing is decided per weight shape, on this
machine, at the run's thread count: `packing_is_exact` compares the packed product with F.linear at every row
count up to PACKED_MAX_ROWS, on inputs built so that any other order of summation changes the result
(`ordered_sum_probe`), and on random ones; a shape that differs anywhere stays as stored. A product of more
rows (a prefill), or of an input that is not contiguous, runs F.linear on the weight as stored, so the packed
path only ever sees what the probe covered.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

PACKED_MAX_ROWS = 16  # products of up to this many rows (decode steps, up to 16 rows) use the packed weight
# The probe multiplies a weight of the layer's shape with at most this many outputs (an LM head of 151,936
# outputs would take seconds at every load): oneDNN splits a wide product over outputs, each summed alone,
# and what differs between its kernels is the order of summation (measured on this project's VM: at 2048
# inputs 1 and 2 outputs differ, 768 to 18,992 do not; at 32 inputs, 16 to 128 outputs all differ).
PROBE_MAX_OUT = 4096
# Products over fewer inputs are never packed: at 5 to 13 inputs the probe's layouts passed where others of the
# same shape differ (1 x 5, 1 x 6, 1 x 9, 1 x 13, 2 x 5, 3 x 5: 12 to 25 of 30 other ordered-sum layouts, on this
# project's VM), and no model's layer is this narrow.
MIN_PACKED_IN = 32


def packing_is_exact(dtype: torch.dtype, out_features: int, in_features: int, bias: bool = False) -> bool:
    """True where a product with a packed [out_features, in_features] weight (and a bias) is bit for bit
    F.linear's for `dtype` on this machine at the current thread count, at every row count up to
    PACKED_MAX_ROWS: on two summation-order probes and on random values (at most PROBE_MAX_OUT outputs); never
    for fewer than MIN_PACKED_IN inputs."""
    if dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available() or in_features < MIN_PACKED_IN:
        return False
    generator = torch.Generator().manual_seed(0)
    out_features = min(out_features, PROBE_MAX_OUT)
    try:
        for weight, b, x in (ordered_sum_probe(out_features, in_features, dtype, generator, bias),
                             ordered_sum_probe(out_features, in_features, dtype, generator, bias),
                             random_probe(out_features, in_features, dtype, generator, bias)):
            packed = pack(weight)
            for rows in range(1, PACKED_MAX_ROWS + 1):
                if not torch.equal(linear(x[:rows], packed, b), nn.functional.linear(x[:rows], weight, b)):
                    return False
    except (RuntimeError, AttributeError, NotImplementedError):  # an op this build or CPU lacks
        return False
    return True


def ordered_sum_probe(out_features: int, in_features: int, dtype: torch.dtype, generator: torch.Generator,
                      bias: bool) -> tuple:
    """(weight, bias, x [PACKED_MAX_ROWS, in]) whose products depend on the order of summation: each weight row
    is 2^-13 but for +2^12 and -2^12 at random places and x is one constant per row, so the small terms
    survive only where the two large ones cancel before them (fp32 accumulation: 2^12 + 2^-13 is 2^12)."""
    weight = torch.full((out_features, in_features), 2.0**-13, dtype=dtype)
    rows = torch.arange(out_features)
    weight[rows, torch.randint(0, in_features, (out_features,), generator=generator)] = 2.0**12
    weight[rows, torch.randint(0, in_features, (out_features,), generator=generator)] = -(2.0**12)
    x = (torch.rand(PACKED_MAX_ROWS, 1, generator=generator) + 0.5).expand(-1, in_features).to(dtype).contiguous()
    b = torch.full((out_features,), 2.0**-9, dtype=dtype) if bias else None
    return weight, b, x


def random_probe(out_features: int, in_features: int, dtype: torch.dtype, generator: torch.Generator,
                 bias: bool) -> tuple:
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.05).to(dtype)
    b = torch.randn(out_features, generator=generator).to(dtype) if bias else None
    return weight, b, torch.randn(PACKED_MAX_ROWS, in_features, generator=generator).to(dtype)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] weight reordered into oneDNN's blocked layout (an opaque tensor; a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] times a packed weight's transpose (plus bias): F.linear(x, weight, bias) without the per-call
    reorder."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packable(x: torch.Tensor) -> bool:
    """Whether a product with input x is one the probe covered: contiguous, at most PACKED_MAX_ROWS rows."""
    return x.is_contiguous() and x.numel() <= PACKED_MAX_ROWS * x.shape[-1]


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is packed, for products packing_is_exact covers (`packable`); any other runs
    F.linear on `stored()`: the same weight as the reference multiplies it, a view of the checkpoint's memory
    map taken for the call (the file checked first, as every read checks it; its pages are read only by such
    products, a prefill's), so the layer's weight is not held twice."""

    def __init__(self, layer: nn.Linear, stored: Callable[[], torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("packed", pack(layer.weight.detach()))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach())
        self.stored = stored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if packable(x):
            return linear(x, self.packed, self.bias)
        return nn.functional.linear(x, self.stored(), self.bias)


def pack_linears(model: nn.Module, dtype: torch.dtype,
                 stored_weight: Callable[[str], Callable[[], torch.Tensor] | None]) -> int:
    """Every nn.Linear of `model` (on the CPU, in `dtype`) replaced by a PackedLinear where its shape packs
    exactly here and `stored_weight(module name)` gives a way to its weight as stored, equal to the layer's
    (None: left as it is); a weight another module shares (an LM head tied to the embedding) stays as it is,
    since packing it would hold it twice. Returns how many were packed."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[p.data_ptr()] = owners.get(p.data_ptr(), 0) + 1
    exact: dict[tuple, bool] = {}
    packed = 0
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear or m.weight.device.type != "cpu" or m.weight.dtype != dtype:
            continue
        if owners[m.weight.data_ptr()] > 1:
            continue
        shape = (m.out_features, m.in_features, m.bias is not None)
        if shape not in exact:
            exact[shape] = packing_is_exact(dtype, *shape)
        stored = stored_weight(name) if exact[shape] else None
        if stored is None or not torch.equal(stored(), m.weight):
            continue
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, PackedLinear(m, stored))
        packed += 1
    return packed
