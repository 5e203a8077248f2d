"""Flags shared by the commands that load a model, and the one place they become a RunConfig."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

from offload_engine.atomic_write import check_output_path
from offload_engine.errors import ConfigError

import offload_engine

if TYPE_CHECKING:  # torch is imported only when a command runs
    from offload_engine.run_config import RunConfig

DEFAULT_MODEL = offload_engine.DEFAULT_MODEL
POLICIES = ("lru", "predictive")  # offload_engine.experts.policies.POLICIES, without importing numba for --help
COLD_EXPERTS = ("stream", "cpu", "auto")  # offload_engine.run_config.COLD_EXPERTS, without importing torch
EXPERT_DTYPES = ("auto", "int8", "int4")  # offload_engine.run_config.EXPERT_DTYPES
CPU_WEIGHTS = ("packed", "stored")  # offload_engine.run_config.CPU_WEIGHTS


def bounded_int(low: int, high: int):
    """A whole number in [low, high], checked by argparse with a one-line error."""
    def parse(text: str) -> int:
        text = text.strip()
        if not text.lstrip("+-").isdigit():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        if len(text) > 20 or not low <= int(text) <= high:  # the length first: int() of 10^6 digits is slow
            raise argparse.ArgumentTypeError(f"{text[:24]!r}{'...' if len(text) > 24 else ''} must be between {low} and {high}")
        return int(text)
    parse.__name__ = "whole number"
    return parse


positive_int = bounded_int(1, 2**31 - 1)


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory or Hugging Face hub id (default: the bundled model)")
    p.add_argument("--profile", type=Path, help="TOML file of flag defaults (see profiles/); flags given win")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the checkpoint's, as transformers loads it)")
    p.add_argument("--memory-budget", help="device memory the engine may use, e.g. 6GiB (default: automatic)")
    p.add_argument("--expert-slots", type=positive_int,
                   help="number of expert slots (default: as many as the memory budget holds)")
    p.add_argument("--host-memory", choices=["mmap", "files", "ram", "pinned", "direct"],
                   help="where cold experts wait: pinned or ram (host memory), or read on demand from the "
                        "checkpoint through a memory map (mmap), positional reads (files) or reads that bypass "
                        "the page cache (direct: for models larger than RAM) "
                        "(default: pinned with CUDA if they fit in RAM, else mmap; direct if the model does not "
                        "fit in the memory this process may use)")
    p.add_argument("--max-context", type=positive_int, help="tokens of KV cache to plan for (default: min(model, 4096))")
    p.add_argument("--max-batch", type=positive_int, default=1, help="prompts per batch to plan for")
    p.add_argument("--policy", choices=POLICIES, default="lru",
                   help="which cached expert gives way: lru, or predictive (lowest chance of use at its layer's "
                        "next call per call until then, learned at run time and from the predictor); default lru")
    p.add_argument("--predictor", default="none", metavar="NAME|PATH",
                   help="routing predictor: none, next-gate, history, learned (the model's own predictor/ folder) "
                        "or a trained predictor's folder; default none")
    p.add_argument("--prefetch-depth", type=bounded_int(0, 3), default=None, metavar="N",
                   help="load predicted experts N MoE layers ahead (0: no prefetch; default: from measured load "
                        "and layer times, with a predictor)")
    p.add_argument("--cold-experts", choices=COLD_EXPERTS, default="stream",
                   help="an expert not in the device cache is copied into a slot (stream), computed on the CPU "
                        "where it lies (cpu), or either, by the cost model (auto); default stream")
    p.add_argument("--cpu-weights", choices=CPU_WEIGHTS, default="packed",
                   help="matrix products on the CPU (experts computed there; on a CPU device, every linear layer): "
                        "weights packed once in oneDNN's layout where that gives the same bits (bf16 with AVX-512: "
                        "about twice the rate; a packed CPU expert costs RAM beside its stored copy), or read as "
                        "stored; default packed")
    p.add_argument("--expert-dtype", choices=EXPERT_DTYPES, default="auto",
                   help="int8 or int4: quantize an unquantized checkpoint's experts at load (weight-only: half or "
                        "about a quarter of bf16's bytes, so more experts fit and a miss moves fewer; the output "
                        "is then no longer transformers' own); default auto, as the checkpoint stores them")
    p.add_argument("--cpu-moe-layers", type=bounded_int(0, 1 << 16), default=0, metavar="N",
                   help="the experts of the first N MoE layers always run on the CPU and are never cached "
                        "(llama.cpp's --n-cpu-moe)")
    p.add_argument("--threads", "--cpu-threads", dest="threads", type=bounded_int(1, 4096), default=None,
                   metavar="N", help="compute threads, on every device (default: the cores this process may use, "
                                     "less one for the expert loader; --cpu-threads is its former name)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (shown only when stderr is a terminal)")
    p.set_defaults(hardware=None)  # a profile's [hardware] table (apply_profile)


def apply_profile(parser: argparse.ArgumentParser, argv: list[str] | None, any_command: set[str]) -> None:
    """Read --profile first so its values become defaults that explicit flags override. A key of another
    command (max_new_tokens for `plan`) is skipped, so one profile serves plan and generate; a key no command
    knows is refused."""
    pre, _ = parser.parse_known_args(argv)
    profile = getattr(pre, "profile", None)
    if profile is None:
        return
    if not Path(profile).is_file():  # a FIFO would block the read; a folder cannot be read at all
        raise ConfigError(f"cannot read profile {profile}: not a regular file; pass a TOML file such as profiles/demo.toml")
    try:
        values = tomllib.loads(Path(profile).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read profile {profile}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read profile {profile}: {e}") from None
    values = {k.replace("-", "_"): v for k, v in values.items()}
    if "cpu_threads" in values and "threads" not in values:  # threads' former name
        values["threads"] = values.pop("cpu_threads")
    if "hardware" in values:  # the machine's figures for the cost model, not a flag
        from offload_engine.planning.hardware_profile import check_hardware

        parser.set_defaults(hardware=check_hardware(values.pop("hardware"), f"profile {profile}"))
    unknown = sorted(set(values) - any_command)
    if unknown:
        raise ConfigError(f"profile {profile} sets unknown option {unknown[0]!r}")
    actions = {a.dest: a for a in parser._actions}
    parser.set_defaults(**{k: _profile_value(profile, actions[k], v) for k, v in values.items() if k in actions})


def _profile_value(profile: Path, action: argparse.Action, value):
    """A profile value, checked and converted as the flag's own would be."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"profile {profile}: {action.dest} must be true or false, not {value!r}")
        return value
    try:
        value = action.type(str(value)) if action.type is not None else str(value)
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise ConfigError(f"profile {profile}: {action.dest} = {value!r} is invalid ({e})") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"profile {profile}: {action.dest} must be one of {sorted(action.choices)}, not {value!r}")
    return value


def output_path(path: Path | None) -> Path | None:
    """Check where a result will go before the long work that produces it."""
    return None if path is None else check_output_path(path)


def model_path(args) -> str:
    if args.model is not None:
        if not args.model.strip():
            raise ConfigError("--model is empty; pass a model directory, or leave --model out for the bundled model")
        return args.model
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise ConfigError(f"the bundled default model is missing from {DEFAULT_MODEL}; pass --model PATH")
    return str(DEFAULT_MODEL)


def run_config(args) -> "RunConfig":
    from offload_engine.run_config import RunConfig

    return RunConfig.build(
        device=args.device, dtype=args.dtype, memory_budget=args.memory_budget, expert_slots=args.expert_slots,
        host_memory=args.host_memory, max_context=args.max_context, max_batch=args.max_batch,
        policy=args.policy, predictor=args.predictor, prefetch_depth=args.prefetch_depth,
        cold_experts=args.cold_experts, cpu_moe_layers=args.cpu_moe_layers, threads=args.threads,
        hardware=args.hardware, progress=not args.quiet, expert_dtype=args.expert_dtype,
        cpu_weights=args.cpu_weights,
    )
