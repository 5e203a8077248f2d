"""How a memory budget is spent: non-expert weights, KV cache, working memory, then expert slots.

    budget >= non_expert + kv_cache(max_context, batch) + working + slots * expert_bytes,  slots >= top_k

The smallest cache that works holds one token's active experts of one layer (top_k slots): layers run one
after another and a batch that needs more experts than there are slots is served a group at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from fractions import Fraction

import torch

from ..checkpoint.model_spec import ModelSpec
from ..errors import MemoryBudgetError, short_repr

UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
WORKING_SLACK = 32 * 1024**2  # allocator rounding, small temporaries
MAX_BYTES = 1024**5  # 1 PiB, more memory than any machine holds: a larger budget is a typo


def parse_bytes(text: str | int) -> int:
    """'6GiB' -> 6442450944. K/M/G and KiB/MiB/GiB are binary; KB/MB/GB are decimal. Read exactly (no float
    rounding), from one byte up to MAX_BYTES.

    >>> parse_bytes("1.5GiB"), parse_bytes("512MB"), parse_bytes(4096)
    (1610612736, 512000000, 4096)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value, shown = text, repr(text) if abs(text) < 10**30 else "(a number of over 30 digits)"
    else:
        shown = short_repr(str(text))
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in UNITS:
            raise MemoryBudgetError(
                f"cannot read memory size {shown}; write a number with a unit, e.g. 6GiB, 512MiB or 2GB"
            )
        number = match.group(1)
        huge = len(number.partition(".")[0].lstrip("0")) > 20  # more digits than any size: not worth converting
        # 40 characters hold every digit a size of at most 20 integer digits can need, to the byte
        value = MAX_BYTES + 1 if huge else int(Fraction(number[:40]) * UNITS[unit])
    if value <= 0:
        raise MemoryBudgetError(f"memory size {shown} must be positive (at least 1 byte)")
    if value > MAX_BYTES:
        raise MemoryBudgetError(f"memory size {shown} is larger than {MAX_BYTES // 1024**4} TiB; "
                                "write the memory the engine may use, e.g. 6GiB")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV-cache bytes one token costs across all layers (an upper bound for sliding-window/hybrid models)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, k_dim, v_dim = kv_head_dims(config)
    return text.num_hidden_layers * heads * (k_dim + v_dim) * dtype.itemsize


def growing_kv_bytes(config, dtype: torch.dtype, max_context: int, batch: int) -> int:
    """The most a KV cache that grows by concatenation holds (a model that cannot take a static cache:
    MiniMax's own cache): full-attention layers' keys and values at `max_context` (the engine refuses a
    generation past it), linear-attention layers' states ([batch, heads, head_dim, head_dim], fp32 at most),
    and, while a layer grows, its old and new tensors at once (one more layer's keys and values)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, k_dim, v_dim = kv_head_dims(config)
    layer_bytes = batch * max_context * heads * (k_dim + v_dim) * dtype.itemsize
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    linear = sum(t == "linear_attention" for t in types)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    state = batch * text.num_attention_heads * head_dim * head_dim * 4
    return (len(types) - linear + 1) * layer_bytes + linear * state


def kv_head_dims(config) -> tuple[int, int, int]:
    """(heads, key dim, value dim) of one layer's KV cache: MLA (DeepSeek) caches its compressed latent as one
    head (the normed kv_lora_rank part as keys, the rotary part as values; transformers >= 5.25), the others
    num_key_value_heads of head_dim each. tests/test_kv_cache.py checks this against transformers' own cache."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    if getattr(text, "kv_lora_rank", None):
        return 1, text.kv_lora_rank, text.qk_rope_head_dim
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return kv_heads, head_dim, head_dim


