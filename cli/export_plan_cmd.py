"""`moe-offload export-plan`: what we measured, for an engine past one machine: a trace's expert counts in
SGLang's expert-distribution layout, and launch lines for SGLang with kTransformers, vLLM and llama-server with
our memory budget translated (offload_engine/export_plan.py says which source each flag was read in)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from offload_engine import DEFAULT_MODEL, ConfigError
from offload_engine.atomic_write import atomic_output, check_not_an_input

from .run_options import add_model_options, bounded_int, model_path, run_config

OUTPUTS = ("expert_distribution.pt", "counts.csv", "launch.md", "plan.json")


def add_parser(subparsers, name: str):
    p = subparsers.add_parser(name, help="a trace's expert counts in SGLang's layout, and launch lines for "
                                         "SGLang + kTransformers, vLLM and llama-server with our budget translated")
    p.add_argument("source", metavar="TRACE_OR_MODEL", help="a routing trace (.npz) or a model directory")
    add_model_options(p)
    next(a for a in p._actions if a.dest == "model").help = (
        "with a trace: the model it was recorded from, for the launch lines (default: the bundled model if the "
        "trace names it, else counts only)")
    p.add_argument("--trace", type=Path, help="with a model directory: a routing trace of it, for the counts")
    p.add_argument("--num-experts", type=bounded_int(1, 32767), metavar="E",
                   help="experts per layer, for a trace that does not store it")
    p.add_argument("--out", type=Path, required=True, help="folder to write into (created if missing): "
                                                           + ", ".join(OUTPUTS))
    return p


def run(args) -> int:
    from offload_engine import export_plan as ex, load_trace

    trace_path, model = _inputs(args)
    out = _check_out(args.out, [("the model in", model), ("the trace", trace_path), ("the profile", args.profile)])
    trace = None if trace_path is None else load_trace(trace_path, num_experts=args.num_experts)
    if model is None and trace is not None and trace.model == DEFAULT_MODEL.name:
        model = str(DEFAULT_MODEL)  # recorded from the bundled model
        _check_out(args.out, [("the model in", model)])
    counts = None if trace is None else ex.activation_counts(trace.expert_ids, trace.num_experts)
    fig = None
    if model is not None:
        args.model = model
        fig = _plan_figures(args)
        why = None if trace is None else ex.trace_matches(counts.shape, tuple(trace.moe_layers.tolist()), fig)
        if why:
            raise ConfigError(f"{trace_path} was not recorded from {model}: {why}; pass its model with --model")
    out.mkdir(exist_ok=True)
    written = []
    distribution = None
    if counts is not None:
        layers = tuple(int(i) for i in trace.moe_layers)
        num_layers = fig.num_layers if fig else max(layers) + 1
        try:
            logical = ex.sglang_logical_count(counts, layers, num_layers)
        except ValueError as e:
            raise ConfigError(f"{trace_path}: {e}") from None
        import torch

        with atomic_output(out / OUTPUTS[0]) as f:
            torch.save(ex.sglang_record(logical), f)
        distribution = os.path.abspath(out / OUTPUTS[0])  # launch.md is read from anywhere
        _write_text(out / OUTPUTS[1], ex.counts_csv(counts, layers))
        written += [f"{OUTPUTS[0]} (SGLang logical_count {list(logical.shape)}, {int(counts.sum())} activations)",
                    OUTPUTS[1]]
    if fig is not None:
        tr = ex.translate(fig)
        _write_text(out / OUTPUTS[2], ex.launch_markdown(fig, tr, distribution))
        hottest = None if counts is None else ex.most_activated(counts, tr.kt_gpu_experts_per_layer)
        _write_text(out / OUTPUTS[3], json.dumps(ex.plan_json(fig, tr, distribution, hottest), indent=1) + "\n")
        written += list(OUTPUTS[2:])
    print(f"wrote {out}: {', '.join(written)}")
    if fig is None:
        print(ex.counts_csv(counts, tuple(int(i) for i in trace.moe_layers)), end="")
        print(f"the trace does not say which model it is ({trace.model or 'no model name'}): "
              "pass --model DIR for the launch lines", file=sys.stderr)
        return 0
    layers = len(fig.moe_layers)
    print(f"llama-server  -ngl {tr.ngl} --n-cpu-moe {tr.n_cpu_moe}: the experts of {tr.gpu_moe_layers} of {layers} "
          "MoE layers on the GPU")
    print(f"vLLM          --cpu-offload-gb {tr.cpu_offload_gib} (GiB of expert weights beyond the budget)")
    print(f"SGLang + kT   --kt-num-gpu-experts {tr.kt_gpu_experts_per_layer} per MoE layer ({fig.expert_slots} slots"
          f" over {layers} layers){' with --init-expert-location ' + distribution if distribution else ''}")
    return 0


def _inputs(args) -> tuple[str | None, str | None]:
    """(trace path, model) from TRACE_OR_MODEL, --trace and --model."""
    source = args.source
    if not source.strip() or "\x00" in source or not os.path.exists(source):
        raise ConfigError(f"{source!r} does not exist; pass a routing trace (.npz) or a model directory")
    if os.path.isdir(source):
        if args.model is not None:
            raise ConfigError(f"{source} is a model directory and --model names another; give the model once")
        return (None if args.trace is None else str(args.trace)), source
    if args.trace is not None:
        raise ConfigError(f"{source} is a trace and --trace names another; give one trace (and the model "
                          "with --model)")
    return source, (None if args.model is None else model_path(args))


def _check_out(out: Path, inputs: list[tuple[str, str | os.PathLike | None]]) -> Path:
    """A folder that is, or lies inside, nothing the command reads; refused before any work."""
    if "\x00" in str(out):
        raise ConfigError(f"--out {out!r}: a file name cannot hold a NUL character")
    real = os.path.realpath(out)
    for what, path in inputs:
        if path is None or not os.path.exists(path):
            continue
        held = os.path.realpath(path)
        if real == held or (os.path.isdir(path) and os.path.commonpath([real, held]) == held):
            raise ConfigError(f"--out {out} would write into {what} {path}, which this command reads; "
                              "write it elsewhere")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder (created if missing)")
    if not out.exists() and not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    for name in OUTPUTS:  # also through links into an input
        check_not_an_input(out / name, "--out", inputs)
    return out


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as f:
        f.write(text.encode("utf-8"))


def _plan_figures(args):
    """Our plan for the model, built as `moe-offload plan` builds it."""
    from offload_engine.export_plan import PlanFigures
    from offload_engine.loading import inspect_checkpoint, make_plan

    run_cfg = run_config(args)
    inspected = inspect_checkpoint(model_path(args), run_cfg)
    plan = make_plan(inspected, run_cfg)
    spec = inspected.spec
    return PlanFigures(
        model=str(args.model), device=str(run_cfg.device), dtype=str(inspected.dtype).removeprefix("torch."),
        budget_bytes=plan.budget_bytes or plan.total_bytes, fixed_bytes=plan.fixed_bytes,
        mapped_bytes=plan.mapped_bytes, expert_bytes=plan.expert_bytes, expert_slots=plan.expert_slots,
        experts_per_layer=spec.num_experts, top_k=spec.top_k, moe_layers=tuple(spec.moe_layers),
        num_layers=spec.num_layers,
    )
