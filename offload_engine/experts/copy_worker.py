"""Compiled expert copies into CPU slots, and a copy thread that never takes the GIL.

A Python thread pool costs the decode far more than its copies on a small CPU machine: every task wakes the
worker (a futex; on a virtual machine an inter-processor interrupt) and the worker's Python then contends
for the GIL with the decode's own Python between torch ops. Measured on the 2-core VM (BENCHMARKS.md): pool
tasks that copied *nothing* still cost the decode about as much as the stalls prefetch saved. This worker is
one compiled loop (numba, nogil) that polls a ring of copy tasks: the caller writes task rows and bumps a
counter; the loop copies and bumps the done counter. No lock, no wake-up, no GIL. Between tasks it polls,
first yielding the CPU, then napping on a timer (a spinning thread would take a core from torch's threads);
after about two seconds with nothing to do it exits, and the next post starts it again.

A task is one contiguous run of bytes: from host memory (memcpy) or from a file at an offset (pread, through
the page cache: no pages of the file are mapped into the process, so nothing has to be dropped afterwards and
a file truncated under us gives a short read, not a SIGBUS). A file task may instead bypass the page cache
(the direct tier, for models larger than RAM): HOW=DIRECT reads whole aligned blocks with O_DIRECT into the
thread's own aligned scratch buffer and copies the wanted bytes out of it; HOW=DROP reads through the page
cache and then tells the kernel to drop those pages (POSIX_FADV_DONTNEED), where O_DIRECT is refused. After the first failed task every later one
fails too (the file is damaged: the caller reports it and the model must be reloaded), so a batch failed
exactly when it ends after the first failure.

Plain stores publish a task and its completion, which is correct where stores are seen in program order
(x86-64); elsewhere `available()` is False and the cache keeps torch's copies on a thread pool.
"""

from __future__ import annotations

import platform
import threading

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import CheckpointError

SPIN_POLLS = 200  # empty polls that only yield the CPU (about a microsecond each) before the thread naps
NAP_US = 200  # then a poll every NAP_US: the thread wakes itself on a timer, no other thread ever wakes it
IDLE_NAPS = 10_000  # naps with nothing to do (about two seconds) before the thread exits
CAPACITY = 4096  # tasks in flight at most; a post waits for room beyond that
EINTR = 4

# C functions the compiled loops call, found by symbol in the running process (libc), so the loops can be cached
_sched_yield = types.ExternalFunction("sched_yield", types.int32())
_usleep = types.ExternalFunction("usleep", types.int32(types.uint32))
_memcpy = types.ExternalFunction("memcpy", types.voidptr(types.voidptr, types.voidptr, types.uintp))
_pread = types.ExternalFunction("pread", types.intp(types.int32, types.voidptr, types.uintp, types.int64))
_errno_location = types.ExternalFunction("__errno_location", types.CPointer(types.int32)())
_fadvise = types.ExternalFunction("posix_fadvise", types.int32(types.int32, types.int64, types.int64, types.int32))

POSTED, DONE, STOP, FIRST_FAILED = range(4)  # the mailbox's counters
DST, SRC, NBYTES, FD, HOW = range(5)  # a task row: destination address; source address, or offset in file
# FD (>= 0); how a file is read:
CACHED, DIRECT, DROP = range(3)  # through the page cache; O_DIRECT (FD opened so); cached, then its pages dropped
NO_FAILURE = np.iinfo(np.int64).max
ALIGN = 4096  # O_DIRECT's alignment of offsets, lengths and buffers (the largest logical block size in use)
SCRATCH_BYTES = 4 << 20  # each copying thread's aligned buffer for direct reads
FADV_DONTNEED = 4


def available() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def task_rows(n: int) -> np.ndarray:
    return np.zeros((n, 5), dtype=np.int64)


def scratch_buffer(nbytes: int = SCRATCH_BYTES) -> np.ndarray:
    """An ALIGN-aligned buffer of `nbytes` (a multiple of ALIGN) for direct reads."""
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes]


