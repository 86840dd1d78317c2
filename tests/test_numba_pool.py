"""nmsparse.plumbing.numba_pool: numba's OpenMP pool starts with a passive wait policy, leaves torch alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import os, torch
torch.set_num_threads(1)
import nmsparse
x = torch.randn(512, 256)
nmsparse.nm_mask(x, 2, 4)  # first parallel numba kernel: starts the pool
print("threads", torch.get_num_threads(), "policy-env", os.environ.get("OMP_WAIT_POLICY"))
"""


def run(env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update({"OMP_DISPLAY_ENV": "VERBOSE", "NUMBA_NUM_THREADS": "2", **env_extra})
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)


def spin_counts(stderr: str) -> list[str]:
    """libgomp's spin count of each OpenMP runtime, in the order they started (OMP_DISPLAY_ENV=VERBOSE
    output): 300000 by default (workers spin a while after each parallel region), 0 when passive."""
    return [line.split("=")[1].strip().strip("'") for line in stderr.splitlines()
            if line.strip().startswith("GOMP_SPINCOUNT")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp's OMP_DISPLAY_ENV output")
def test_numba_pool_starts_passive_and_restores_torch_and_environment():
    out = run({})
    assert out.returncode == 0, out.stderr
    assert "threads 1 policy-env None" in out.stdout  # torch's thread count and the environment as before
    seen = spin_counts(out.stderr)
    if len(seen) < 2:
        pytest.skip(f"numba and torch share one OpenMP runtime here ({seen})")
    assert seen[0] != "0" and seen[-1] == "0"  # torch's runtime untouched, numba's passive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp's OMP_DISPLAY_ENV output")
def test_numba_pool_respects_the_users_wait_policy():
    out = run({"OMP_WAIT_POLICY": "ACTIVE"})
    assert out.returncode == 0, out.stderr
    assert "policy-env ACTIVE" in out.stdout
    seen = spin_counts(out.stderr)
    assert seen and "0" not in seen and len(set(seen)) == 1  # both runtimes as the user asked
