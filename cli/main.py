"""`moe-offload`: one sub-command per module, each parses its flags, builds a config and calls the library."""

import argparse
import sys

from offload_engine.errors import OffloadEngineError

from . import consistency_cmd

COMMANDS = {"consistency": consistency_cmd}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-offload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with 2 and one usage line on a bad flag
    try:
        return COMMANDS[args.command].run(args) or 0
    except OffloadEngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