@intrinsic
def _pointer(typingctx, address):  # pragma: no cover - compiled
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(address), codegen


@numba.njit(nogil=True, cache=True)
def _pread_all(fd, dst, nbytes, offset):  # pragma: no cover - compiled
    """Bytes read from `offset` until `nbytes` or the end of the file (-1 on an error)."""
    done = 0
    while done < nbytes:  # a positional read may return short
        got = _pread(np.int32(fd), _pointer(dst + done), nbytes - done, offset + done)
        if got < 0 and _errno_location()[0] == EINTR:
            continue
        if got < 0:
            return -1
        if got == 0:
            break
        done += got
    return done


@numba.njit(nogil=True, cache=True)
def _direct(dst, offset, nbytes, fd, scratch, scratch_bytes):  # pragma: no cover - compiled
    """Read [offset, offset + nbytes) with O_DIRECT: whole aligned blocks into `scratch`, the wanted bytes
    copied out of each."""
    end = offset + nbytes
    pos = offset - offset % ALIGN
    while pos < end:
        span = min(scratch_bytes, end - pos)
        span += -span % ALIGN
        got = _pread_all(fd, scratch, span, pos)  # short only at the end of the file
        lo, hi = max(pos, offset), min(pos + got, end)
        if got <= 0 or hi <= lo or (got < span and hi < end):
            return False
        _memcpy(_pointer(dst + lo - offset), _pointer(scratch + lo - pos), hi - lo)
        pos += got
    return True


@numba.njit(nogil=True, cache=True)
def _copy(dst, src, nbytes, fd, how, scratch, scratch_bytes):  # pragma: no cover - compiled
    """One task; False if the file could not be read whole."""
    if fd < 0:
        if nbytes > 0:  # libc's memcpy: a compiled byte loop runs at a third of its speed
            _memcpy(_pointer(dst), _pointer(src), nbytes)
        return True
    if nbytes <= 0:
        return True
    if how == DIRECT:
        return _direct(dst, src, nbytes, fd, scratch, scratch_bytes)
    ok = _pread_all(fd, dst, nbytes, src) == nbytes
    if how == DROP:
        _fadvise(np.int32(fd), src, nbytes, np.int32(FADV_DONTNEED))
    return ok


@numba.njit(nogil=True, cache=True)
def _run(tasks, first, last, box, scratch):  # pragma: no cover - compiled
    """Task numbers first..last-1 (ring positions number % capacity), in order; a failure is kept in box.
    `scratch`: this thread's aligned buffer for direct reads."""
    capacity = tasks.shape[0]
    for n in range(first, last):
        t = n % capacity
        if box[FIRST_FAILED] != NO_FAILURE or not _copy(tasks[t, DST], tasks[t, SRC], tasks[t, NBYTES], tasks[t, FD],
                                                       tasks[t, HOW], scratch.ctypes.data, scratch.size):
            box[FIRST_FAILED] = min(box[FIRST_FAILED], n)


@numba.njit(nogil=True, cache=True)
def _serve(box, tasks, scratch, spin_polls, nap_us, idle_naps):  # pragma: no cover - compiled
    idle = 0
    while box[STOP] == 0 and idle < spin_polls + idle_naps:
        done, posted = box[DONE], box[POSTED]
        if posted > done:
            _run(tasks, done, posted, box, scratch)
            box[DONE] = posted
            idle = 0
        else:  # opaque calls: the counters are read again from memory on every poll
            if idle < spin_polls:
                _sched_yield()
            else:
                _usleep(np.uint32(nap_us))
            idle += 1


_NO_SCRATCH = np.zeros(0, dtype=np.uint8)  # a direct read with it fails (its first read gets no bytes)


def _mailbox(stop: int = 0) -> np.ndarray:
    return np.array([0, 0, stop, NO_FAILURE], dtype=np.int64)


def read_error(what: str = "an expert") -> CheckpointError:
    return CheckpointError(f"{what} could not be read from the checkpoint files (truncated or an I/O error since "
                           "the model was loaded); check the disk, then reload the model")


