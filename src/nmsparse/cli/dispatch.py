"""The ``nmsparse`` command line: one sub-command per module in ``COMMANDS``.

Each command module exposes ``add_parser(subparsers)``, which registers its parser and sets
``func`` (taking the parsed ``argparse.Namespace`` and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ["nmsparse.cli.train", "nmsparse.cli.reproduce", "nmsparse.cli.prune", "nmsparse.cli.export",
            "nmsparse.cli.inspect", "nmsparse.cli.distill"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, nothing written
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nmsparse", description="N:M structured sparsity for PyTorch (N = weights kept per group of M).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
