"""The documented path (docs/interop.md): a stranded sparse-24-bitmask model -> nmsparse -> the CPU
kernel (to_nm_linear), PyTorch's semi-structured kernels (CUDA; their packing emulated on the CPU) and
ONNX, with outputs equal to those of the decompressed dense model."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from nmsparse import semi_structured_plan, to_nm_linear, to_semi_structured  # noqa: E402
from nmsparse.integrations.compressed_tensors import load  # noqa: E402
from nmsparse.kernels import EmulatedOps  # noqa: E402
from nmsparse.kernels.cpu_select import choose  # noqa: E402

FIX = Path(__file__).parent / "fixtures" / "compressed_tensors"
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def _stranded(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the FP8 note
        model = load(FIX / name)
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("name", ["llama_bf16", "llama_fp8_tensor"])
def test_cpu_kernel_reproduces_the_dense_model(name):
    model = _stranded(name)
    dense = copy.deepcopy(model)
    # tune=False: the fixture's layers are tiny, so timing at conversion would (rightly) keep them dense
    report = to_nm_linear(model, 2, 4, min_weights=0, tune=False)
    if choose(4, model.lm_head.weight.dtype).path == "dense":
        pytest.skip("no N:M kernel for this CPU: every layer stays dense")
    assert len(report.converted) == 14 and "lm_head" in {c.name for c in report.dense}
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, dense(IDS).logits)


def test_semi_structured_packing_on_cpu():
    """What to_semi_structured hands to PyTorch (CUTLASS-packed 2:4), emulated: it unpacks to the weight."""
    model = _stranded("llama_bf16")
    plan = {e.name: e for e in semi_structured_plan(model, need_cuda=False)}
    assert not plan["lm_head"].sparse
    assert sum(e.sparse for e in plan.values()) == 2  # the two down_proj (32x64); smaller ones stay dense
    ops = EmulatedOps()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    for name, e in plan.items():
        if name == "lm_head":
            continue
        w = model.get_submodule(name).weight.detach()
        if e.sparse:
            handle = ops.compress(w)
            assert torch.equal(ops.decompress(handle), w), name
            assert torch.equal(ops.linear(x[:, : w.shape[1]], handle), F.linear(x[:, : w.shape[1]], w)), name
        else:
            assert e.reason, name  # left dense with its reason (e.g. too small for the kernels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="to_semi_structured needs a CUDA GPU")
def test_semi_structured_on_cuda():
    model = _stranded("llama_bf16").cuda()
    dense = copy.deepcopy(model)
    to_semi_structured(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS.cuda()).logits, dense(IDS.cuda()).logits, rtol=1e-2, atol=1e-2)


@pytest.mark.slow  # torch.onnx.export of a LLaMA graph
def test_onnx_reproduces_the_dense_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from nmsparse.export import export_onnx

    model = _stranded("llama_fp8_channel").float()
    mask = {"attention_mask": torch.ones_like(IDS)}  # without it torch.export fixes the batch of 1
    report = export_onnx(model, (IDS,), tmp_path / "m.onnx", n=2, m=4, example_kwargs=mask)  # checks onnxruntime
    assert len(report.by_status("n:m")) == 14 and not report.broken
    assert report.checked and report.max_abs_diff < 1e-5
