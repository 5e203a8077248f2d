"""moe-offload: run Mixture-of-Experts models on GPUs (or RAM) too small to hold them."""

from __future__ import annotations

import argparse
import sys

from offload_engine.errors import OffloadEngineError

from . import consistency_cmd, generate_cmd, plan_cmd, trace_cmd
from .run_options import apply_profile

COMMANDS = {"generate": generate_cmd, "plan": plan_cmd, "trace": trace_cmd, "consistency": consistency_cmd}


class OneLineParser(argparse.ArgumentParser):
    """A bad flag gets one line (what is wrong, where to look) and exit code 2, not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="moe-offload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, module in COMMANDS.items():
        module.add_parser(sub, name)
    return parser


def quiet_libraries() -> None:
    """The one place the CLI touches a library's global settings: transformers' warnings (e.g. 'sequence
    longer than the maximum') would stand beside, and contradict, the engine's own one-line errors."""
    from transformers.utils import logging

    logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "profile", None) is not None:
            subparsers = _subparsers(parser)
            any_command = {a.dest for p in subparsers.values() for a in p._actions}
            apply_profile(subparsers[args.command], _after_command(argv, args.command), any_command)
            args = parser.parse_args(argv)
        return COMMANDS[args.command].run(args) or 0
    except OffloadEngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (an output folder that does not exist, a full disk...)
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _after_command(argv: list[str] | None, command: str) -> list[str]:
    argv = sys.argv[1:] if argv is None else argv
    return argv[argv.index(command) + 1:]


if __name__ == "__main__":
    sys.exit(main())