def working_bytes(config, spec: ModelSpec, dtype: torch.dtype, max_context: int, batch: int) -> int:
    """Activations of a full-context prefill: hidden states, one layer's expert/MLP intermediates, logits.

    The grouped experts function holds, for every routed (token, expert) pair, the token's hidden state
    while it computes either the up projection and gate (2I, then I and I) or the down projection and the
    weighted output (H each, the weighted one in fp32 where the routing weights are: 2H in bf16): k x
    max(H + 4I, 5H + I) per token, measured with tests/live_bytes.py (tests/test_working_memory.py; before,
    k x 3I fell short at top-8 and top-16)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    H = text.hidden_size
    intermediate = spec.expert_numel() // (3 * H)  # I of a gated expert (gate, up, down: H x I each)
    dense = getattr(text, "intermediate_size", 0) or 0
    per_token = 12 * H + spec.top_k * max(H + 4 * intermediate, 5 * H + intermediate) + 3 * dense
    logits = 2 * batch * spec.vocab_size * 4  # fp32 logits of the last position, and the sampling copy
    scores = 0
    if getattr(text, "_attn_implementation", None) == "eager":  # eager attention materialises [B, heads, T, T]
        scores = 2 * batch * text.num_attention_heads * max_context * max_context * 4
    return batch * max_context * per_token * dtype.itemsize + logits + scores + WORKING_SLACK


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int | None
    non_expert_bytes: int
    kv_cache_bytes: int
    working_bytes: int
    expert_bytes: int
    expert_slots: int
    total_experts: int
    min_slots: int
    max_context: int
    batch: int
    allocator_bytes: int = 0  # CUDA: what the caching allocator's rounding adds to the tensors above
    kv_cache_grows: bool = False  # no static cache: counted at its most (growing_kv_bytes), allocated as it grows
    context_fitted: bool = False  # max_context was not asked for and was lowered from the default to fit the budget
    mapped_bytes: int = 0  # the input embedding, left in the memory-mapped file (CPU; loading.mapped_embedding)
    expert_format: str = ""  # how a slot holds an expert (experts/formats describe()); "" for the plain dtype
    non_experts_expanded: bool = False  # FP8 non-expert weights, expanded to the compute dtype at load
    # a CPU device holding every expert: packed for oneDNN and computed where they lie, with no slot pool (the
    # expert_slots' bytes are the packed copies'; loading.packs_resident_experts)
    experts_packed: bool = False

    @property
    def fixed_bytes(self) -> int:
        return self.non_expert_bytes + self.kv_cache_bytes + self.working_bytes + self.allocator_bytes

    @property
    def slot_bytes(self) -> int:
        return self.expert_slots * self.expert_bytes

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.slot_bytes

    @property
    def minimum_bytes(self) -> int:
        return self.fixed_bytes + self.min_slots * self.expert_bytes

    @property
    def resident_share(self) -> float:
        return self.expert_slots / self.total_experts

    def describe(self) -> str:
        budget = format_bytes(self.budget_bytes) if self.budget_bytes else "none (slots set directly)"
        rows = [
            ("memory budget", budget),
            ("non-expert weights" + (" (expanded from FP8 at load)" if self.non_experts_expanded else ""),
             format_bytes(self.non_expert_bytes)),
            *([("input embedding (memory-mapped, outside the budget)", format_bytes(self.mapped_bytes))]
              if self.mapped_bytes else []),
            (f"KV cache ({self.batch} x {self.max_context} tokens{', grows' if self.kv_cache_grows else ''}"
             f"{', lowered to fit' if self.context_fitted else ''})",
             format_bytes(self.kv_cache_bytes)),
            ("working memory (estimate)", format_bytes(self.working_bytes)),
            *([("allocator rounding (CUDA)", format_bytes(self.allocator_bytes))] if self.allocator_bytes else []),
            (f"{'experts packed for oneDNN' if self.experts_packed else 'expert slots'} ({self.expert_slots} x "
             f"{format_bytes(self.expert_bytes)})", format_bytes(self.slot_bytes)),
            *([("experts held as", self.expert_format)] if self.expert_format else []),
            ("total", format_bytes(self.total_bytes)),
            ("experts resident", f"{self.expert_slots} of {self.total_experts} ({100 * self.resident_share:.1f}%)"
                                 + (", computed where they lie on the CPU" if self.experts_packed else "")),
            ("minimum budget", f"{format_bytes(self.minimum_bytes)} ({self.min_slots} slots)"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def plan_memory(
    spec: ModelSpec,
    non_expert_bytes: int,
    kv_cache_bytes: int,
    work_bytes: int,
    expert_bytes: int,
    budget_bytes: int | None,
    expert_slots: int | None,
    max_context: int,
    batch: int,
    allocator_bytes: int = 0,
    kv_cache_grows: bool = False,
    context_fitted: bool = False,
    mapped_bytes: int = 0,
) -> MemoryPlan:
    """Choose the slot count: as given, or as many as the budget holds (never more than there are experts).
    Given both, the budget is the hard cap and the slot count a request inside it."""
    total = spec.total_experts
    plan = MemoryPlan(budget_bytes, non_expert_bytes, kv_cache_bytes, work_bytes, expert_bytes, 0, total,
                      spec.top_k, max_context, batch, allocator_bytes, kv_cache_grows, context_fitted, mapped_bytes)
    if expert_slots is not None:
        if expert_slots < spec.top_k:
            raise MemoryBudgetError(
                f"{expert_slots} expert slots cannot hold one token's {spec.top_k} active experts; "
                f"use --expert-slots {spec.top_k} or more"
            )
        slots = min(expert_slots, total)
    else:
        slots = min(total, max(0, (budget_bytes - plan.fixed_bytes)) // expert_bytes)
    fitting = min(total, max(0, (budget_bytes - plan.fixed_bytes)) // expert_bytes) if budget_bytes else 0
    if budget_bytes is not None and expert_slots is not None and fitting >= spec.top_k and slots > fitting:
        raise MemoryBudgetError(
            f"{expert_slots} expert slots do not fit in the memory budget of {format_bytes(budget_bytes)}: after "
            f"the fixed parts ({format_bytes(plan.fixed_bytes)}) it holds at most {fitting} slots of "
            f"{format_bytes(expert_bytes)}; ask for at most {fitting} slots or raise --memory-budget"
        )
    if budget_bytes is not None and (slots < spec.top_k or plan.fixed_bytes + slots * expert_bytes > budget_bytes):
        raise MemoryBudgetError(
            f"memory budget {format_bytes(budget_bytes)} is too small: this model needs at least "
            f"{format_bytes(plan.minimum_bytes)} (non-expert weights {format_bytes(non_expert_bytes)}, "
            f"KV cache {format_bytes(kv_cache_bytes)}, working {format_bytes(work_bytes)}, "
            f"{spec.top_k} expert slots); raise --memory-budget or lower --max-context"
        )
    return replace(plan, expert_slots=slots)


CUDA_LARGE = 1 << 20  # the caching allocator's small/large boundary
CUDA_LARGE_ROUND = 2 << 20  # large allocations are rounded up to 2 MiB
CUDA_SMALL_ROUND = 512
CUDA_FRAGMENTATION = 64 << 20  # freed activation blocks kept cached while other sizes are asked for


def cuda_allocator_bytes(tensor_bytes: list[int], slot_params: int) -> int:
    """What PyTorch's CUDA caching allocator reserves beyond the tensors' own bytes: each allocation rounded
    up (512 B below 1 MiB, 2 MiB above), one rounding per slot-pool tensor (the pool is allocated once per
    expert parameter, rounded by less than 2 MiB each), and slack for activation blocks kept cached."""
    extra = 0
    for n in tensor_bytes:
        unit = CUDA_LARGE_ROUND if n > CUDA_LARGE else CUDA_SMALL_ROUND
        extra += -n % unit
    return extra + slot_params * CUDA_LARGE_ROUND + CUDA_FRAGMENTATION
