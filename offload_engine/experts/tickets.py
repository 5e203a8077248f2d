"""What a started load gives back: a ticket to ask whether it is done, and to wait for it.

`wait(stream)`: on CUDA the stream waits for the copies (the host does not); on the CPU the host waits.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch

from . import copy_worker


class Ticket:
    """Loads that completed in the calling thread: nothing to wait for."""

    __slots__ = ()

    def done(self) -> bool:
        return True

    def error(self) -> BaseException | None:
        return None

    def wait(self, stream=None) -> None:
        pass


DONE = Ticket()


class PoolTicket(Ticket):
    """Torch's copies on a one-thread pool."""

    __slots__ = ("future",)

    def __init__(self, future: Future):
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def error(self) -> BaseException | None:
        return self.future.exception() if self.future.done() else None

    def wait(self, stream=None) -> None:
        self.future.result()


class WorkerTicket(Ticket):
    """Compiled copies posted to the copy thread."""

    __slots__ = ("posted",)

    def __init__(self, posted: copy_worker.CopyTicket):
        self.posted = posted

    def done(self) -> bool:
        return self.posted.done()

    def error(self) -> BaseException | None:
        return self.posted.exception()

    def wait(self, stream=None) -> None:
        self.posted.result()


class CudaTicket(Ticket):
    """Copies queued on a CUDA stream, finished when `event` is."""

    __slots__ = ("event",)

    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def wait(self, stream=None) -> None:
        stream.wait_event(self.event)
