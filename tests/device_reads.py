"""A detector of the engine's reads of the device (tests/test_host_reads.py, benchmarks/count_host_reads.py).

Under a TorchFunctionMode every torch call is seen with the frame it came from. A tensor is the host's when it
was made from host data (no tensor inputs: an input, a from_numpy) or only from the host's tensors, or
returned by read_to_host; the rest are the device's. A read of a device tensor (`.tolist()`, `.cpu()`,
`.item()`, `bool()`, a data-dependent shape) from the engine's own code is "stray" unless it is
read_to_host's own, which `wrap` counts instead.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import offload_engine

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
        read = bool(inputs) and self._is_read(func, args, kwargs)
        if read and not self._is_host(inputs[0]):
            where = _engine_caller()
            if where is not None:
                self.stray.append(f"{getattr(func, '__name__', func)} at {where}")
        out = func(*args, **kwargs)
        if read or all(self._is_host(t) for t in inputs):  # what a read returns is the host's (`x.cpu()`)
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
        if tensor.layout == torch._mkldnn:  # a weight packed for oneDNN (packed_weights.py): CPU memory, no storage
            return True
        return tensor.untyped_storage().data_ptr() in self.host

    def _tag(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta and t.layout != torch._mkldnn:
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


@contextmanager
def counting_reads():
    """A DeviceReads mode around the block, with the engine's read_to_host (where it has one) counted."""
    import importlib

    mode = DeviceReads()
    patched = []
    host_read = None
    # experts/host_read.py, or host_read.py in an engine from before the subpackages; an engine from before
    # host_read.py has neither: every read is stray
    for name in ("experts.host_read", "host_read"):
        if (PACKAGE / f"{name.replace('.', '/')}.py").is_file():
            host_read = importlib.import_module(f"offload_engine.{name}")
            break
    if host_read is not None:
        counted = mode.wrap(host_read.read_to_host)
        for module in (host_read, importlib.import_module("offload_engine.generation")):
            patched.append((module, module.read_to_host))
            module.read_to_host = counted  # CallRouting.read's and the decode loop's
    try:
        with mode:
            yield mode
    finally:
        for module, original in patched:
            module.read_to_host = original
