"""Generation as a stream: prefill, then one decode step per token, each yielding the sampled tokens.

The model is transformers' own (with offloaded experts), called exactly as `generate` calls it: the whole
prompt once, then one token at a time against its KV cache. Greedy decoding therefore reproduces
`model.generate` token for token. Sampling uses its own seeded torch.Generator: no global RNG state.
"""

from __future__ import annotations

import inspect
import math
import numbers
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .errors import GenerationInputError
from .experts.host_read import read_to_host
from .logprobs import TokenLogprobs, on_device, per_row


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    ignore_eos: bool = False  # keep going after an EOS (fixed-length benchmarks and comparisons)

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise GenerationInputError(f"max_new_tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, "
                                       f"not {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:  # also catches NaN
            raise GenerationInputError(f"temperature must be a number >= 0 (0 means greedy), not {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise GenerationInputError(f"top_p must be a number in (0, 1], not {self.top_p!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= 2**31:
            raise GenerationInputError(f"top_k must be a whole number >= 0 (0 disables it), not {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise GenerationInputError(f"seed must be a whole number from 0 to 2**64 - 1, or None, not {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise GenerationInputError(f"ignore_eos must be True or False, not {self.ignore_eos!r}")


MAX_NEW_TOKENS = 1 << 24
GREEDY_BELOW = 1e-5  # a temperature this small samples the argmax anyway; dividing by it overflows


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k and nucleus filtering remove; logits [B, V] already divided by temperature."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of logits [B, V] -> [B]; the caller has checked that the logits are finite."""
    if cfg.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_generator(cfg: SamplingConfig, device: torch.device) -> torch.Generator | None:
    """A sequence's own random generator (None when greedy): seeded with cfg.seed, or from the OS."""
    if cfg.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    if cfg.seed is None:
        generator.seed()
    else:
        generator.manual_seed(cfg.seed)
    return generator


def pick(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None):
    """(tokens [B], finite [B]) from logits [B, V]: the sampler sees finite scores only; the caller reads
    `finite` with the tokens, in the step's one read of the device, and refuses a row whose scores were not."""
    finite = torch.isfinite(logits).all(dim=-1)
    return sample(torch.where(finite[:, None], logits, 0.0), cfg, generator), finite


@dataclass(frozen=True)
class Step:
    """One decode step: the token of each sequence, and which sequences had already finished before it."""

    index: int
    tokens: torch.Tensor  # [B], on the CPU
    finished: torch.Tensor  # [B] bool, after this token
    time_s: float  # since the start of prefill, taken after the token reached the CPU
    logits: torch.Tensor  # [B, V] the scores the token was chosen from, on the device
    host_syncs: int = 1  # reads of the device the step's own loop waited for (the layer calls count theirs)
    logprobs: list[TokenLogprobs | None] | None = None  # per row, with decode_stream's `logprobs`


def cache_keyword(model) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns); accept either."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_stream(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: SamplingConfig,
    eos_ids: set[int],
    pad_id: int,
    forward: Callable | None = None,
    cache=None,
    logprobs: list[int | None] | None = None,
) -> Iterator[Step]:
    """input_ids [B, P] left-padded on the model's device. Stops when every sequence has emitted an EOS.
    `forward(**inputs)` runs one forward pass (default: the model itself; the engine wraps it in its request).
    `cache`: a KV cache to fill (e.g. a StaticCache allocated up front); default: the model's own, grown on demand.
    `logprobs`: per row, None or K: each Step then carries those rows' logprobs (logprobs.py), read with the tokens."""
    device = input_ids.device
    generator = sampling_generator(cfg, device)
    eos = torch.tensor(sorted(eos_ids), device=device, dtype=torch.long) if eos_ids and not cfg.ignore_eos else None
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    # positions count real tokens only, so left padding does not shift them (as generate does)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    cache_arg = cache_keyword(model)
    forward = forward or model
    start = time.perf_counter()
    # inference mode is entered for each step, never held across a yield: between tokens the caller's code
    # (and an abandoned stream's) must run in the mode it chose
    with torch.inference_mode():
        first = {cache_arg: cache} if cache is not None else {}
        out = forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, logits_to_keep=1, **first)
    past, next_pos = getattr(out, cache_arg), position_ids[:, -1:] + 1
    for index in range(cfg.max_new_tokens):
        with torch.inference_mode():
            logits = out.logits[:, -1, :]
            # checked after the step's one read of the device; meanwhile the sampler sees finite scores only
            tokens, finite = pick(logits, cfg, generator)
            tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
            if eos is not None:
                finished = finished | torch.isin(tokens, eos)
            # the step's one read of the device: tokens, finished flags and finiteness together (and the logprobs
            # of the rows that ask)
            rows = tokens.shape[0]
            asks = logprobs or [None] * rows
            host, *values_ids = read_to_host([torch.cat([tokens, finished.long(), finite.long()]),
                                              *(on_device(logits, tokens, asks) or (None, None))])
            tokens_cpu, finished_cpu, finite_cpu = host[:rows], host[rows:2 * rows].bool(), host[2 * rows:]
            if not bool(finite_cpu.all()):  # NaN weights: no token can be read off these scores
                raise GenerationInputError(
                    f"the model produced non-finite scores (NaN or inf) at step {index}; its weights are corrupt "
                    "or overflow in this dtype: check the checkpoint, or try --dtype float32")
        yield Step(index, tokens_cpu, finished_cpu, time.perf_counter() - start, logits,
                   logprobs=per_row(*values_ids, asks) if logprobs else None)
        if bool(finished_cpu.all()) or index + 1 == cfg.max_new_tokens:
            return
        with torch.inference_mode():
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=-1)
            out = forward(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=next_pos,
                          use_cache=True, **{cache_arg: past})
        past, next_pos = getattr(out, cache_arg), next_pos + 1

