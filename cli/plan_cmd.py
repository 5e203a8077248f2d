"""`moe-offload plan`: how the memory budget would be spent, before any weight is loaded."""

from __future__ import annotations

import json

from .run_options import add_model_options, model_path, run_config


def add_parser(subparsers, name: str):
    p = subparsers.add_parser(name, help="print the memory plan (bytes per part, slots, share resident)")
    add_model_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args) -> int:
    from offload_engine.loading import (fits_in_memory, host_mode, inspect_checkpoint, layers_packed_at_load, make_plan,
                                        packed_capacity, settle_threads)
    from offload_engine.planning.host_memory import host_memory
    from offload_engine.planning.memory_plan import format_bytes

    run_cfg = run_config(args)
    inspected = inspect_checkpoint(model_path(args), run_cfg)
    run_cfg = settle_threads(inspected, run_cfg)
    plan = make_plan(inspected, run_cfg)
    spec = inspected.spec
    memory = host_memory()
    experts_bytes = plan.total_experts * plan.expert_bytes
    host = host_mode(run_cfg, plan, memory, encoded=not inspected.format.stored_on_disk)
    cpu_experts = run_cfg.cold_experts != "stream" or run_cfg.cpu_moe_layers > 0 or plan.experts_packed
    packed = packed_capacity(run_cfg, inspected.format, host, spec, plan, memory) if cpu_experts else 0
    if args.json:
        print(json.dumps({
            "model_type": spec.model_type, "moe_layers": len(spec.moe_layers), "experts_per_layer": spec.num_experts,
            "top_k": spec.top_k, "dtype": str(inspected.dtype).removeprefix("torch."), "device": str(run_cfg.device),
            "threads": run_cfg.threads,
            "budget_bytes": plan.budget_bytes, "non_expert_bytes": plan.non_expert_bytes,
            "mapped_embedding_bytes": plan.mapped_bytes,
            "kv_cache_bytes": plan.kv_cache_bytes, "working_bytes": plan.working_bytes,
            "expert_bytes": plan.expert_bytes, "expert_slots": plan.expert_slots,
            "expert_format": inspected.format.name, "non_experts_expanded": plan.non_experts_expanded,
            "total_experts": plan.total_experts, "resident_share": plan.resident_share,
            "total_bytes": plan.total_bytes, "minimum_bytes": plan.minimum_bytes,
            "kv_cache_grows": plan.kv_cache_grows, "max_context": plan.max_context,
            "context_fitted": plan.context_fitted, "host_memory": host, "experts_total_bytes": experts_bytes,
            "host_available_bytes": memory.available_bytes, "memory_limit_bytes": memory.limit_bytes,
            "experts_fit_in_memory": fits_in_memory(experts_bytes, memory),
            "cpu_experts_packed_max_bytes": packed, "experts_packed": plan.experts_packed,
        }))
        return 0
    print(f"model          {spec.architecture} ({spec.model_type}), {len(spec.moe_layers)} MoE layers of "
          f"{spec.num_experts} experts, top-{spec.top_k}")
    print(f"device, dtype  {run_cfg.device}, {str(inspected.dtype).removeprefix('torch.')}, "
          f"{run_cfg.threads} compute thread{'s' if run_cfg.threads > 1 else ''}")
    print(plan.describe())
    limit = f", a cgroup limit of {format_bytes(memory.limit_bytes)}" if memory.limited_by_cgroup else ""
    print(f"host side      {host}: the experts take {format_bytes(experts_bytes)}; this process may use "
          f"{format_bytes(memory.available_bytes)}{limit}")
    if packed:
        when = "at load" if layers_packed_at_load(run_cfg, plan, spec.num_moe_layers) else "as they first run"
        print(f"               CPU experts are packed for oneDNN {when}: up to {format_bytes(packed)} "
              "of RAM beside the files " + ("(in place of the slots; --cpu-weights stored: the slots instead)"
                                            if plan.experts_packed else "(--cpu-weights stored: none)"))
    if not fits_in_memory(experts_bytes, memory):
        print("               the model does not fit in memory: "
              + ("experts are read from the files around the page cache, the slot pool is the only cache"
                 if host == "direct" else f"--host-memory {host} as asked (the direct tier would keep the page "
                                          "cache out of the way)"))
    return 0
