"""The peak of the bytes held by tensors created in a block: what a device allocator must hold for it.

Every tensor an operation returns is seen under a TorchDispatchMode; its storage's bytes count from then
until the storage is freed (a finalizer on the storage, which PyTorch keeps alive exactly as long as the
storage itself). Views and in-place results share a storage and count once. Used on the CPU to measure the
working memory a forward really needs, against the memory plan's estimate (tests/test_working_memory.py,
benchmarks/measure_working_memory.py).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if _dense(a)}
        for t in tree_flatten(out)[0]:  # an in-place result or a view of an input holds no new bytes
            if _dense(t) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in inputs:
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        nbytes = storage.nbytes()
        if not nbytes or key in self._tracked:
            return
        self._tracked.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, nbytes)

    def _freed(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


def _dense(a) -> bool:
    """A tensor with a storage (a weight packed for oneDNN, packed_weights.py, has none: it is never created in
    the block, only read)."""
    return isinstance(a, torch.Tensor) and a.layout != torch._mkldnn
