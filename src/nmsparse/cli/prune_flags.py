"""Flags shared by ``nmsparse prune`` and its ``--hf`` path (:mod:`nmsparse.cli.prune_hf`): the dense
layers list, the per-method options and their errors worded with the flags' names."""

from __future__ import annotations

import argparse
import re


def keep_dense_list(text: str) -> tuple[str, ...]:
    """``--keep-dense first,last`` -> ``("first", "last")``; ``none`` or empty -> ``()``."""
    return () if text.strip().lower() in ("none", "") else tuple(t.strip() for t in text.split(",") if t.strip())


def method_options(args: argparse.Namespace) -> dict:
    """The per-method flags the user gave (``--solver``, ``--damp``, ``--iterations``, ``--adam-batch``),
    as :func:`nmsparse.prune` keywords; a flag the method does not take is prune's error."""
    given = dict(solver=args.solver, damp=args.damp, iterations=args.iterations, batch_size=args.adam_batch)
    return {k: v for k, v in given.items() if v is not None}


FLAG_OF = {"solver": "--solver", "damp": "--damp", "iterations": "--iterations", "batch_size": "--adam-batch"}


def method_flag_error(args: argparse.Namespace) -> str | None:
    """prune's error for a per-method flag the method does not take, worded with the flag's name."""
    from nmsparse.pruning.options import resolve

    given = method_options(args)
    try:
        resolve(args.method, given)
    except ValueError as e:
        msg = str(e)
        for k, v in given.items():
            if msg.startswith(f"{k}={v!r} does not apply"):
                return f"{FLAG_OF[k]} {v} does not apply to --method {args.method}" + msg.split(")", 1)[0].split(
                    f"method={args.method!r}", 1)[1] + ")"
        msg = msg.replace("solver='adam'", "--solver adam").replace("solver='exact'", "--solver exact")
        return re.sub(r"\b(iterations|batch_size|damp)\b(?= |,)", lambda mt: FLAG_OF[mt.group(1)], msg)
    return None
