"""`moe-offload predictor train|eval`: train a routing predictor on a trace, or measure one's accuracy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from offload_engine.errors import ConfigError

from .consistency_cmd import _num_experts
from .run_options import DEFAULT_MODEL, bounded_int


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help="train a routing predictor, or measure its recall and precision",
                              description=__doc__)
    sub = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    train = sub.add_parser("train", help="train the learned predictor on a trace recorded with --hidden-states")
    train.add_argument("--trace", type=Path, required=True,
                       help="routing trace with hidden states (moe-offload trace --hidden-states)")
    train.add_argument("--out", type=Path, required=True, help="folder for predictor.safetensors and predictor.json")
    train.add_argument("--depth", type=bounded_int(1, 8), default=3, help="MoE layers ahead to predict (default 3)")
    train.add_argument("--epochs", type=bounded_int(1, 1000), default=6, help="passes over the trace")
    train.add_argument("--seed", type=bounded_int(0, 2**32 - 1), default=0, help="seed of the heads' initial weights")
    train.add_argument("--quiet", action="store_true",
                       help="no progress bars (shown only when stderr is a terminal)")
    ev = sub.add_parser("eval", help="recall@n and precision@n of a predictor on a trace, 1..depth layers ahead")
    ev.add_argument("--trace", type=Path, required=True, help="routing trace (.npz); next-gate and learned need "
                                                               "its hidden states")
    ev.add_argument("--predictor", required=True, metavar="NAME|PATH",
                    help="next-gate, history, learned (the model's own) or a trained predictor's folder")
    ev.add_argument("--model", help="the model the trace comes from (next-gate, learned; default: the bundled model)")
    ev.add_argument("--depth", type=bounded_int(1, 8), default=3, help="MoE layers ahead (default 3)")
    ev.add_argument("--num-experts", type=_num_experts, default=None,
                    help="routed experts per layer, for trace files that do not store num_experts")
    ev.add_argument("--per-layer", action="store_true", help="also print each source layer")
    ev.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object instead of a table")
    ev.add_argument("--quiet", action="store_true",
                    help="no progress bars (shown only when stderr is a terminal)")
    return p


def run(args: argparse.Namespace) -> int:
    return train(args) if args.action == "train" else evaluate(args)


def train(args) -> int:
    from offload_engine.atomic_write import check_not_an_input, check_output_path
    from offload_engine.foresight.predictors.learned import CARD_FILE, WEIGHTS_FILE, TrainSettings, train_learned
    from offload_engine.tracing.trace_file import load_trace

    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a folder for predictor.safetensors and predictor.json")
    check_output_path(args.out / "predictor.json" if args.out.is_dir() else args.out)
    for name in (CARD_FILE, WEIGHTS_FILE):
        check_not_an_input(args.out / name, "--out", [("the trace", args.trace)])
    trace = load_trace(args.trace)
    if trace.hidden_states is None:
        raise ConfigError(f"{args.trace} has no hidden states; record it with `moe-offload trace --hidden-states`")
    if args.depth >= trace.num_layers:
        raise ConfigError(f"--depth {args.depth} reaches past the model's {trace.num_layers} MoE layers; lower it")
    settings = TrainSettings(max_depth=args.depth, epochs=args.epochs, seed=args.seed)
    card = {"model": trace.model, "trace": str(args.trace), "sequences": trace.num_sequences,
            "domains": sorted(set(trace.domains)) if trace.domains else None}
    predictor = train_learned(trace.expert_ids, trace.hidden_states, trace.num_experts, settings, card,
                              progress=not args.quiet)
    predictor.save(args.out)
    print(f"wrote {args.out}/predictor.safetensors and predictor.json: {trace.num_layers} MoE layers, "
          f"{args.depth} layers ahead, trained on {predictor.card['train_tokens']} tokens")
    return 0


def evaluate(args) -> int:
    from offload_engine.foresight.predictors import HistoryPredictor
    from offload_engine.foresight.predictors.evaluate import evaluate as run_eval
    from offload_engine.tracing.trace_file import load_trace

    trace = load_trace(args.trace, num_experts=args.num_experts)
    if args.predictor == "history":
        predictor = HistoryPredictor(trace.num_layers, trace.num_experts, trace.k, max_depth=args.depth)
    else:
        if trace.hidden_states is None:
            raise ConfigError(f"the {args.predictor} predictor reads the residual stream, and {args.trace} has no "
                              "hidden states; record it with `moe-offload trace --hidden-states`")
        predictor = model_predictor(args, trace)
    accuracy = run_eval(predictor, trace.expert_ids, trace.hidden_states, args.depth, progress=not args.quiet)
    if args.as_json:
        print(json.dumps({"predictor": args.predictor, "trace": str(args.trace), **accuracy.as_json()}, indent=1))
    else:
        print(format_accuracy(accuracy, args.predictor, trace, args.trace, args.per_layer))
    return 0


def model_predictor(args, trace):
    """next-gate or learned for the trace's model: its routers and norms come from the model's own weights."""
    from offload_engine.engine import OffloadEngine
    from offload_engine.foresight.predictors import make_predictor

    model = args.model or str(DEFAULT_MODEL)
    engine = OffloadEngine.from_pretrained(model, device="cpu", dtype="float32", expert_slots=trace.k,
                                           max_context=16, progress=not args.quiet)
    spec = engine.spec
    if (spec.num_moe_layers, spec.num_experts, spec.top_k) != (trace.num_layers, trace.num_experts, trace.k):
        raise ConfigError(f"{args.trace} has {trace.num_layers} MoE layers of {trace.num_experts} experts, top-"
                          f"{trace.k}; {model} has {spec.num_moe_layers}, {spec.num_experts}, top-{spec.top_k}: "
                          "pass the model the trace was recorded with (--model)")
    return make_predictor(args.predictor, engine.model, spec, engine.directory)


def format_accuracy(accuracy, name: str, trace, source, per_layer: bool) -> str:
    ns = accuracy.ns
    heads = [f"{what}@{n}" for n in ns for what in ("recall", "precision")]
    lines = [f"Predictor {name} on {trace.model or source}: {trace.num_sequences} sequences x {trace.num_tokens} "
             f"tokens, {trace.num_layers} MoE layers, top-{trace.k} of {trace.num_experts}", "",
             f"  {'ahead':<12}" + "".join(f"{h:>14}" for h in heads) + f"{'predictions':>14}"]

    def row(label, v):
        cells = [v[what][n] for n in ns for what in ("recall", "precision")]
        return f"  {label:<12}" + "".join(f"{c:>14.3f}" for c in cells) + f"{v['tokens']:>14}"

    for group, v in accuracy.overall.items():
        lines.append(row(_label(group), v))
    if per_layer:
        for layer, groups in accuracy.per_layer.items():
            lines.append(f"  from layer {layer}")
            for group, v in groups.items():
                lines.append(row("  " + _label(group), v))
    lines += ["", f"recall@n: share of the k experts really chosen that are among the n predicted first; "
                  f"precision@n: share of the n predicted that were chosen (random: {trace.k / trace.num_experts:.3f})"]
    return "\n".join(lines)


def _label(group) -> str:
    return group if isinstance(group, str) else f"{group} layer{'s' if group > 1 else ''}"
