"""Run one program as a fresh process, optionally inside a memory-limited cgroup, and watch it: what it read
from the disk, its peak memory, whether the kernel killed anything. Side-by-side benchmarks start every
program (ours and its peers) this way, with nothing of ours alive and the machine quiet.

    with MemoryCgroup("bench", limit_bytes=3 << 30) as group:
        run = run_watched(["llama-bench", ...], group=group)
        run.stdout, run.read_bytes, run.peak_bytes, run.oom_kills, run.wall_s

Linux, cgroup v1's memory controller, as root (MemoryCgroup.available() says whether it can work here).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
POLL_S = 0.05


class MemoryCgroup:
    """A cgroup v1 memory group with a hard limit (the page cache its processes cause counted), made on entry
    and removed on exit."""

    def __init__(self, name: str, limit_bytes: int):
        self.path = CGROUP_V1 / f"{name}_{os.getpid()}"
        self.limit_bytes = limit_bytes

    @staticmethod
    def available() -> str | None:
        """None where a limited group can be made here, else why not."""
        if os.geteuid() != 0:
            return "making a memory cgroup needs root (run as root, or in a container with its cgroup writable)"
        if not (CGROUP_V1 / "memory.limit_in_bytes").exists():
            return f"no cgroup v1 memory controller at {CGROUP_V1} (this benchmark sets v1 limits)"
        return None

    def __enter__(self) -> "MemoryCgroup":
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
        swap = self.path / "memory.memsw.limit_in_bytes"
        if swap.exists():  # no swapping out of the limit either
            swap.write_text(str(self.limit_bytes))
        return self

    def __exit__(self, *exc) -> None:
        for _ in range(100):  # the last process may take a moment to leave
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)

    def reset_peak(self) -> None:
        (self.path / "memory.max_usage_in_bytes").write_text("0")

    def peak_bytes(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def failcnt(self) -> int:
        return int((self.path / "memory.failcnt").read_text())

    def add_self(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))


@dataclass
class Run:
    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    read_bytes: int  # /proc/PID/io read_bytes, last seen: what the process made the disk read
    peak_rss_bytes: int  # VmHWM, last seen
    peak_bytes: int | None  # the cgroup's peak (its page cache counted), when run in one
    oom_kills: int  # the cgroup's OOM kills during the run
    killed: bool  # ended by a signal (the OOM killer's SIGKILL among them)


def drop_page_cache() -> None:
    """Write back, then empty the page cache (root): the next reads come from the disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_until_quiet(threshold: float = 1.0, timeout_s: float = 120.0) -> float:
    """Wait (up to timeout_s) for the 1-minute load average to fall below `threshold`; returns it."""
    deadline = time.monotonic() + timeout_s
    load = load_average()
    while load >= threshold and time.monotonic() < deadline:
        time.sleep(2.0)
        load = load_average()
    return load


def run_watched(command: list[str], group: MemoryCgroup | None = None, env: dict | None = None,
                timeout_s: float = 1800.0, cwd: Path | None = None) -> Run:
    """Run `command` to its end (inside `group` from its first instruction), polling its I/O and memory."""
    before_kills = group.oom_kills() if group is not None else 0
    if group is not None:
        group.reset_peak()
    start = time.perf_counter()
    # errors="replace": a random-weight model's text may end inside a UTF-8 sequence
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            env=env, cwd=cwd, preexec_fn=group.add_self if group is not None else None)
    read_bytes = rss = 0
    out_parts: list[str] = []
    err_parts: list[str] = []
    readers = [threading.Thread(target=lambda s=s, parts=p: parts.append(s.read()), daemon=True)
               for s, p in ((proc.stdout, out_parts), (proc.stderr, err_parts))]
    for r in readers:
        r.start()
    while True:
        # reaped here, not by Popen: the child's own rusage counts every block it read, to the last one
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            read_bytes = max(read_bytes, usage.ru_inblock * 512)
            rss = max(rss, usage.ru_maxrss * 1024)
            break
        read_bytes = max(read_bytes, _io_read_bytes(proc.pid))
        rss = max(rss, _hwm(proc.pid))
        if time.perf_counter() - start > timeout_s:
            proc.kill()
        time.sleep(POLL_S)
    for r in readers:
        r.join()
    wall = time.perf_counter() - start
    return Run(command, proc.returncode, "".join(out_parts), "".join(err_parts), wall, read_bytes, rss,
               group.peak_bytes() if group is not None else None,
               (group.oom_kills() - before_kills) if group is not None else 0, proc.returncode < 0)


def _io_read_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
