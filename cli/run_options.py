"""Flags shared by the commands that load a model, and the one place they become a RunConfig."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from offload_engine.errors import ConfigError
from offload_engine.run_config import RunConfig

import offload_engine

DEFAULT_MODEL = Path(offload_engine.__file__).resolve().parent / "default_model"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory or Hugging Face hub id (default: the bundled model)")
    p.add_argument("--profile", type=Path, help="TOML file of flag defaults (see profiles/); flags given win")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the checkpoint's, as transformers loads it)")
    p.add_argument("--memory-budget", help="device memory the engine may use, e.g. 6GiB (default: automatic)")
    p.add_argument("--expert-slots", type=positive_int, help="number of expert slots (instead of a budget)")
    p.add_argument("--host-memory", choices=["mmap", "files", "ram", "pinned"],
                   help="where cold experts wait: pinned or ram (host memory), or read on demand from the "
                        "checkpoint through a memory map (mmap) or positional reads (files) "
                        "(default: pinned with CUDA if they fit in RAM, else mmap)")
    p.add_argument("--max-context", type=positive_int, help="tokens of KV cache to plan for (default: min(model, 4096))")
    p.add_argument("--max-batch", type=positive_int, default=1, help="prompts per batch to plan for")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def apply_profile(parser: argparse.ArgumentParser, argv: list[str] | None, any_command: set[str]) -> None:
    """Read --profile first so its values become defaults that explicit flags override. A key of another
    command (max_new_tokens for `plan`) is skipped, so one profile serves plan and generate; a key no command
    knows is refused."""
    pre, _ = parser.parse_known_args(argv)
    profile = getattr(pre, "profile", None)
    if profile is None:
        return
    try:
        values = tomllib.loads(Path(profile).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read profile {profile}: {e}") from None
    values = {k.replace("-", "_"): v for k, v in values.items()}
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
    if path is not None and not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
    return path


def model_path(args) -> str:
    if args.model:
        return args.model
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise ConfigError(f"the bundled default model is missing from {DEFAULT_MODEL}; pass --model PATH")
    return str(DEFAULT_MODEL)


def run_config(args) -> RunConfig:
    return RunConfig.build(
        device=args.device, dtype=args.dtype, memory_budget=args.memory_budget, expert_slots=args.expert_slots,
        host_memory=args.host_memory, max_context=args.max_context, max_batch=args.max_batch,
        progress=not args.quiet,
    )
