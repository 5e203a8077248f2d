"""Where a cold expert is computed: copied into a slot and run on the device, or run on the CPU where it lies.

Per layer call, for each needed expert e with n_e routed tokens, S_e bytes and F_e FLOPs per token:

    device compute   a_g + max(S_e / BW_dev, n_e F_e / F_dev)  (resident, or once copied)
    copy             S_e / BW_link                             (0 if resident or already arriving)
    CPU compute      a_c + max(S_e / BW_cpu, n_e F_e / F_cpu)  (reads the weights once for all its tokens)

With a GPU the CPU and the device work in parallel and copies queue on the link; the layer finishes when both
sides do. HybriMoE's two-ended greedy assigns the cold experts: the busiest (most tokens) go to the device
from one end, the lightest to the CPU from the other, each time to whichever side then finishes earlier.
An expert expected to be used again soon is worth more on the device: its copy counts as S_e / BW_link /
(1 + reuse), reuse = the expected further uses before it would be evicted. Without a GPU both sides are the
same cores, nothing overlaps, and each expert simply goes where it costs less.

All figures are in seconds, bytes and FLOP/s; Hardware comes from a profile's [hardware] table (measured by
`moe-offload calibrate` or derived from specifications), else the defaults below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Hardware:
    link_bytes_per_s: float = 12e9  # host memory -> device slot (CPU only: memcpy into the slot pool)
    cpu_read_bytes_per_s: float = 20e9  # the CPU streaming expert weights from host memory
    cpu_flops: float = 100e9  # the CPU's expert throughput at the compute dtype
    cpu_call_s: float = 50e-6  # fixed cost of one CPU expert call
    device_flops: float = 100e9  # the device's expert throughput (CPU only: the same cores)
    device_read_bytes_per_s: float = 20e9  # the device streaming a resident expert's weights (GPU: its memory)
    device_call_s: float = 20e-6  # fixed cost of one device expert group
    parallel: bool = False  # a separate device (GPU) computes while the CPU does
    # calibrated on this model (0: not measured): what a demand load, and a CPU expert instead of a resident
    # one, add to a one-token layer call, measured through the engine's own call (calibration.py)
    miss_s: float = 0.0
    cpu_miss_s: float = 0.0

    @classmethod
    def from_dict(cls, values: dict) -> "Hardware":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Need:
    expert: int
    tokens: int
    resident: bool  # resident or already arriving: no copy
    reuse: float = 0.0  # expected further uses before eviction, if it were loaded now


def device_seconds(hw: Hardware, tokens: int, flops_per_token: float, expert_bytes: int = 0) -> float:
    return hw.device_call_s + max(expert_bytes / hw.device_read_bytes_per_s, tokens * flops_per_token / hw.device_flops)


def cpu_seconds(hw: Hardware, tokens: int, expert_bytes: int, flops_per_token: float) -> float:
    return hw.cpu_call_s + max(expert_bytes / hw.cpu_read_bytes_per_s, tokens * flops_per_token / hw.cpu_flops)


def copy_seconds(hw: Hardware, expert_bytes: int, reuse: float = 0.0) -> float:
    return expert_bytes / hw.link_bytes_per_s / (1.0 + reuse)


def _cheaper_on_cpu(n: Need, expert_bytes: int, flops_per_token: float, hw: Hardware) -> bool:
    """Without a GPU: whether a cold expert costs less computed on the CPU than copied and computed in a slot.
    Where this model was calibrated, the measured costs decide: the rates above leave out what the engine's
    call really pays (on the 2-core VM they priced a CPU expert at 0.40 ms against 0.45 ms for a copy and a
    slot's compute; measured through the call, 0.19 ms against 0.11 ms). They hold for any number of tokens:
    both ways run the same kernel on the same cores and read the weights once, so what differs is the copy
    against reading the weights where they lie, not the tokens' compute."""
    if hw.miss_s > 0 and hw.cpu_miss_s > 0:
        return hw.cpu_miss_s < hw.miss_s / (1.0 + n.reuse)
    return (cpu_seconds(hw, n.tokens, expert_bytes, flops_per_token)
            < copy_seconds(hw, expert_bytes, n.reuse) + device_seconds(hw, n.tokens, flops_per_token, expert_bytes))


def place(needs: Sequence[Need], expert_bytes: int, flops_per_token: float, hw: Hardware) -> set[int]:
    """The experts of one layer call to compute on the CPU (the rest: on the device, copied if cold)."""
    cold = [n for n in needs if not n.resident]
    if not cold:
        return set()
    if not hw.parallel:  # one set of cores: no overlap, each expert where it costs less
        return {n.expert for n in cold if _cheaper_on_cpu(n, expert_bytes, flops_per_token, hw)}
    device = sum(device_seconds(hw, n.tokens, flops_per_token, expert_bytes) for n in needs if n.resident)
    link = 0.0
    cpu = 0.0
    on_cpu: set[int] = set()
    queue = sorted(cold, key=lambda n: (-n.tokens, n.expert))
    lo, hi = 0, len(queue) - 1
    while lo <= hi:
        front, back = queue[lo], queue[hi]
        # the busiest cold expert on the device: its copy queues on the link, its compute after its copy
        link_front = link + copy_seconds(hw, expert_bytes, front.reuse)
        device_front = max(device, link_front) + device_seconds(hw, front.tokens, flops_per_token, expert_bytes)
        cpu_back = cpu + cpu_seconds(hw, back.tokens, expert_bytes, flops_per_token)
        if device_front <= cpu_back:
            link, device = link_front, device_front
            lo += 1
        else:
            cpu = cpu_back
            on_cpu.add(back.expert)
            hi -= 1
    return on_cpu


def layer_seconds(needs: Sequence[Need], on_cpu: set[int], expert_bytes: int, flops_per_token: float,
                  hw: Hardware) -> float:
    """The modelled finishing time of a layer call's experts with this placement."""
    device = cpu = link = 0.0
    for n in sorted(needs, key=lambda n: not n.resident):
        if n.expert in on_cpu:
            cpu += cpu_seconds(hw, n.tokens, expert_bytes, flops_per_token)
            continue
        if not n.resident:
            link += copy_seconds(hw, expert_bytes)
            device = max(device, link) if hw.parallel else device + copy_seconds(hw, expert_bytes)
        device += device_seconds(hw, n.tokens, flops_per_token, expert_bytes)
    return max(device, cpu) if hw.parallel else device + cpu
