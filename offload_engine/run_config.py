"""How we run a checkpoint: device, dtype, memory budget, cache; built once at the edge and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch

from .errors import ConfigError
from .experts.policies import POLICIES
from .experts.store import HOST_MODES
from .foresight.predictors import PREDICTOR_NAMES
from .planning.memory_plan import parse_bytes

DEFAULT_MAX_CONTEXT = 4096
MAX_PREFETCH_DEPTH = 3  # = foresight.HORIZON: no predictor looks further ahead within a token
COLD_EXPERTS = ("stream", "cpu", "auto")
CPU_WEIGHTS = ("packed", "stored")
EXPERT_DTYPES = ("auto", "int8", "int4")  # auto: as the checkpoint stores them
LARGE_EXPERT_BYTES = 4 * 1024**2  # experts from this size decode on every usable core by default (all_cores_pay)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class RunConfig:
    device: torch.device
    dtype: torch.dtype | None = None  # None: the checkpoint's dtype (as transformers' dtype="auto")
    memory_budget: int | None = None  # bytes; None (and no expert_slots): automatic
    expert_slots: int | None = None
    host_memory: str | None = None  # None: pinned with CUDA if the experts fit in RAM, else mmap
    max_context: int | None = None  # tokens the KV cache is planned for; None: min(model limit, 4096)
    max_batch: int = 1
    policy: str = "lru"
    predictor: str = "none"  # none, next-gate, history, learned (the model's own), or a trained predictor's folder
    prefetch_depth: int | None = None  # MoE layers ahead to load predicted experts; None: automatic, 0: off
    cold_experts: str = "stream"  # stream (copy into a slot), cpu (compute where they lie) or auto (cost model)
    cpu_moe_layers: int = 0  # the first N MoE layers' experts always on the CPU, never cached (--n-cpu-moe)
    threads: int = 1  # compute threads (torch's intra-op pool); build() picks them from the usable cores
    hardware: dict | None = None  # a profile's [hardware] figures for the cost model; None: defaults
    progress: bool = True
    expert_dtype: str | None = None  # None: as the checkpoint stores them; int8/int4: quantized at load
    cpu_weights: str = "packed"  # products on the CPU: weights packed once for oneDNN where the bits stay, or as stored
    threads_asked: bool = True  # False: `threads` is the default, which loading.settle_threads may raise for a model

    @classmethod
    def build(
        cls,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        memory_budget: str | int | None = None,
        expert_slots: int | None = None,
        host_memory: str | None = None,
        max_context: int | None = None,
        max_batch: int = 1,
        policy: str = "lru",
        predictor: str | None = "none",
        prefetch_depth: int | None = None,
        cold_experts: str = "stream",
        cpu_moe_layers: int = 0,
        threads: int | None = None,
        hardware: dict | None = None,
        progress: bool = True,
        cpu_threads: int | None = None,
        expert_dtype: str | None = None,
        cpu_weights: str = "packed",
    ) -> "RunConfig":
        """Validate user-facing settings once; every error is one line naming the setting."""
        for name, value in (("host_memory", host_memory), ("policy", policy)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a string, not {value!r}")
        if not isinstance(progress, bool):
            raise ConfigError(f"progress must be True or False, not {progress!r}")
        if dtype is not None and not isinstance(dtype, (str, torch.dtype)):
            raise ConfigError(f"dtype must be a name such as 'bfloat16' or a torch.dtype, not {dtype!r}")
        if isinstance(dtype, torch.dtype) and dtype not in set(DTYPES.values()):
            raise ConfigError(f"dtype {dtype} is not supported; choose float32, bfloat16 or float16")
        dev = resolve_device(device)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(set(DTYPES))}")
            dtype = DTYPES[dtype]
        budget = parse_bytes(memory_budget) if memory_budget is not None else None
        if expert_slots is not None and (not isinstance(expert_slots, int) or not 1 <= expert_slots <= 1 << 40):
            raise ConfigError(f"expert slots must be a positive integer, not {expert_slots!r}")
        if host_memory is not None and host_memory not in HOST_MODES:
            raise ConfigError(f"unknown host memory mode {host_memory!r}; choose one of {HOST_MODES}")
        if host_memory == "pinned" and dev.type != "cuda":
            raise ConfigError("pinned host memory only helps copies to a CUDA device; use 'ram', 'mmap' or 'files' on CPU")
        if expert_slots is not None and isinstance(expert_slots, bool):
            raise ConfigError(f"expert slots must be a positive integer, not {expert_slots!r}")
        if max_context is not None and (not isinstance(max_context, int) or isinstance(max_context, bool)
                                        or not 1 <= max_context <= 1 << 30):
            raise ConfigError(f"max context must be a positive number of tokens, not {max_context}")
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or not 1 <= max_batch <= 1 << 20:
            raise ConfigError(f"max batch must be at least 1, not {max_batch}")
        if policy not in POLICIES:
            raise ConfigError(f"unknown eviction policy {policy!r}; choose one of {sorted(POLICIES)}")
        predictor = "none" if predictor is None else predictor
        if not isinstance(predictor, str) or not predictor:
            raise ConfigError(f"predictor must be one of {PREDICTOR_NAMES} or a trained predictor's folder, "
                              f"not {predictor!r}")
        if prefetch_depth is not None and (not isinstance(prefetch_depth, int) or isinstance(prefetch_depth, bool)
                                           or not 0 <= prefetch_depth <= MAX_PREFETCH_DEPTH):
            raise ConfigError(f"prefetch depth must be a whole number of MoE layers from 0 (off) to "
                              f"{MAX_PREFETCH_DEPTH}, not {prefetch_depth!r}")
        if cold_experts not in COLD_EXPERTS:
            raise ConfigError(f"cold_experts must be one of {COLD_EXPERTS}, not {cold_experts!r}")
        if not isinstance(cpu_moe_layers, int) or isinstance(cpu_moe_layers, bool) or not 0 <= cpu_moe_layers <= 1 << 16:
            raise ConfigError(f"cpu_moe_layers must be a whole number of MoE layers >= 0, not {cpu_moe_layers!r}")
        if expert_dtype is not None and expert_dtype not in EXPERT_DTYPES:
            raise ConfigError(f"unknown expert dtype {expert_dtype!r}; choose one of {EXPERT_DTYPES} (int8/int4 "
                              "quantize bf16/fp16/fp32 experts at load)")
        if cpu_weights not in CPU_WEIGHTS:
            raise ConfigError(f"cpu_weights must be one of {CPU_WEIGHTS}, not {cpu_weights!r}")
        asked = threads is not None or cpu_threads is not None
        threads = _threads(threads, cpu_threads)
        if hardware is not None:
            from .planning.hardware_profile import check_hardware

            hardware = check_hardware(hardware, "hardware")
        return cls(dev, dtype, budget, expert_slots, host_memory, max_context, max_batch, policy, predictor,
                   prefetch_depth, cold_experts, cpu_moe_layers, threads, hardware, progress,
                   None if expert_dtype == "auto" else expert_dtype, cpu_weights, threads_asked=asked)


def _threads(threads: int | None, cpu_threads: int | None) -> int:
    """threads as given, or the default; cpu_threads is its former name (CPU experts' threads with a GPU)."""
    for name, value in (("threads", threads), ("cpu_threads", cpu_threads)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096):
            raise ConfigError(f"{name} must be a whole number from 1 to 4096, not {value!r}")
    if threads is not None and cpu_threads is not None and threads != cpu_threads:
        raise ConfigError(f"threads={threads} and cpu_threads={cpu_threads} disagree; cpu_threads is threads' "
                          "former name: give threads alone")
    chosen = threads if threads is not None else cpu_threads
    return chosen if chosen is not None else default_threads()


def usable_cores() -> int:
    """Cores this process may run on (its affinity, as a container or taskset sets it), hyperthreads counted
    as the share of a physical core they are."""
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        logical = os.cpu_count() or 1
    machine_logical = psutil.cpu_count(logical=True) or logical
    machine_physical = psutil.cpu_count(logical=False) or machine_logical
    return max(1, logical * machine_physical // max(machine_logical, 1))


def default_threads() -> int:
    """One compute thread less than the usable cores (at least one). The core left over runs the engine's
    other thread (the expert loader, or the one driving the GPU) and whatever else the machine runs: torch's
    threads wait for each other at every operation, so one descheduled thread stalls them all, and a decode's
    operations are too small for a second thread to pay on few cores (BENCHMARKS.md, "threads": on two cores
    with another busy process, 2 threads ran at 0.28x of 1)."""
    return max(1, usable_cores() - 1)


def all_cores_pay(expert_bytes: int) -> bool:
    """Whether a model's decode on the CPU takes every usable core by default (loading.settle_threads): where an
    expert's weights are megabytes, each product reads megabytes and a second thread pays (Qwen3-30B-A3B's
    shape on two idle cores, every expert resident: 1.4x with two threads against one; llama.cpp takes every
    core by default too); on the bundled model's 0.2 MiB experts it does not (within 5%)."""
    return expert_bytes >= LARGE_EXPERT_BYTES


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this machine has no usable CUDA GPU; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device type {dev.type!r} is not supported; use cpu or cuda")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                          "device(s), cuda:0 to cuda:N-1")
    return dev
