"""Shared fixtures."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture
def run_with_one_numba_thread():
    """Run Python ``code`` in a fresh interpreter with ``NUMBA_NUM_THREADS=1`` (so that numba's thread
    pool differs from torch's) and return its standard output."""

    def run(code: str) -> str:
        env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout

    return run