def warm() -> None:
    """Compile (or load from numba's cache) the loops now, where the engine loads: not on the first token, nor
    on the first prefetch."""
    scratch = scratch_buffer(ALIGN)
    _run(task_rows(1), 0, 0, _mailbox(), scratch)
    _serve(_mailbox(stop=1), task_rows(1), scratch, 1, 1, 1)


def copy_now(tasks: np.ndarray, scratch: np.ndarray | None = None) -> bool:
    """Run task rows in this thread (demand loads: the caller waits for them anyway), the GIL released;
    False if a file could not be read. Direct reads need `scratch` (scratch_buffer()), this thread's own."""
    box = _mailbox()
    if len(tasks):
        _run(tasks, 0, len(tasks), box, _NO_SCRATCH if scratch is None else scratch)
    return box[FIRST_FAILED] == NO_FAILURE


class CopyWorker:
    """Post task rows; a ticket says when they are done. `keepalive` holds whatever owns the memory and the
    files the tasks address (the slot pool, the checkpoint's open files) for as long as the thread may run."""

    def __init__(self, keepalive=(), capacity: int = CAPACITY):
        self.box = _mailbox()
        self.tasks = task_rows(capacity)
        self.scratch = scratch_buffer()  # the copy thread's own, for direct reads
        self._keepalive = keepalive
        self._thread: threading.Thread | None = None
        warm()

    def post(self, rows: np.ndarray) -> "CopyTicket":
        box, capacity, n = self.box, len(self.tasks), len(rows)
        first = int(box[POSTED])  # only this thread writes POSTED: read once, as a Python integer
        at = first % capacity
        if n <= capacity - at and first - int(box[DONE]) + n <= capacity:  # the usual case: one write
            self.tasks[at:at + n] = rows
            box[POSTED] = first + n  # published after the rows
            if self._thread is None or not self._thread.is_alive():  # a live thread needs nothing of _ensure_running
                self._ensure_running()
            return CopyTicket(self, first, first + n)
        for row in rows:
            while box[POSTED] - box[DONE] >= capacity:  # the ring is full: let the worker catch up
                self._ensure_running()
            self.tasks[box[POSTED] % capacity] = row
            box[POSTED] += 1
        self._ensure_running()
        return CopyTicket(self, first, int(box[POSTED]))

    def wait(self, number: int) -> None:
        """Until every task before `number` is done."""
        while self.box[DONE] < number:
            self._ensure_running()

    def close(self) -> None:
        """Finish what was posted, then stop the thread."""
        self.wait(int(self.box[POSTED]))
        self.box[STOP] = 1
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _ensure_running(self) -> None:
        # A thread that found nothing and is exiting may miss a task posted meanwhile: every wait comes back here,
        # so a task is never stranded.
        if self.box[POSTED] > self.box[DONE] and (self._thread is None or not self._thread.is_alive()):
            self.box[STOP] = 0
            self._thread = threading.Thread(target=_serve_keeping,
                                            args=(self.box, self.tasks, self.scratch, self._keepalive),
                                            name="expert-copy", daemon=True)
            self._thread.start()


def _serve_keeping(box: np.ndarray, tasks: np.ndarray, scratch: np.ndarray, keepalive) -> None:
    """The thread's body: `keepalive` (what the tasks address) lives as long as the thread."""
    _serve(box, tasks, scratch, SPIN_POLLS, NAP_US, IDLE_NAPS)


class CopyTicket:
    """A posted batch (task numbers first..last-1), as the cache's `ready` map sees a future."""

    __slots__ = ("worker", "first", "last")

    def __init__(self, worker: CopyWorker, first: int, last: int):
        self.worker, self.first, self.last = worker, first, last

    def done(self) -> bool:
        return self.worker.box[DONE] >= self.last

    def exception(self) -> CheckpointError | None:
        if self.done() and self.worker.box[FIRST_FAILED] < self.last:
            return read_error()
        return None

    def result(self) -> None:
        self.worker.wait(self.last)
        error = self.exception()
        if error is not None:
            raise error
