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
    from offload_engine.loading import inspect_checkpoint, make_plan

    run_cfg = run_config(args)
    inspected = inspect_checkpoint(model_path(args), run_cfg)
    plan = make_plan(inspected, run_cfg)
    spec = inspected.spec
    if args.json:
        print(json.dumps({
            "model_type": spec.model_type, "moe_layers": len(spec.moe_layers), "experts_per_layer": spec.num_experts,
            "top_k": spec.top_k, "dtype": str(inspected.dtype).removeprefix("torch."), "device": str(run_cfg.device),
            "budget_bytes": plan.budget_bytes, "non_expert_bytes": plan.non_expert_bytes,
            "kv_cache_bytes": plan.kv_cache_bytes, "working_bytes": plan.working_bytes,
            "expert_bytes": plan.expert_bytes, "expert_slots": plan.expert_slots,
            "total_experts": plan.total_experts, "resident_share": plan.resident_share,
            "total_bytes": plan.total_bytes, "minimum_bytes": plan.minimum_bytes,
        }))
        return 0
    print(f"model          {spec.architecture} ({spec.model_type}), {len(spec.moe_layers)} MoE layers of "
          f"{spec.num_experts} experts, top-{spec.top_k}")
    print(f"device, dtype  {run_cfg.device}, {str(inspected.dtype).removeprefix('torch.')}")
    print(plan.describe())
    return 0
