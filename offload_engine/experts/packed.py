"""Expert weights packed once in oneDNN's blocked layout, for the experts computed on the CPU.

A bf16 `F.linear` on an x86 CPU with AVX-512 runs oneDNN, which reorders the weight into its blocked layout on
every call before the product: one token's product reads the weight, writes the reordered copy and reads it
again (measured on this project's 2-core VM at Qwen3-30B-A3B's expert shape: 12-15 GB/s from one thread
against 30 GB/s from a weight reordered beforehand). Reordering each expert's weights once, on its first
call on the CPU (torch.ops.mkldnn._reorder_linear_weight), and calling oneDNN's product on them
(_linear_pointwise) gives the same bits: the same kernel over the same blocks, without the reorder.

That holds only where F.linear itself takes oneDNN. Where it does not (fp32 goes to MKL, bf16 without AVX-512
to PyTorch's own kernel, other builds elsewhere) the products would differ in their last bits, so
`packing_is_exact` compares the two on this machine, for the run's dtype, before anything is packed, and the
experts are then computed as stored.
"""

from __future__ import annotations

import torch

# Shapes the probe compares: the experts' own (gate_up [2I, H], down [H, I]) are added; these catch a kernel
# choice that depends on small or odd sizes.
PROBE_SHAPES = ((64, 48), (130, 70), (256, 128))
PROBE_ROWS = (1, 3, 17, 64)


def packing_is_exact(dtype: torch.dtype, shapes: tuple[tuple[int, int], ...] = ()) -> bool:
    """True where a product with a packed weight is bit for bit F.linear's, for `dtype` on this machine:
    every probe shape (and `shapes`, [out, in]) at several row counts, random values."""
    ops = getattr(torch.ops, "mkldnn", None)
    if dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available() or ops is None:
        return False
    generator = torch.Generator().manual_seed(0)
    try:
        for out_features, in_features in PROBE_SHAPES + tuple(shapes):
            weight = (torch.randn(out_features, in_features, generator=generator) * 0.05).to(dtype)
            packed = pack(weight)
            for rows in PROBE_ROWS:
                x = torch.randn(rows, in_features, generator=generator).to(dtype)
                if not torch.equal(linear(x, packed), torch.nn.functional.linear(x, weight)):
                    return False
    except (RuntimeError, AttributeError, NotImplementedError):  # an op this build or CPU lacks
        return False
    return True


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] weight reordered into oneDNN's blocked layout (an opaque tensor; a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [T, in] times a packed weight's transpose: F.linear(x, weight) without the per-call reorder."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class PackedExperts:
    """Each CPU-computed expert's weights, packed on its first call on the CPU and kept, up to `capacity_bytes`
    (beyond it an expert is computed as stored). Counters: `experts` packed, `bytes` they hold (as stored:
    the blocked layout adds no padding at the experts' sizes, which are multiples of the blocks)."""

    def __init__(self, store, capacity_bytes: int):
        self.store = store
        self.capacity_bytes = capacity_bytes
        self.experts = 0
        self.bytes = 0
        self._packed: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def weights(self, layer_pos: int, expert: int) -> dict[str, torch.Tensor] | None:
        """The expert's packed weights by runtime parameter name; None when they would not fit."""
        key = (layer_pos, expert)
        found = self._packed.get(key)
        if found is not None:
            return found
        nbytes = self.store.expert_nbytes()
        if self.bytes + nbytes > self.capacity_bytes:
            return None
        found = self._packed[key] = {name: pack(t[0]) for name, t in self.store.host_view(layer_pos, expert).items()}
        self.experts += 1
        self.bytes += nbytes
        return found
