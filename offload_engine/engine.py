"""OffloadEngine: the Python API. Load a checkpoint under a memory budget, then generate or stream.

>>> engine = OffloadEngine.from_pretrained("path/to/moe", memory_budget="6GiB")   # doctest: +SKIP
>>> result = engine.generate("The capital of France is", max_new_tokens=16)      # doctest: +SKIP
>>> result.text, result.stats.hit_rate                                            # doctest: +SKIP
"""

from __future__ import annotations

import numbers
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .detokenizer import IncrementalDetokenizer
from .errors import CheckpointError, GenerationInputError
from .generation import SamplingConfig, decode_stream
from .loading import Inspected, inspect_checkpoint, load, make_plan, settle_threads
from .planning.memory_plan import MemoryPlan, kv_bytes_per_token, kv_head_dims
from .request import Request, RoutingRecorder
from .run_config import RunConfig
from .serving.row_cache import fits as row_cache_fits
from .tracing.recording import generation_trace
from .tracing.trace_file import RoutingTrace

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    hits: int  # needed experts resident or already arriving when their layer call started
    misses: int  # loads a layer call had to start itself (demand loads)
    prefetches: int  # loads started ahead of the call that needs them
    prefetch_hits: int  # prefetched experts used before their eviction
    prefetches_dropped: int  # queued prefetches the routing proved wrong before they started (never moved)
    bytes_to_device: int  # all loads, demand and prefetch
    evictions: int
    stall_s: float  # time layer calls waited for their experts
    copy_s: float  # time spent copying experts into slots (CUDA: measured with events, off the host's clock)
    cpu_experts: int  # experts computed on the CPU where they lie (--cold-experts cpu/auto, --cpu-moe-layers)
    cpu_s: float  # time spent computing them
    cpu_packed: int  # of them, packed for oneDNN at their first call (each then holds its bytes in RAM)
    predict_s: float  # time the routing predictor took
    host_syncs: int  # reads of the device the host waited for: one per MoE layer call, one per decode step
    ttft_s: float  # prefill and first token
    decode_tokens_per_s: float  # tokens after the first, per second of decoding (prefill excluded)
    peak_device_bytes: int  # CUDA: max_memory_allocated; CPU: the engine's accounted tensors (see README)
    per_layer: tuple[dict, ...] = ()  # the same counters for each MoE layer position

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "per_layer": [dict(c) for c in self.per_layer], "hit_rate": self.hit_rate}


@dataclass(frozen=True)
class TokenEvent:
    """One step of a stream: each sequence's new token and the text it completed (batch order)."""

    index: int
    token_ids: tuple[int, ...]
    texts: tuple[str, ...]
    finished: tuple[bool, ...]
    stats: GenerationStats | None = None  # set on the last event only
    logprobs: tuple | None = None  # per row, a logprobs.TokenLogprobs or None: with _stream's `logprobs` only

    @property
    def token_id(self) -> int:
        return self.token_ids[0]

    @property
    def text(self) -> str:
        return self.texts[0]


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # generated tokens only (an EOS that ended the sequence included)
    stats: GenerationStats
    trace: RoutingTrace | None = None  # with record_trace=True: the batch's routing (prompt and fed-back tokens)


