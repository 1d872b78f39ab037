"""The ``m1`` command: ``m1 convert``, ``m1 import``, ``m1 demo``, ``m1 eval`` ...

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds its parser and
sets ``func`` (a callable taking the parsed args, returning an exit code). Heavy imports (torch,
vLLM) happen inside the commands, so ``m1 --help`` stays fast.
"""

import argparse
import importlib
import importlib.util
import sys

SUBCOMMAND_MODULES = ("m1_cli.core", "m1_eval.cli")
# Subcommands whose module is heavy to import (it pulls torch/transformers at import time): listed
# here with their one-line help, imported only when chosen.
LAZY_SUBCOMMANDS = {
    "grpo-data": ("verl_m1.data", "MATH-style JSONL -> VeRL GRPO parquet (paper prompt suffix)"),
}


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
    for name, (module_name, help_text) in LAZY_SUBCOMMANDS.items():
        if importlib.util.find_spec(module_name.split(".")[0]) is not None:
            stub = subparsers.add_parser(name, help=help_text, add_help=False)
            stub.set_defaults(lazy_module=module_name)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if getattr(args, "lazy_module", None) is None:
        return parser.parse_args(argv)
    # Build the real parser of the chosen heavy subcommand and parse again with it.
    full = argparse.ArgumentParser(prog="m1")
    importlib.import_module(args.lazy_module).register(full.add_subparsers(dest="command", metavar="COMMAND"))
    return full.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``m1`` console script."""
    args = _parse(argv)
    if not getattr(args, "func", None):
        build_parser().print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"m1 {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
