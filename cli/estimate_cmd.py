"""`moe-offload estimate`: decode speed and time to first token to expect, per mode, before loading anything."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .run_options import add_model_options, bounded_int, model_path, run_config


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help="estimate decode tokens/s and TTFT for this model, budget and machine "
                                         "profile, per mode (stream, predictive, CPU experts, auto)",
                              description=__doc__)
    add_model_options(p)
    p.add_argument("--trace", type=Path, help="a routing trace of this model (.npz): its replayed hit rates "
                                              "(default: slots / experts, as random routing would give)")
    p.add_argument("--prompt-tokens", type=bounded_int(1, 1 << 24), default=64, help="prompt length for the TTFT estimate (default 64)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    from offload_engine.errors import ConfigError
    from offload_engine.loading import inspect_checkpoint, make_plan, settle_threads
    from offload_engine.planning.estimate import base_step_s, strategies, ttft_s
    from offload_engine.planning.hardware_profile import model_name

    if args.hardware is None:
        raise ConfigError("estimate needs a machine: --profile FILE with a [hardware] table (moe-offload calibrate "
                          "--out FILE, or one of profiles/hw/)")
    run_cfg = run_config(args)
    inspected = inspect_checkpoint(model_path(args), run_cfg)
    run_cfg = settle_threads(inspected, run_cfg)
    plan = make_plan(inspected, run_cfg)
    spec = inspected.spec
    hit_rates, source = _hit_rates(args, spec, plan)
    common = dict(non_expert_bytes=plan.non_expert_bytes, expert_bytes=plan.expert_bytes, layers=spec.num_moe_layers,
                  top_k=spec.top_k, model_name=model_name(inspected.directory))
    table = strategies(args.hardware, hit_rates, **common)
    chosen = {"stream": "stream-predictive" if run_cfg.predictor != "none" else "stream-lru",
              "cpu": "cpu", "auto": "auto"}[run_cfg.cold_experts]
    if plan.experts_packed:  # every expert computed where it lies on the CPU, none streamed
        chosen = "cpu"
    mine = next(s for s in table if s.name == chosen)
    base = base_step_s(args.hardware, **common)
    # a prompt of P tokens needs, per layer, about E (1 - (1 - k/E)^P) distinct experts; the resident share hits
    needed = spec.num_moe_layers * spec.num_experts * (1 - (1 - spec.top_k / spec.num_experts) ** args.prompt_tokens)
    cold = needed * (1 - plan.resident_share)
    ttft = ttft_s(args.hardware, args.prompt_tokens, base_step=base, cold_experts=cold, expert_bytes=plan.expert_bytes)
    out = {"decode_tokens_per_s": mine.decode_tokens_per_s, "ttft_s": ttft, "mode": chosen,
           "expert_slots": plan.expert_slots, "total_experts": plan.total_experts, "hit_rates": hit_rates,
           "hit_rate_source": source, "resident_step_s": base, "profile": args.hardware.get("description", ""),
           "strategies": {s.name: s.as_dict() for s in table}}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{spec.architecture} ({spec.model_type}): {plan.expert_slots} of {plan.total_experts} experts resident, "
          f"on {args.hardware.get('description', 'the profile')}")
    print(f"hit rates ({source}): LRU {hit_rates['lru']:.3f}, predictive {hit_rates['predictive']:.3f}; "
          f"a step with every expert resident: {base * 1e3:.2f} ms")
    print(f"\n  {'mode':<19}{'hit rate':>9}{'misses/token':>14}{'decode tok/s':>14}{'bound tok/s':>13}")
    for s in table:
        mark = " <- this run" if s.name == chosen else ""
        print(f"  {s.name:<19}{s.hit_rate:>9.3f}{s.misses_per_token:>14.2f}{s.decode_tokens_per_s:>14.1f}"
              f"{s.bound_tokens_per_s:>13.1f}{mark}")
    print(f"\nTTFT for {args.prompt_tokens} prompt tokens: {ttft:.3f} s; decode {mine.decode_tokens_per_s:.1f} tok/s "
          f"({chosen}). bound = (1 - h) x bytes touched per token / the bandwidth the misses use")
    return 0


def _hit_rates(args, spec, plan) -> tuple[dict[str, float], str]:
    if args.trace is None:
        share = plan.resident_share
        return {"lru": share, "predictive": share}, "slots / experts, as random routing would give"
    from offload_engine.errors import ConfigError
    from offload_engine.tracing.replay import replay
    from offload_engine.tracing.trace_file import load_trace

    trace = load_trace(args.trace)
    if (trace.num_layers, trace.num_experts, trace.k) != (spec.num_moe_layers, spec.num_experts, spec.top_k):
        raise ConfigError(f"{args.trace} is a trace of another model ({trace.num_layers} MoE layers of "
                          f"{trace.num_experts} experts, top-{trace.k})")
    slots = max(plan.expert_slots, trace.k)
    return ({"lru": replay(trace, slots, "lru").hit_rate, "predictive": replay(trace, slots, "predictive").hit_rate},
            f"{args.trace} replayed with {slots} slots")
