"""The engine's run-time side of every MoE layer call: the cache, the predictor, prefetch, and the request.

One Runtime per engine. Every experts module's binding (offloaded_experts.py) forwards its calls to
Runtime.layer_call, which it was given at load, and the layer call runs offloaded_experts.py's steps. A
forward pass runs under the runtime's lock with one Request (request.py) installed; each layer call reads the
request from here. Forwards that do not come through the engine's API (a user calling
`engine.model.generate`) take the lock themselves, through hooks on the model, and run with the runtime's
own standing request (no predictions: their batch shape is unknown).
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager

import torch

from ..errors import GenerationInputError
from ..foresight import Foresight
from ..foresight.predictors.base import LayerContext, Predictor
from ..planning.cost_model import Hardware, Need, place
from ..request import Request
from .cache import ExpertCache
from .host_read import CallRouting
from .offloaded_experts import ExpertsBinding, execute, execute_on_cpu, execute_unweighted, reduce
from .packed_experts import PackedExperts

AUTO_DEPTH_LIMIT = 3  # prefetch at most this many MoE layers ahead when the depth is chosen automatically
TIME_DECAY = 0.1  # weight of the newest measurement in the running layer and load times


class Runtime:
    def __init__(self, cache: ExpertCache, num_layers: int, top_k: int, predictor: Predictor | None,
                 prefetch_depth: int | None, max_rows: int = 1, cold_experts: str = "stream",
                 cpu_moe_layers: int = 0, hardware: Hardware | None = None, packed: PackedExperts | None = None):
        """packed: the CPU experts' packed weights (packed_experts.py), None to compute them as stored."""
        self.cache, self.num_layers, self.top_k = cache, num_layers, top_k
        self.cold_experts, self.cpu_moe_layers = cold_experts, cpu_moe_layers
        self.packed = packed
        self.hardware = hardware or Hardware(parallel=cache.device.type == "cuda")
        self.expert_bytes = cache.store.expert_nbytes()
        # a quantized format expands at most this many experts at once; a call with more goes one at a time
        self.expand_limit = cache.store.format.expand_limit(top_k, max_rows) or math.inf
        self.queued_kernels = cache.device.type == "cuda"  # kernels run asynchronously, after the call returns
        self.flops_per_token = 2.0 * cache.store.spec.expert_numel()  # one multiply-add per weight
        self.predictor = predictor
        self.foresight = Foresight(predictor, cache.policy, top_k, num_layers) if predictor is not None else None
        self.prefetch_depth = prefetch_depth  # None: chosen from measured load and layer times; 0: off
        self.lock = threading.RLock()
        self.request: Request | None = None
        # admission: the memory plan holds KV cache for max_rows sequences, so no more are in flight at once
        self.max_rows = max_rows
        self._room = threading.Condition()
        self._rows_in_flight = 0
        self._rows_by_thread: dict[int, int] = {}
        self.standing = Request(rows=0, num_layers=num_layers, top_k=top_k)
        self.layer_time = 0.0  # running mean of the wall time between consecutive layer calls (decode)
        self.load_time = 0.0  # running mean of one expert's demand load
        self._last_call = 0.0

    # -- requests -------------------------------------------------------------------------------------------
    @contextmanager
    def serving(self, request: Request):
        """Run forwards for `request`: one at a time across threads, with the request's own state."""
        with self.lock:
            before, self.request = self.request, request
            try:
                yield request
            finally:
                self.request = before

    @contextmanager
    def admitted(self, rows: int):
        """Hold `rows` of the memory plan's max_batch sequences for a whole request. Another thread waits its
        turn; the same thread asking twice (two interleaved streams) would wait for itself, so it gets an error
        instead."""
        me = threading.get_ident()
        with self._room:
            while self._rows_in_flight + rows > self.max_rows:
                if self._rows_by_thread.get(me):
                    raise GenerationInputError(
                        f"this thread already has {self._rows_by_thread[me]} sequence(s) in flight and the memory "
                        f"plan holds {self.max_rows} (max_batch); finish or close the other stream first, or load "
                        "with a larger max_batch")
                self._room.wait()
            self._rows_in_flight += rows
            self._rows_by_thread[me] = self._rows_by_thread.get(me, 0) + rows
        try:
            yield
        finally:
            with self._room:
                self._rows_in_flight -= rows
                left = self._rows_by_thread.pop(me) - rows
                if left:
                    self._rows_by_thread[me] = left
                self._room.notify_all()

    def reserve(self, rows: int) -> bool:
        """Hold `rows` of max_batch if they are free now, without waiting (the serving engine thread, whose running
        batch must not stall behind another thread's generate); release() gives them back."""
        with self._room:
            if self._rows_in_flight + rows > self.max_rows:
                return False
            self._rows_in_flight += rows
            return True

    def release(self, rows: int) -> None:
        with self._room:
            self._rows_in_flight -= rows
            self._room.notify_all()

    def current(self) -> Request:
        return self.request if self.request is not None else self.standing

    def capture_residual(self, layer_pos: int, residual: torch.Tensor) -> None:
        """The residual stream entering a MoE block (a hook on its post-attention norm)."""
        request = self.current()
        if request.wants_residual or (self.predictor is not None and self.predictor.needs_residual):
            request.residuals[layer_pos] = residual

    # -- one layer call -------------------------------------------------------------------------------------
    def layer_call(self, binding: ExpertsBinding, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
        # T=tokens, k=active experts per token, H=hidden
        request, cache, layer = self.current(), self.cache, binding.layer_pos
        residual = request.residuals.pop(layer, None)  # this layer's only: no layer's [B, T, H] outlives its call
        if request.recorder is not None:
            request.recorder.record(layer, top_k_index, top_k_weights, residual)
        rows = request.rows
        tracked = self.foresight is not None and rows and top_k_index.shape[0] % rows == 0  # the paths follow it
        newest = last_positions(residual, rows) if tracked and residual is not None else None  # [rows, H]
        routing = self._read(request, layer, hidden_states, top_k_index, newest)
        experts = routing.experts
        context = self._observe(request, layer, routing, newest) if tracked else None
        on_cpu = self._place(layer, routing)
        if on_cpu:
            return self._hybrid(binding, request, layer, routing, on_cpu, hidden_states, top_k_weights, context)
        if len(experts) <= min(cache.num_slots, self.expand_limit):
            loaded = self._loads(request, layer)
            slots = cache.fetch(layer, experts, request.counters)
            self._time_loads(request, layer, loaded)
            # prefetch where it overlaps this call's compute: on CUDA after the kernels are queued (issued
            # first, its copies would delay them); on the CPU, whose kernels run here, before them
            if context is not None and not self.queued_kernels:
                self._look_ahead(request, context, experts)
            out = execute(binding, cache, routing, slots, hidden_states, top_k_weights)
            cache.used(slots)
            if context is not None and self.queued_kernels:
                self._look_ahead(request, context, experts)
            return out
        # more experts than slots: a group at a time, each expert with unit weights, then one reduction
        contributions = hidden_states.new_zeros((*top_k_index.shape, hidden_states.shape[-1]))
        self._in_groups(binding, request, layer, routing, experts, hidden_states, contributions)
        return reduce(binding, contributions, routing, top_k_weights, hidden_states.dtype)

    def _read(self, request: Request, layer: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
              newest: torch.Tensor | None) -> CallRouting:
        """The call's one read of the device (host_read.py): the routing, the predictor's device-side work for
        this call (from `newest`, each row's newest residual), and the hidden states where experts may be
        computed on the CPU."""
        staged = None
        if newest is not None:
            start = time.perf_counter()
            staged = self.foresight.stage(layer, newest)
            request.counters[layer].predict_s += time.perf_counter() - start
        cpu_possible = layer < self.cpu_moe_layers or self.cold_experts != "stream"
        routing = CallRouting.read(top_k_index, staged, hidden_states if cpu_possible else None)
        request.counters[layer].host_syncs += 1
        return routing

    def _in_groups(self, binding: ExpertsBinding, request: Request, layer: int, routing: CallRouting,
                   experts: list[int], hidden_states: torch.Tensor, contributions: torch.Tensor,
                   after_last_fetch=None) -> None:
        """The device's experts of a call, as many at a time as there are slots, each with unit weights into
        contributions [T, k, H]. `after_last_fetch` runs once the last group is staged: every group's fetch
        tells the policy of a call of this layer, and a prediction of the layer's own next call made before
        the last of them would be graded against this call."""
        cache = self.cache
        if not experts:  # every expert of the call on the CPU (a cache of no slots among them)
            return
        for start in range(0, len(experts), cache.num_slots):
            group = experts[start:start + cache.num_slots]
            slots = cache.fetch(layer, group, request.counters)
            if start + cache.num_slots >= len(experts) and after_last_fetch is not None:
                after_last_fetch()
            execute_unweighted(binding, cache, routing, group, slots, hidden_states, contributions)
            cache.used(slots)

    def _place(self, layer: int, routing: CallRouting) -> set[int]:
        """The experts of this call computed on the CPU: all of a --cpu-moe-layers layer's; the cold ones with
        --cold-experts cpu; with auto, the cost model's choice (cost_model.place)."""
        experts = routing.experts
        if layer < self.cpu_moe_layers:
            return set(experts)
        if self.cold_experts == "stream":
            return set()
        slot_of = self.cache.slot_of
        cold = [e for e in experts if (layer, e) not in slot_of]
        if not cold or self.cold_experts == "cpu":
            return set(cold)
        counts = routing.counts().tolist()
        needs = [Need(e, counts[e], e not in cold, self.cache.policy.reuse((layer, e))) for e in experts]
        return place(needs, self.expert_bytes, self.flops_per_token, self.hardware)

    def _hybrid(self, binding: ExpertsBinding, request: Request, layer: int, routing: CallRouting, on_cpu: set[int],
                hidden_states: torch.Tensor, top_k_weights: torch.Tensor,
                context: LayerContext | None) -> torch.Tensor:
        """Some experts on the device (resident, or copied into slots), the rest on the CPU from host memory;
        every expert with unit weights into [T, k, H] contributions, reduced once as the reference does. The
        device's kernels are queued first (asynchronous on CUDA) and the CPU experts read the hidden states
        already on the host, so the CPU works while the device's kernels run."""
        experts = routing.experts
        contributions = hidden_states.new_zeros((*routing.ids.shape, hidden_states.shape[-1]))
        on_device = [e for e in experts if e not in on_cpu]
        look_ahead = None if context is None else \
            (lambda: self._look_ahead(request, context, experts))
        self._in_groups(binding, request, layer, routing, on_device, hidden_states, contributions, look_ahead)
        if look_ahead is not None and not on_device:
            look_ahead()
        start = time.perf_counter()
        packed_before = self.packed.experts if self.packed is not None else 0
        execute_on_cpu(binding, self.cache.store, layer, routing, sorted(on_cpu), contributions, self.packed)
        c = request.counters[layer]
        c.cpu_experts += len(on_cpu)
        c.cpu_packed += (self.packed.experts if self.packed is not None else 0) - packed_before
        c.cpu_s += time.perf_counter() - start
        return reduce(binding, contributions, routing, top_k_weights, hidden_states.dtype)

    def _observe(self, request: Request, layer: int, routing: CallRouting,
                 newest: torch.Tensor | None) -> LayerContext | None:
        """Record the call's routing in the request's paths (a call of whole rows); a decode call (one token per
        row) gets a context for predictions. A prefill's last position per row becomes the history its first
        decode step sees."""
        rows, ids = request.rows, routing.ids
        start = time.perf_counter()
        decode = ids.shape[0] == rows
        last = ids if decode else ids.reshape(rows, -1, ids.shape[-1])[:, -1]
        context = self.foresight.observe(request.paths, layer, last, newest, routing.staged)
        request.counters[layer].predict_s += time.perf_counter() - start
        return context if decode else None

    def _look_ahead(self, request: Request, context: LayerContext, experts: list[int]) -> None:
        """Predict the next layers' experts: the policy learns of them, and the nearest are loaded now (never in
        place of `experts`, the call's own)."""
        start = time.perf_counter()
        wanted = self.foresight.look_ahead(context)  # always its whole horizon: a replay must see the same
        request.counters[context.layer].predict_s += time.perf_counter() - start
        depth = self.depth()
        if depth:
            resident = self.cache.slot_of  # most predicted experts are resident already: skip them here, cheaply
            # a --cpu-moe-layers layer's experts never take a slot: none is prefetched into one
            keys = [key for d, layer, predicted in wanted if d <= depth and layer >= self.cpu_moe_layers
                    for e in predicted.tolist() if (key := (layer, e)) not in resident]
            if keys:  # the call's own experts as keys only now (never, with every expert resident)
                self.cache.prefetch(keys, {(context.layer, e) for e in experts}, request.counters)

    def depth(self) -> int:
        """Prefetch depth: as set, or enough layers ahead that a call's misses can load while the layers
        before it compute (measured: one expert's load time against one layer's time)."""
        if self.prefetch_depth is not None:
            return self.prefetch_depth
        if self.layer_time <= 0:
            return 1
        return max(1, min(AUTO_DEPTH_LIMIT, math.ceil(self.top_k * self.load_time / self.layer_time)))

    def _loads(self, request: Request, layer: int) -> tuple[float, int]:
        c = request.counters[layer]
        now = time.perf_counter()
        if self._last_call:
            gap = now - self._last_call
            self.layer_time += TIME_DECAY * (gap - self.layer_time) if self.layer_time else gap
        self._last_call = now
        return c.copy_s, c.misses

    def _time_loads(self, request: Request, layer: int, before: tuple[float, int]) -> None:
        c = request.counters[layer]
        loads = c.misses - before[1]
        if self.cache.loader.timed_by_events:  # CUDA copies are asynchronous: timed by their events
            self.load_time = self.cache.copy_time
        elif loads:
            per_expert = (c.copy_s - before[0]) / loads
            self.load_time += TIME_DECAY * (per_expert - self.load_time) if self.load_time else per_expert


def last_positions(residual: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, H]: each row's newest position of a call's residual stream ([rows * T, H] or [rows, T, H])."""
    if residual.dim() == 3 and residual.shape[0] == rows:  # [rows, T, H], the usual case: one view, not two
        return residual[:, -1]
    return residual.reshape(rows, -1, residual.shape[-1])[:, -1]
