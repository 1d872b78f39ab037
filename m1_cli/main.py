"""The ``m1`` command: ``m1 convert``, ``m1 import``, ``m1 demo``, ``m1 eval`` ...

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds its parser and
sets ``func`` (a callable taking the parsed args, returning an exit code). Heavy imports (torch,
vLLM) happen inside the commands, so ``m1 --help`` stays fast.
"""

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = ("m1_cli.core", "m1_eval.cli", "verl_m1.data")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every installed subcommand."""
    parser = argparse.ArgumentParser(
        prog="m1",
        description="Build, train, serve and evaluate M1 hybrid Mamba reasoning models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or not name.startswith(err.name):
                raise  # a real import error inside an installed subcommand
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``m1`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"m1 {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
