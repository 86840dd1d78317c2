"""benchmarks/gpu_check.py (``make gpu-check``) runs end to end on the CPU in its smoke mode."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_smoke_writes_every_section(gpu_check, tmp_path):
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["environment"]["device"] == "cpu"
    for section in ("masks", "linear", "mlp", "gpt", "fsdp"):
        assert "error" not in report[section], report[section]
    assert set(report["masks"]["results"]) == {"abs", "nm_mask 2:4", "transposable 2:4 optimal",
                                               "transposable 2:4 approx",
                                               "transposable 2:4 approx, gathering repair (host reads; experiment)"}
    rows = report["linear"]["rows"]
    assert [r["shape"] for r in rows] == [[16, 64, 128], [32, 128, 64]]
    assert all(r["max_rel_err"]["emulated"] < 1e-2 for r in rows)
    assert report["linear"]["goal >= 1.3x on the three large"] is False  # those shapes were not run
    assert set(report["mlp"]["results"]) == {"dense", "masked-dense", "semi-structured"}
    assert all("input gradient sparse" in v for v in report["mlp"]["backend_layers"].values())
    md = (tmp_path / "gpu_check.md").read_text()
    assert set(report["gpt"]["results"]) == {"dense", "masked-dense", "semi-structured"}
    assert len(report["gpt"]["backend_layers"]) == 4
    assert "## Linear inference" in md and "## MLP block 64->128->64" in md and "## GPT block" in md
    assert set(report["fsdp"]["results"]) == {"unsharded", "fsdp local masks", "fsdp gathered masks"}
    for v in report["fsdp"]["against unsharded"].values():
        assert v["masks_equal"] and v["max_abs_diff"] < 1e-5
    assert "## FSDP2 on one process" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_needs_cuda_without_smoke(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _run(cmd, tmp_path, **env):
    import os
    import subprocess

    e = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src"), **env}
    return subprocess.run(cmd, cwd=SCRIPT.parents[1], env=e, capture_output=True, text=True, timeout=300)


def _one_line(stderr: str) -> list[str]:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("make")]
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    return lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_make_gpu_check_without_cuda_is_one_line(tmp_path):
    import shutil
    import sys

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = _run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}"], tmp_path)
    assert r.returncode != 0
    assert "CUDA is not available" in _one_line(r.stderr)[0]


def test_python_without_torch_is_one_line(tmp_path):
    import sys

    (tmp_path / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    r = _run([sys.executable, str(SCRIPT)], tmp_path, PYTHONPATH=str(tmp_path))
    assert r.returncode == 2
    assert "cannot import torch" in _one_line(r.stderr)[0]
