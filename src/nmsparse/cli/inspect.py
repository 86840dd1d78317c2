"""``nmsparse inspect PATH [--json]``: the N:M pattern of every weight of a checkpoint.

Prints one row per weight tensor and a summary line (``--json``: the report as JSON). A damaged or
unknown file: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from nmsparse.cli.help import HelpFormatter


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show the N:M pattern of every weight of a checkpoint (safetensors, HF folder, ONNX, ...)",
        description="Read a safetensors file, a Hugging Face model folder (sharded or not), an nmsparse compressed "
                    "file, a training checkpoint, a compressed-tensors folder or an ONNX file, tensor by tensor "
                    "and without running code from it, and print for each weight its shape, dtype, the finest N:M "
                    "pattern along its reduction axis (N kept per group of M), whether it is transposable, and a "
                    "summary.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("path", help="file or folder to inspect")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from nmsparse.inspection.api import inspect

    try:
        report = inspect(args.path)
    except (ValueError, OSError) as e:  # LoadError / FormatError are ValueErrors
        first = (str(e).splitlines() or [type(e).__name__])[0]
        print(f"nmsparse inspect: error: {first}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0