class OffloadEngine:
    def __init__(self, inspected: Inspected, run: RunConfig, plan: MemoryPlan, tokenizer=None):
        self.run, self.plan, self.spec = run, plan, inspected.spec
        self.directory: Path = inspected.directory
        self.config = inspected.config
        self.model, self.store, self.runtime = load(inspected, run, plan)
        self.cache = self.runtime.cache
        self.tokenizer = tokenizer
        # submit's engine thread batches continuously where every layer's KV cache is a standard full-attention
        # one (serving/row_cache.py); otherwise in static batches (serving/scheduler.py)
        self.continuous_batching = row_cache_fits(self.model)
        self._scheduler = None  # submit's engine thread, started on the first submit
        self._scheduler_lock = threading.Lock()

    def close(self) -> None:
        """Stop submit's engine thread (waiting requests fail, the running batch is cancelled), finish loads in
        flight, stop the prefetch thread, unlock pinned host memory and drop packed CPU experts. The engine can still
        generate afterwards (the threads restart on demand, experts are packed again), but pinned copies become
        synchronous."""
        with self._scheduler_lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.close()
        self.cache.drain()
        self.cache.close()
        self.store.close()
        if self.runtime.packed is not None:
            self.runtime.packed.clear()

    def __enter__(self) -> "OffloadEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        memory_budget: str | int | None = None,
        expert_slots: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        host_memory: str | None = None,
        max_context: int | None = None,
        max_batch: int = 1,
        policy: str = "lru",
        predictor: str = "none",
        prefetch_depth: int | None = None,
        cold_experts: str = "stream",
        cpu_moe_layers: int = 0,
        threads: int | None = None,
        hardware: dict | None = None,
        progress: bool = True,
        cpu_threads: int | None = None,
        expert_dtype: str = "auto",
        cpu_weights: str = "packed",
    ) -> "OffloadEngine":
        """threads: compute threads (default: the usable cores less one); cpu_threads: its former name;
        expert_dtype: "auto" (as stored) or "int8" or "int4" to quantize an unquantized checkpoint's experts at load (weight-only;
        the output is then no longer transformers' own, see BENCHMARKS.md for what it costs); cpu_weights: "packed"
        (the weights of the products that run on the CPU, the CPU experts' and on a CPU device the model's own
        linear layers, are packed once for oneDNN where that gives the same bits: packed_weights.py) or "stored"
        (computed from the weights as stored)."""
        run = RunConfig.build(
            device=device, dtype=dtype, memory_budget=memory_budget, expert_slots=expert_slots,
            host_memory=host_memory, max_context=max_context, max_batch=max_batch, policy=policy,
            predictor=predictor, prefetch_depth=prefetch_depth, cold_experts=cold_experts,
            cpu_moe_layers=cpu_moe_layers, threads=threads, hardware=hardware, progress=progress,
            cpu_threads=cpu_threads, expert_dtype=expert_dtype, cpu_weights=cpu_weights)
        return cls.from_run_config(name_or_path, run)

    @classmethod
    def from_run_config(cls, name_or_path: str | Path, run: RunConfig) -> "OffloadEngine":
        inspected = inspect_checkpoint(name_or_path, run)
        run = settle_threads(inspected, run)
        plan = make_plan(inspected, run)
        return cls(inspected, run, plan, load_tokenizer(inspected.directory))

    # -- prompts ------------------------------------------------------------------------------------------
    def _encode(self, prompt: str | Sequence[int], chat: bool) -> list[int]:
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates, e.g. from undecodable bytes on a command line
                raise GenerationInputError(f"the prompt is not valid text (character {e.start} cannot be encoded as "
                                           "UTF-8); pass UTF-8 text") from None
            _check_tokenizer(self.tokenizer, self.directory, chat)
            if chat:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                         add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            else:
                ids = self.tokenizer(prompt)["input_ids"]
        else:
            if chat:
                raise GenerationInputError("chat=True needs a text prompt; token ids are used as they are")
            ids = _token_ids(prompt)
        if not ids:
            raise GenerationInputError("the prompt is empty; give at least one token")
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise GenerationInputError(f"token id {bad[0]} is outside the vocabulary (0..{self.spec.vocab_size - 1})")
        return list(ids)

    def _prompts(self, prompt, chat: bool, max_new_tokens: int) -> list[list[int]]:
        """Encode one prompt or a batch of them, and check them against the model and the memory plan."""
        if not isinstance(chat, bool):
            raise GenerationInputError(f"chat must be True or False, not {chat!r}")
        encoded = [self._encode(p, chat) for p in (list(prompt) if _is_batch(prompt) else [prompt])]
        longest = max(len(ids) for ids in encoded)
        needed = longest + max_new_tokens
        if self.spec.max_position_embeddings and needed > self.spec.max_position_embeddings:
            raise GenerationInputError(
                f"prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's context of "
                f"{self.spec.max_position_embeddings} tokens; shorten the prompt or lower max_new_tokens"
            )
        if needed > self.plan.max_context:
            raise GenerationInputError(
                f"prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the {self.plan.max_context} "
                "tokens the memory plan reserved KV cache for; load with a larger max_context (--max-context)"
            )
        if len(encoded) > self.run.max_batch:
            raise GenerationInputError(
                f"{len(encoded)} prompts exceed the batch of {self.run.max_batch} the memory plan reserved; "
                "load with max_batch (--max-batch) at least that large"
            )
        return encoded

    def _padded(self, encoded: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left padding, as generate does: every sequence ends at the last column."""
        longest = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), longest), self.pad_id(), dtype=torch.long)
        mask = torch.zeros((len(encoded), longest), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, longest - len(ids):] = torch.tensor(ids)
            mask[row, longest - len(ids):] = 1
        return input_ids.to(self.run.device), mask.to(self.run.device)

    def eos_ids(self) -> set[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        if ids is None:
            ids = getattr(self.config, "eos_token_id", None)
        if ids is None and self.tokenizer is not None:
            ids = self.tokenizer.eos_token_id
        return set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])

    def pad_id(self) -> int:
        for value in (getattr(self.config, "pad_token_id", None),
                      getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None,
                      *sorted(self.eos_ids())):
            if value is not None:
                return int(value)
        return 0

    # -- generation ---------------------------------------------------------------------------------------
    def stream(
        self,
        prompt,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        chat: bool = False,
        ignore_eos: bool = False,
    ) -> Iterator[TokenEvent]:
        """Yield each step's tokens as they are produced; the last event carries the stats.

        `prompt`: a string, a list of token ids, or a list of either (a padded batch).
        """
        cfg = SamplingConfig(max_new_tokens, temperature, top_p, top_k, seed, ignore_eos)
        yield from self._stream(self._prompts(prompt, chat, max_new_tokens), cfg)

    def generate(
        self,
        prompt,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        chat: bool = False,
        ignore_eos: bool = False,
        record_trace: bool = False,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (a string or token ids), or for a list of prompts as one padded batch."""
        cfg = SamplingConfig(max_new_tokens, temperature, top_p, top_k, seed, ignore_eos)
        if not isinstance(record_trace, bool):
            raise GenerationInputError(f"record_trace must be True or False, not {record_trace!r}")
        encoded = self._prompts(prompt, chat, max_new_tokens)
        recorder = RoutingRecorder() if record_trace else None
        rows: list[list[int]] = [[] for _ in encoded]
        finished_before = [False] * len(encoded)
        stats = None
        for event in self._stream(encoded, cfg, recorder):
            for row, token, done in zip(rows, event.token_ids, finished_before):
                if not done:
                    row.append(token)
            finished_before, stats = event.finished, event.stats
        trace = None
        if recorder is not None:
            trace = generation_trace(recorder, encoded, rows, self.spec.num_experts, self.spec.moe_layers,
                                     self.directory.name)
        results = [GenerationResult(self._decode(ids), ids, stats, trace) for ids in rows]
        return results if _is_batch(prompt) else results[0]

    def submit(
        self,
        prompt,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        chat: bool = False,
        ignore_eos: bool = False,
        stop: Sequence[str] = (),
        logprobs: int | None = None,
        stall_timeout: float | None = None,
    ):
        """Queue one prompt for the engine's own generation thread and return its Handle at once (from any
        thread): iterate it for the text as it comes, `result()` for the whole completion, `cancel()` to give
        up. `stop`: strings that end the completion where the text first contains one (cut before it).
        `logprobs`: None, or K (0..20): each piece carries its token's logprob (log_softmax of the raw logits,
        before temperature and top-p) and the K most likely tokens' ({id: logprob}). `stall_timeout`: None, or
        seconds: a request whose pieces wait while its reader has taken none for that long is cancelled, finishing
        "stalled" (a reader that stopped reading no longer holds its row; one waiting in result() never is).
        Requests share the running batch, up to max_batch rows, joining between decode steps (static padded
        batches for models whose cache does not allow it: serving/scheduler.py)."""
        from .serving.scheduler import Scheduler

        with self._scheduler_lock:
            if self._scheduler is None:
                self._scheduler = Scheduler(self)
            scheduler = self._scheduler
        return scheduler.submit(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, chat=chat, ignore_eos=ignore_eos, stop=stop, logprobs=logprobs,
                                stall_timeout=stall_timeout)

    def request(self, rows: int, recorder: RoutingRecorder | None = None) -> Request:
        """A new request's own state: counters, routing history, recorder."""
        return Request(rows, self.spec.num_moe_layers, self.spec.top_k, recorder=recorder)

    def forward(self, request: Request, **inputs):
        """One forward pass of the model for `request` (one at a time across threads)."""
        with self.runtime.serving(request):
            return self.model(**inputs)

    def _stream(self, encoded: list[list[int]], cfg: SamplingConfig, recorder: RoutingRecorder | None = None,
                request: Request | None = None, logprobs: list[int | None] | None = None) -> Iterator[TokenEvent]:
        """`request`: the batch's state, when the caller reads its counters before the last event (submit's);
        `logprobs`: per row, None or the top alternatives to return with each token (decode_stream's)."""
        with self.runtime.admitted(len(encoded)):
            yield from self._steps(encoded, cfg, recorder, request, logprobs)

    def _steps(self, encoded: list[list[int]], cfg: SamplingConfig, recorder,
               request: Request | None = None, logprobs: list[int | None] | None = None) -> Iterator[TokenEvent]:
        input_ids, mask = self._padded(encoded)
        deltas = [IncrementalDetokenizer(self.tokenizer) for _ in encoded]
        request = request if request is not None else self.request(len(encoded), recorder)
        cuda = self.run.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.run.device)
        first = None
        done = [False] * len(encoded)
        count = count_first = step_syncs = 0
        steps = decode_stream(self.model, input_ids, mask, cfg, self.eos_ids(), self.pad_id(),
                              forward=lambda **inputs: self.forward(request, **inputs),
                              cache=self._kv_cache(len(encoded)) if cuda else None, logprobs=logprobs)
        for step in steps:
            first = step.time_s if first is None else first
            step_syncs += step.host_syncs
            tokens = step.tokens.tolist()
            finished = tuple(step.finished.tolist())
            last = step.index + 1 == cfg.max_new_tokens
            # a sequence's last token also brings the text held back for an unfinished character
            texts = tuple("" if was_done else d.push(t, last=last or ends)
                          for d, t, was_done, ends in zip(deltas, tokens, done, finished))
            count += sum(not was_done for was_done in done)
            count_first = count_first if step.index else count
            stats = None
            if all(finished) or last:
                stats = self._stats(request, encoded, count, count_first, first, step.time_s, step.index + 1, cuda,
                                    step_syncs)
            yield TokenEvent(step.index, tuple(tokens), texts, finished, stats,
                             tuple(step.logprobs) if step.logprobs is not None else None)
            done = list(finished)

    def _kv_cache(self, rows: int):
        """On CUDA the KV cache is allocated whole, before the first token, to the planned context: it cannot
        grow past the memory plan mid-generation. Models with a cache of their own (MiniMax's) keep it."""
        if not getattr(self.model, "_can_compile_fullgraph", False):
            return None
        return static_kv_cache(self.model.config, rows, self.plan.max_context, self.store.dtype, self.run.device)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def _stats(self, request, encoded, generated, generated_first, first, last, steps, cuda,
               step_syncs) -> GenerationStats:
        delta = self.cache.stats(request.counters)
        decode_s = (last - first) if last is not None and first is not None else 0.0
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.run.device)
        else:
            tokens = max(len(e) for e in encoded) + steps
            kv = kv_bytes_per_token(self.config, self.store.dtype) * tokens * len(encoded)
            peak = self.plan.non_expert_bytes + self.cache.nbytes + kv
            if self.plan.experts_packed and self.runtime.packed is not None:  # the slots' stand-in
                peak += self.runtime.packed.bytes
        return GenerationStats(
            prompt_tokens=sum(len(e) for e in encoded),
            generated_tokens=generated,
            hits=delta.hits,
            misses=delta.misses,
            prefetches=delta.prefetches,
            prefetch_hits=delta.prefetch_hits,
            prefetches_dropped=delta.prefetches_dropped,
            bytes_to_device=delta.bytes_to_device,
            evictions=delta.evictions,
            stall_s=delta.stall_s,
            copy_s=delta.copy_s,
            cpu_experts=delta.cpu_experts,
            cpu_s=delta.cpu_s,
            cpu_packed=delta.cpu_packed,
            predict_s=delta.predict_s,
            host_syncs=delta.host_syncs + step_syncs,
            ttft_s=first or 0.0,
            decode_tokens_per_s=(generated - generated_first) / decode_s if decode_s > 0 else 0.0,
            peak_device_bytes=int(peak),
            per_layer=tuple(asdict(c) for c in delta.per_layer),
        )


