"""The engine reads the device once per MoE layer call and once per decode step, whatever the policy, the
predictor, the cold-expert mode or the cache size: no other `.tolist()`, `.cpu()`, `.item()`, `bool()` or
data-dependent shape (`torch.where(mask)`, `unique`, `nonzero`) in the engine's own code touches a tensor the
model computed. On CUDA each of those would be a wait for the device (tests/test_gpu.py checks the same
count there under torch.cuda.set_sync_debug_mode); here a TorchFunctionMode sees every such call and the
frame it came from.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import offload_engine
import offload_engine.host_read as host_read
from offload_engine import DEFAULT_MODEL, OffloadEngine
from tiny_models import build_reference, save_checkpoint

PACKAGE = Path(offload_engine.__file__).resolve().parent
T = torch.Tensor
READS = {T.tolist, T.numpy, T.item, T.cpu, T.__bool__, T.__int__, T.__float__, T.__index__, T.nonzero, torch.nonzero,
         T.unique, torch.unique, torch.masked_select, T.masked_select}


class DeviceReads(TorchFunctionMode):
    """Counts read_to_host's calls, and every other read, by the engine's own code, of a tensor the model
    computed. A tensor is the host's when it was made from host data (no tensor inputs: an input, a
    from_numpy) or only from the host's tensors, or returned by read_to_host; the rest are the device's."""

    def __init__(self):
        super().__init__()
        self.host: dict[int, torch.Tensor] = {}  # storage address -> a tensor holding it (kept: never reused)
        self.reads = 0
        self.stray: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if inputs and self._is_read(func, args, kwargs) and not self._is_host(inputs[0]):
            where = _engine_caller()
            if where is not None:
                self.stray.append(f"{getattr(func, '__name__', func)} at {where}")
        out = func(*args, **kwargs)
        if all(self._is_host(t) for t in inputs):
            self._tag(out)
        return out

    @staticmethod
    def _is_read(func, args, kwargs) -> bool:
        if func in READS:
            return True
        if func in (torch.where, T.where) and len(args) + len(kwargs) == 1:
            return True
        if func is T.__getitem__ and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool:
            return True
        if func is T.to:  # `.to("cpu")`, the idiom of a read; `.to(device)` here is the other way (on CUDA:
            # host to device, queued), indistinguishable on a CPU run: the GPU test counts those
            target = args[1] if len(args) > 1 else kwargs.get("device")
            return isinstance(target, str) and target.startswith("cpu")
        return False

    def _is_host(self, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage().data_ptr() in self.host

    def _tag(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.host[t.untyped_storage().data_ptr()] = t

    def wrap(self, read_to_host):
        def counted(tensors):
            self.reads += 1
            out = read_to_host(tensors)  # its own calls are in host_read.py: the read being counted
            self._tag(out)
            return out
        return counted


def _engine_caller() -> str | None:
    """The engine frame (outside host_read.py) that made the call, if the nearest frame outside torch is one."""
    frame = sys._getframe(2)
    while frame is not None and "/torch/" in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return None
    path = Path(frame.f_code.co_filename).resolve()
    if PACKAGE in path.parents and path.name != "host_read.py":
        return f"{path.name}:{frame.f_lineno}"
    return None


def _decode_reads(monkeypatch, engine, prompts, tokens=5):
    mode = DeviceReads()
    counted = mode.wrap(host_read.read_to_host)
    monkeypatch.setattr(host_read, "read_to_host", counted)  # CallRouting.read's
    monkeypatch.setattr(sys.modules["offload_engine.generation"], "read_to_host", counted)  # the decode loop's
    with mode:
        results = engine.generate(prompts, max_new_tokens=tokens, ignore_eos=True)
    stats = (results[0] if isinstance(results, list) else results).stats
    return mode, stats


CONFIGS = [  # (slots, policy, predictor, cold experts)
    (None, "lru", "none", "stream"),
    (12, "lru", "none", "stream"),
    (12, "predictive", "next-gate", "stream"),
    (12, "predictive", "history", "stream"),
    (12, "predictive", "learned", "stream"),
    (12, "lru", "none", "cpu"),
    (12, "predictive", "next-gate", "auto"),
    (4, "predictive", "learned", "cpu"),
]


@pytest.mark.parametrize("slots,policy,predictor,cold", CONFIGS)
def test_one_read_per_layer_call_and_per_step(monkeypatch, slots, policy, predictor, cold):
    tokens = 5
    with OffloadEngine.from_pretrained(DEFAULT_MODEL, expert_slots=slots, policy=policy, predictor=predictor,
                                       cold_experts=cold, prefetch_depth=None if predictor == "none" else 2,
                                       progress=False) as engine:
        mode, stats = _decode_reads(monkeypatch, engine, "The history of", tokens)
        layers = engine.spec.num_moe_layers
    assert mode.stray == []
    # prefill and tokens - 1 decode forwards, each a read per MoE layer; one read per step for its tokens
    assert mode.reads == tokens * (layers + 1)
    assert stats.host_syncs == mode.reads
    assert sum(layer["host_syncs"] for layer in stats.per_layer) == tokens * layers


def test_split_calls_and_a_batch_read_once_per_layer(monkeypatch, tmp_path):
    """More experts than slots (groups, each expert on its own tokens) and CPU experts, batch 2, eager
    experts (the reference's own loop, reduced expert by expert): still one read per call."""
    path = save_checkpoint(build_reference("mixtral"), tmp_path / "m", "per_expert")
    with OffloadEngine.from_pretrained(path, dtype="float32", expert_slots=2, max_batch=2, policy="predictive",
                                       predictor="history", cold_experts="auto", progress=False) as engine:
        mode, stats = _decode_reads(monkeypatch, engine, [[3, 4, 5], [9, 8]], tokens=4)
        layers = engine.spec.num_moe_layers
    assert mode.stray == []
    assert mode.reads == stats.host_syncs == 4 * (layers + 1)


def test_the_check_sees_a_stray_read(monkeypatch):
    """The check itself: a `.tolist()` of the routing planted in the runtime's own file is caught, and the
    counts still add up (the planted read is not read_to_host's)."""
    from offload_engine import runtime as runtime_module

    planted = {"original": runtime_module.Runtime.layer_call}
    source = ("def layer_call(self, binding, hidden_states, top_k_index, top_k_weights):\n"
              "    top_k_index.tolist()\n"
              "    return original(self, binding, hidden_states, top_k_index, top_k_weights)\n")
    exec(compile(source, runtime_module.__file__, "exec"), planted)  # its frames are the runtime's file
    monkeypatch.setattr(runtime_module.Runtime, "layer_call", planted["layer_call"])
    with OffloadEngine.from_pretrained(DEFAULT_MODEL, expert_slots=12, progress=False) as engine:
        mode, stats = _decode_reads(monkeypatch, engine, "The", 2)
        layers = engine.spec.num_moe_layers
    assert len(mode.stray) == 2 * layers and all(s.startswith("tolist at runtime.py") for s in mode.stray)
    assert mode.reads == stats.host_syncs == 2 * (layers + 1)
