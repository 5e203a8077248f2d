"""moe-offload: run Mixture-of-Experts models on GPUs (or RAM) too small to hold them."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading

from offload_engine.errors import OffloadEngineError, one_line

# Each command's module is imported to build its flags; torch and transformers wait until a command runs,
# so that `--help` and a mistyped flag answer at once.
COMMANDS = {
    "generate": "offload_engine.cli.generate_cmd",
    "plan": "offload_engine.cli.plan_cmd",
    "trace": "offload_engine.cli.trace_cmd",
    "consistency": "offload_engine.cli.consistency_cmd",
    "simulate": "offload_engine.cli.simulate_cmd",
    "predictor": "offload_engine.cli.predictor_cmd",
    "calibrate": "offload_engine.cli.calibrate_cmd",
    "estimate": "offload_engine.cli.estimate_cmd",
    "export-plan": "offload_engine.cli.export_plan_cmd",
    "serve": "offload_engine.cli.serve_cmd",
}
LOADS_A_MODEL = frozenset({"generate", "plan", "trace", "predictor", "calibrate", "estimate", "export-plan",
                           "serve"})  # their runs import transformers


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows each flag's default: the parser's own, appended where the help does not state it already.
    A default of None means "decided at run time" (the profile's value, or a rule the help describes): there
    the help string says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        default = action.default
        if (not text or "default" in text or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool)):
            return text
        return text + (" (default: %(default)r)" if isinstance(default, str) else " (default: %(default)s)")


class OneLineParser(argparse.ArgumentParser):
    """A bad flag gets one line (what is wrong, where to look) and exit code 2, not a usage dump."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="moe-offload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub, name)
    return parser


def quiet_libraries() -> None:
    """The one place the CLI touches a library's global settings: transformers' warnings (e.g. 'sequence
    longer than the maximum') would stand beside, and contradict, the engine's own one-line errors."""
    from transformers.utils import logging

    logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    in_main_thread = threading.current_thread() is threading.main_thread()  # signals reach that thread only
    previous = signal.signal(signal.SIGINT, _on_interrupt) if in_main_thread else None  # the CLI's one handler
    try:
        return _run(argv)
    except KeyboardInterrupt:  # one word, no traceback
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


def _on_interrupt(signum, frame) -> None:
    """Ctrl-C is a KeyboardInterrupt, which main unwinds (an atomic write removes its temporary file on the
    way). Inside an import it is not: libraries turn it into an ImportError or swallow it while probing for
    optional packages, so there the process leaves at once. (An import in the middle of a write, such as an
    image codec loaded on first use, would leave that write's temporary file; never the target.)"""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
                sys.stderr.write("interrupted\n")
                sys.stderr.flush()
            os._exit(130)
        frame = frame.f_back
    raise KeyboardInterrupt


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = _parse(parser, argv)
        if getattr(args, "profile", None) is not None:
            from .run_options import apply_profile

            subparsers = _subparsers(parser)
            any_command = {a.dest for p in subparsers.values() for a in p._actions}
            apply_profile(subparsers[args.command], _after_command(argv, args.command), any_command)
            args = _parse(parser, argv)
        if getattr(args, "quiet", None) is False and not _is_terminal(sys.stderr):
            args.quiet = True  # a bar redraws itself in place: in a redirected log it is lines of carriage returns
        if args.command in LOADS_A_MODEL:
            quiet_libraries()
        return importlib.import_module(COMMANDS[args.command]).run(args) or 0
    except OffloadEngineError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (an output folder that does not exist, a full disk...)
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {one_line(f'{e.strerror or e}{where}')}", file=sys.stderr)
        return 2


def _is_terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Flags no command knows are reported by that command's parser, so the hint names its --help."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _subparsers(parser)[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _after_command(argv: list[str] | None, command: str) -> list[str]:
    argv = sys.argv[1:] if argv is None else argv
    return argv[argv.index(command) + 1:]


if __name__ == "__main__":
    sys.exit(main())
