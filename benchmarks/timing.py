"""Shared set-up of the CPU kernel benchmarks: thread count, clock, load average.

``--clock cpu`` times process CPU time, which other jobs on a shared machine disturb far less than
wall time; it needs ``--threads 1`` (with more threads CPU time adds up the threads' spinning).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch


def add_args(ap: argparse.ArgumentParser, threads: int = 2) -> None:
    """Add ``--threads`` and ``--clock`` to a benchmark's parser."""
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (needs --threads 1; less sensitive to other jobs on a shared machine)")


def setup(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Callable[[], float]:
    """Check the two options, set torch's thread count, return the clock to time with."""
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu needs --threads 1 (with more threads CPU time adds up the threads' spinning)")
    torch.set_num_threads(args.threads)
    return time.process_time if args.clock == "cpu" else time.perf_counter


def load() -> str:
    """The load average (1/5/15 min), as printed next to every figure."""
    return "/".join(f"{v:.1f}" for v in os.getloadavg())
