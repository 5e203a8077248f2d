"""Before anything large is loaded: how fast will this model decode on this machine, and with which mode?

From the memory plan (slots, expert size), a machine profile's [hardware] figures and the routing's hit
rates (a trace replayed through the engine's own cache, or, without a trace, the random-routing hit rate
slots / experts), one decode step is modelled per strategy:

    t_step = t_base + per-miss cost x misses per token,   misses = L k (1 - h)

- t_base: a step with every needed expert resident: measured for this model by calibrate, else weight bytes
  read at the device's measured one-token expert rate, plus the engine's cost per layer call;
- stream (LRU, or predictive with prefetch): a miss costs a copy S / BW_link (with a GPU, prefetched copies
  overlap the step: only what exceeds it counts);
- CPU experts: a miss costs the CPU's one-token expert time instead of the device's (with a GPU, in
  parallel with the device's part of the layer); nothing is copied, so without prefetch nothing becomes
  resident either: every expert is a miss (h = 0), as with llama.cpp's experts on the CPU;
- hybrid auto: each miss where it is cheaper;
- calibrated on the model itself, a miss costs what the engine's own layer call measured for a demand load
  and for a CPU expert (bookkeeping and the host memory's real read path included) instead of the formulas;
- the bound (1 - h) B / BW beside each: B = L k S bytes touched per token, BW the pipe the misses take.
TTFT: the measured prefill rate times the prompt, plus loading the cold experts the prompt needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .hardware_profile import calibrated_model

@dataclass(frozen=True)
class Strategy:
    name: str
    hit_rate: float
    misses_per_token: float
    step_s: float
    decode_tokens_per_s: float
    bound_tokens_per_s: float  # the physical limit with this hit rate: (1 - h) B / BW

    def as_dict(self) -> dict:
        return asdict(self)


def base_step_s(hw: dict, non_expert_bytes: int, expert_bytes: int, layers: int, top_k: int, model_name: str) -> float:
    """A decode step with every needed expert resident."""
    model = calibrated_model(hw, model_name, expert_bytes, layers, top_k)
    if model.get("resident_decode_s"):
        return float(model["resident_decode_s"])
    one_token = float((hw.get("device_expert_s") or {}).get("1", 0)) or expert_bytes / hw.get("link_bytes_per_s", 1e10)
    per_byte = one_token / expert_bytes
    return (non_expert_bytes + layers * top_k * expert_bytes) * per_byte + layers * hw.get("layer_call_s", 2e-5)


def strategies(hw: dict, hit_rates: dict[str, float], *, non_expert_bytes: int, expert_bytes: int, layers: int,
               top_k: int, model_name: str) -> list[Strategy]:
    """hit_rates: {"lru": h, "predictive": h} at the plan's slots."""
    parallel = bool(hw.get("parallel", False))
    base = base_step_s(hw, non_expert_bytes, expert_bytes, layers, top_k, model_name)
    link = hw.get("link_bytes_per_s", 12e9)
    cpu_read = hw.get("cpu_read_bytes_per_s", 20e9)
    copy = expert_bytes / link
    cpu_one = float((hw.get("cpu_expert_s") or {}).get("1", 0)) or hw.get("cpu_call_s", 5e-5) + expert_bytes / cpu_read
    dev_one = float((hw.get("device_expert_s") or {}).get("1", 0)) or copy / 4
    touched = layers * top_k * expert_bytes
    # what a miss adds to a step: with a GPU the CPU's share of a layer runs beside the device's; without one
    # a CPU expert replaces the device's compute of that expert (the same cores), a copy comes on top of it
    cpu_cost = cpu_one if parallel else max(cpu_one - dev_one, 0.0)
    model = calibrated_model(hw, model_name, expert_bytes, layers, top_k)
    if model.get("miss_s") is not None:
        # calibrated on this model: a demand load and a CPU expert as the engine's own layer call costs them
        copy, cpu_cost = float(model["miss_s"]), float(model["cpu_miss_s"])

    def make(name: str, h: float, per_miss: float, bandwidth: float, overlap: bool) -> Strategy:
        misses = layers * top_k * (1 - h)
        extra = misses * per_miss
        step = max(base, extra) if overlap else base + extra
        bound = (1 - h) * touched / bandwidth
        return Strategy(name, h, misses, step, 1 / step, 1 / bound if bound > 0 else float("inf"))

    h_lru, h_pred = hit_rates["lru"], hit_rates.get("predictive", hit_rates["lru"])
    return [
        make("stream-lru", h_lru, copy, link, overlap=False),
        make("stream-predictive", h_pred, copy, link, overlap=parallel),
        make("cpu", 0.0, cpu_cost, cpu_read, overlap=parallel),
        make("auto", h_pred, min(copy, cpu_cost), link + cpu_read if parallel else max(link, cpu_read),
             overlap=parallel),
    ]


def ttft_s(hw: dict, prompt_tokens: int, *, base_step: float, cold_experts: float, expert_bytes: int) -> float:
    """Prefill at the measured rate (a prompt's tokens share each expert's weights) plus its cold loads."""
    model = hw.get("model") or {}
    per_token = float(model.get("prefill_s_per_token") or base_step / 8)
    return prompt_tokens * per_token + cold_experts * expert_bytes / hw.get("link_bytes_per_s", 12e9)