def _is_batch(prompt) -> bool:
    """A list of strings or of token-id lists is a batch; a list of ids (any integer type) is one prompt."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and isinstance(prompt[0], (str, list, tuple, np.ndarray, torch.Tensor)))


def _token_ids(prompt) -> list[int]:
    """A prompt of token ids: a list, tuple, numpy array or tensor of integers (never floats or booleans)."""
    if isinstance(prompt, (np.ndarray, torch.Tensor)):
        if prompt.ndim != 1 or prompt.dtype in (torch.bool, np.bool_) or not (
                np.issubdtype(prompt.dtype, np.integer) if isinstance(prompt, np.ndarray) else not prompt.is_floating_point()):
            raise GenerationInputError(f"token ids must be a 1-d array of integers, not {prompt.dtype} "
                                       f"with shape {tuple(prompt.shape)}")
        return [int(t) for t in prompt.tolist()]
    if not isinstance(prompt, (list, tuple)):
        raise GenerationInputError(f"the prompt must be a string, a list of token ids or a list of prompts, "
                                   f"not {type(prompt).__name__}")
    bad = next((t for t in prompt if not isinstance(t, numbers.Integral) or isinstance(t, bool)), None)
    if bad is not None:
        raise GenerationInputError(f"token ids must be integers, not {bad!r} ({type(bad).__name__})")
    return [int(t) for t in prompt]


def static_kv_cache(config, rows: int, max_context: int, dtype: torch.dtype, device: torch.device):
    """transformers' StaticCache with every layer's keys and values allocated now (it would allocate them
    inside the first forward, amid prefill's activations): [rows, kv heads, max_context (or the sliding
    window), head dim] each, as memory_plan.kv_bytes_per_token counts them."""
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=max_context)
    heads, k_dim, v_dim = kv_head_dims(config)
    for layer in cache.layers:
        if layer.supports_early_init and not layer.is_initialized:
            layer.lazy_initialization(torch.empty((rows, heads, 0, k_dim), dtype=dtype, device=device),
                                      torch.empty((rows, heads, 0, v_dim), dtype=dtype, device=device))
    return cache


def _check_tokenizer(tokenizer, directory: Path, chat: bool) -> None:
    if tokenizer is None:
        raise GenerationInputError(f"{directory} has no tokenizer, so text prompts cannot be encoded; pass token ids "
                                   "or add the tokenizer files to the model directory")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise GenerationInputError("this tokenizer has no chat template; drop --chat / chat=True")


def check_chat_prompt(name_or_path: str | Path) -> None:
    """Refuse a chat prompt for a model whose tokenizer cannot make one (none, or no chat template), from the
    tokenizer alone: before the weights load, not after."""
    from .checkpoint.directory import resolve_checkpoint

    directory = resolve_checkpoint(name_or_path)
    _check_tokenizer(load_tokenizer(directory), directory, chat=True)


def load_tokenizer(directory: Path):
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # the tokenizers library raises a bare Exception for some malformed files
        raise CheckpointError(f"the tokenizer files in {directory} cannot be loaded ({str(e).splitlines()[0]})") from None
