"""ONNX export of finalized N:M models, checked with the real tools: ``onnx`` reads the file back and
``onnxruntime`` (CPU) runs it against PyTorch. The N:M checks of the file are compared with a
brute-force count over the initializers along the axis each consuming node reduces over."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.export import OnnxReport, export_onnx
from nmsparse.export.onnx import check_initializers
from nmsparse.training.models import build_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the torch.export-based exporter translates through it
from onnx import helper, numpy_helper  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def _build_torchlib_registry_once():
    """torch.onnx.export rebuilds its op registry from onnxscript's sources on every call (seconds on a
    loaded machine); nothing here changes it, so build it once per opset (test speed only: the export
    path itself is untouched)."""
    try:
        from torch.onnx._internal.exporter import _registration
        build = _registration.ONNXRegistry.__dict__["from_torchlib"].__func__
    except (ImportError, KeyError, AttributeError):
        yield
        return
    cache: dict = {}

    def cached(cls, *args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = build(cls, *args, **kwargs)
        return cache[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(cached))
    yield
    mp.undo()


def brute_nm(arr, n: int, m: int, axis: int) -> bool:
    """At most n non-zeros in every m consecutive entries along ``axis``, by explicit loops."""
    a = torch.from_numpy(arr.copy()).movedim(axis, -1)
    rows = a.reshape(-1, a.shape[-1])
    for row in rows:
        for s in range(0, row.numel(), m):
            if int((row[s:s + m] != 0).sum()) > n:
                return False
    return True


def ort_run(path, feeds: dict) -> list:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


def inits(path) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_resnet_2_4_pruned_magnitude(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet")
    nmsparse.prune(model, 2, 4, method="magnitude")  # plain weights with zeros: finalized already
    model.train()
    x = torch.randn(2, 1, 28, 28)
    report = export_onnx(model, (x,), tmp_path / "resnet.onnx", n=2, m=4)
    assert model.training  # the mode is restored
    assert sorted(os.listdir(tmp_path)) == ["resnet.onnx"]  # one file, no temporary left behind
    by_param = {c.param: c for c in report.initializers}
    convs = [k for k, v in model.named_modules() if isinstance(v, nn.Conv2d)]
    for k in convs[1:]:
        c = by_param[f"{k}.weight"]
        assert (c.op, c.axis, c.status, c.two_four) == ("Conv", 1, "n:m", True), c
        assert len(c.nodes) == 1 and c.nodes[0]  # the Conv node reading it, by name
    assert by_param["conv1.weight"].status == "dense" and by_param["fc.weight"].status == "dense"
    assert {c.note for c in report.initializers} == {"rows rescaled (a BatchNorm folded in)", ""}
    assert by_param["fc.weight"].note == "" and by_param["conv1.weight"].note != ""
    assert by_param["fc.weight"].op == "Gemm(transB=1)"
    assert not report.broken and report.max_abs_diff < 1e-4
    # brute force over the file: every inner conv is 2:4 along input channels at each kernel position
    arrays = inits(tmp_path / "resnet.onnx")
    for k in convs[1:]:
        assert brute_nm(arrays[f"{k}.weight"], 2, 4, 1), k
    assert not brute_nm(arrays["conv1.weight"], 2, 4, 0)
    # a different batch: onnxruntime agrees with PyTorch on inputs the export never saw
    x2 = torch.randn(2, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        ref = model(x2)
    (got,) = ort_run(tmp_path / "resnet.onnx", {"input": x2})
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-5)
    d = json.loads(json.dumps(report.to_dict()))  # JSON-ready, as the CLI writes it
    assert d["n"] == 2 and d["max_abs_diff"] == report.max_abs_diff and len(d["initializers"]) == 10
    table = report.table()
    assert "8 N:M (2:4), 2 dense, 0 broken" in table and "TensorRT can use its sparse kernels" in table


def test_mlp_4_8_is_nm_but_not_2_4(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp")
    nmsparse.prune(model, 4, 8, method="magnitude", keep_dense=())
    x = torch.randn(3, 1, 28, 28)
    report = export_onnx(model, (x,), tmp_path / "mlp.onnx", n=4, m=8, layout="flat", opset=18)
    assert report.opset == 18 and onnx.load(str(tmp_path / "mlp.onnx")).opset_import[0].version == 18
    arrays = inits(tmp_path / "mlp.onnx")
    assert [c.status for c in report.initializers] == ["n:m"] * 3
    for c in report.initializers:
        assert c.op == "Gemm(transB=1)" and c.axis == 1 and not c.two_four
        assert brute_nm(arrays[c.name], 4, 8, 1) and not brute_nm(arrays[c.name], 2, 4, 1)
        assert "not 2:4" in c.note
    assert "4:8 is N:M but not 2:4: TensorRT will run those layers dense" in report.table()
    assert report.max_abs_diff < 1e-4


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def test_tiny_bert_2_4_matmul_initializers_are_transposed(tmp_path):
    model = tiny_bert()
    nmsparse.prune(model, 2, 4, method="magnitude", include="encoder.*", keep_dense=())
    ids = torch.randint(5, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    am = torch.ones(2, 10, dtype=torch.long)
    am[1, 6:] = 0
    report = export_onnx(model, (ids,), tmp_path / "bert.onnx", n=2, m=4, example_kwargs={"attention_mask": am})
    linears = {f"{k}.weight" for k, v in model.named_modules()
               if isinstance(v, nn.Linear) and k.startswith("encoder.")}
    nm = {c.param: c for c in report.by_status("n:m")}
    assert set(nm) == linears and len(linears) == 6
    params = dict(model.named_parameters())
    arrays = inits(tmp_path / "bert.onnx")
    for k, c in nm.items():
        # the exporter folds the Linear's transpose into an (in, out) MatMul initializer: N:M on axis 0
        assert c.op == "MatMul" and c.axis == 0 and c.two_four, c
        assert torch.equal(torch.from_numpy(arrays[c.name].copy()), params[k].detach().t())
        assert brute_nm(arrays[c.name], 2, 4, 0) and not brute_nm(arrays[c.name], 2, 4, 1)
    assert report.max_abs_diff < 1e-4 and len(report.outputs) == 2  # last_hidden_state, pooler_output


class Odd(nn.Module):
    """A flat-layout N:M conv, a good N:M Linear, a Linear N:M along its *output* axis, an unused one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.good = nn.Linear(8 * 4 * 4, 16)
        self.bad = nn.Linear(16, 16)
        self.unused = nn.Linear(16, 16)
        with torch.no_grad():
            w = self.conv.weight
            w.mul_(nmsparse.layer_mask(w, 2, 4, layout="flat"))
            self.good.weight.mul_(nmsparse.layer_mask(self.good.weight, 2, 4))
            self.bad.weight.mul_(nmsparse.nm_mask(self.bad.weight, 2, 4, dim=0))
            self.unused.weight.mul_(nmsparse.layer_mask(self.unused.weight, 2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bad(torch.relu(self.good(torch.flatten(self.conv(x), 1))))


def test_broken_layouts_fail_then_are_reported(tmp_path):
    torch.manual_seed(0)
    model = Odd()
    assert nmsparse.layer_is_nm(model.conv.weight, 2, 4, "flat")
    assert not nmsparse.layer_is_nm(model.conv.weight, 2, 4, "channels")
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"2 exported weight\(s\) break the 2:4 pattern TensorRT reads, first "
                       r"conv.weight .*in the flat layout but not along axis 1.*nothing was written.*allow_broken"):
        export_onnx(model, (x,), tmp_path / "odd.onnx", n=2, m=4)
    assert os.listdir(tmp_path) == []
    report = export_onnx(model, (x,), tmp_path / "odd.onnx", n=2, m=4, allow_broken=True)
    by_param = {c.param: c for c in report.initializers}
    assert by_param["conv.weight"].status == "broken"
    assert by_param["good.weight"].status == "n:m"
    assert by_param["bad.weight"].status == "broken"
    assert "2:4 along axis 0 but not along axis 1" in by_param["bad.weight"].note
    assert by_param["unused.weight"].status == "not exported"
    assert "2 broken, 1 not exported" in report.table()


def test_a_dense_initializer_edited_into_the_file_is_reported(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp")
    nmsparse.prune(model, 2, 4, method="magnitude")
    path = tmp_path / "mlp.onnx"
    export_onnx(model, (torch.randn(1, 1, 28, 28),), path, n=2, m=4)
    proto = onnx.load(str(path))
    assert {c.status for c in check_initializers(proto, model, 2, 4)} == {"n:m", "dense"}
    target = next(i for i in proto.graph.initializer if i.name == "net.3.weight")  # hidden -> hidden
    dense = torch.randn(*target.dims).numpy()
    target.CopyFrom(numpy_helper.from_array(dense, target.name))
    checks = {c.param: c for c in check_initializers(proto, model, 2, 4)}
    # no longer equal to the PyTorch weight, but found by name: N:M in PyTorch, dense in the file
    assert checks["net.3.weight"].status == "broken"
    assert "2:4 in PyTorch but not along axis 1" in checks["net.3.weight"].note
    assert checks["net.1.weight"].status == "dense"  # the first Linear stayed dense (keep_dense)


def _graph(nodes, init_arrays, inputs):
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(a, k) for k, a in init_arrays.items()])
    return helper.make_model(g)


def test_reduction_axis_of_every_consumer_form():
    """Gemm with transB=0/1, Gemm's A input, MatMul A/B, Conv, and a Transpose in front of a MatMul,
    on a hand-built graph whose weights are 2:4 along exactly the axis each node reduces over."""
    torch.manual_seed(0)

    def nm_on(shape, axis):
        w = torch.randn(*shape)
        return (w * nmsparse.nm_mask(w, 2, 4, dim=axis)).numpy()

    arrays = {"gemm_t": nm_on((8, 16), 1), "gemm_n": nm_on((16, 8), 0), "gemm_a": nm_on((8, 16), 1),
              "mm_b": nm_on((16, 8), 0), "mm_a": nm_on((8, 16), 1), "conv": nm_on((8, 16, 3, 3), 1),
              "tr": nm_on((8, 16), 1)}
    nodes = [
        helper.make_node("Gemm", ["x", "gemm_t"], ["a"], transB=1, name="fc"),
        helper.make_node("Gemm", ["x", "gemm_n"], ["b"]),
        helper.make_node("Gemm", ["gemm_a", "xt"], ["c"]),
        helper.make_node("MatMul", ["x", "mm_b"], ["d"]),
        helper.make_node("MatMul", ["mm_a", "xt"], ["e"]),
        helper.make_node("Conv", ["img", "conv"], ["f"]),
        helper.make_node("Transpose", ["tr"], ["tr_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "tr_t"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, None) for k in ("x", "xt", "img")]
    proto = _graph(nodes, arrays, inputs)
    checks = {c.name: c for c in check_initializers(proto, nn.Identity(), 2, 4)}
    want = {"gemm_t": 1, "gemm_n": 0, "gemm_a": 1, "mm_b": 0, "mm_a": 1, "conv": 1, "tr": 1}
    assert {k: c.axis for k, c in checks.items()} == want
    assert {c.status for c in checks.values()} == {"n:m"}
    assert checks["tr"].op == "Transpose->MatMul" and checks["gemm_a"].op == "Gemm(A)"
    assert checks["gemm_t"].nodes == ("fc",)
    for k, ax in want.items():
        assert brute_nm(arrays[k], 2, 4, ax)


class Drift(nn.Module):
    """Adds 1 to its output while being exported: the file and PyTorch disagree by exactly 1."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        y = self.lin(x)
        return y + 1.0 if torch.compiler.is_exporting() else y


class Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1


def test_onnxruntime_mismatch_and_export_failure_write_nothing(tmp_path):
    with pytest.raises(RuntimeError, match=r"output 'logits': onnxruntime differs from PyTorch by up to 1 "
                       r"\(rtol=0.0001, atol=1e-05; inputs input \(2, 8\)\); nothing was written"):
        export_onnx(Drift(), (torch.randn(2, 8),), tmp_path / "d.onnx", n=2, m=4)
    with pytest.raises(RuntimeError, match=r"torch.onnx.export failed for Branchy: "):
        export_onnx(Branchy(), (torch.randn(2, 8),), tmp_path / "b.onnx", n=2, m=4)
    assert os.listdir(tmp_path) == []
    # without check=True the onnxruntime comparison is skipped and says so
    report = export_onnx(Drift(), (torch.randn(2, 8),), tmp_path / "d.onnx", n=2, m=4, check=False)
    assert report.outputs == [] and "onnxruntime comparison not run" in report.table()
    assert isinstance(report, OnnxReport)


def test_every_input_error_before_anything_is_written(tmp_path):
    lin = nn.Linear(8, 4)
    x = torch.randn(2, 8)
    ok = dict(n=2, m=4)
    out = tmp_path / "f.onnx"
    cases = [
        (lambda: export_onnx("model", (x,), out, **ok), r"model must be a torch.nn.Module, got str"),
        (lambda: export_onnx(lin, 3, out, **ok), r"example_inputs must be a tuple of tensors, e\.g\. \(x,\), got int"),
        (lambda: export_onnx(lin, (x, 3), out, **ok), r"example_inputs\[1\] must be a torch.Tensor, got int"),
        (lambda: export_onnx(lin, (), out, **ok), r"example_inputs is empty"),
        (lambda: export_onnx(lin, (x,), out, example_kwargs=[1], **ok), r"example_kwargs must be a dict"),
        (lambda: export_onnx(lin, (), out, example_kwargs={"input": 1}, **ok),
         r"example_kwargs\['input'\] must be a torch.Tensor, got int"),
        (lambda: export_onnx(lin, (x,), tmp_path, **ok), r"is a directory; give the .onnx file to write"),
        (lambda: export_onnx(lin, (x,), tmp_path / "no" / "f.onnx", **ok), r"directory .*no' does not exist"),
        (lambda: export_onnx(lin, (x,), 5, **ok), r"path must be a file path \(str or os.PathLike\), got int"),
        (lambda: export_onnx(lin, (x,), out, opset=17, **ok), r"opset must be None or an integer from 18"),
        (lambda: export_onnx(lin, (x,), out, opset="20", **ok), r"opset must be None or an integer from 18"),
        (lambda: export_onnx(lin, (x,), out, rtol=-1, **ok), r"rtol must be a finite number >= 0, got -1"),
        (lambda: export_onnx(lin, (x,), out, atol=float("nan"), **ok), r"atol must be a finite number >= 0"),
        (lambda: export_onnx(lin, (x,), out, check=1, **ok), r"check must be True or False, got 1"),
        (lambda: export_onnx(lin, (x,), out, allow_broken="yes", **ok), r"allow_broken must be True or False"),
        (lambda: export_onnx(lin, (x,), out, n=4, m=4), r"need 0 < n < m"),
        (lambda: export_onnx(lin, (x,), out, layout="rows", **ok), r"layout must be one of \('channels', 'flat'\)"),
        (lambda: export_onnx(lin, (torch.randn(2, 7),), out, **ok),  # was torch's bare RuntimeError
         r"Linear fails on the example inputs \(RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
        (lambda: export_onnx(lin, (torch.ones(2, 8, dtype=torch.long),), out, **ok), r"fails on the example inputs"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    nmsparse.sparsify(model, 2, 4)
    with pytest.raises(ValueError, match=r"layer 1 still has its N:M parametrization \(1 such layers\): "
                       r"call nmsparse.finalize\(model\) before exporting"):
        export_onnx(model, (x,), out, **ok)
    assert os.listdir(tmp_path) == []


def test_missing_packages_are_named(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ImportError, match=r"export_onnx needs onnxscript: pip install 'nmsparse\[onnx\]'"):
        export_onnx(nn.Linear(8, 4), (torch.randn(2, 8),), tmp_path / "f.onnx", n=2, m=4)
    assert os.listdir(tmp_path) == []


def test_gpt2_conv1d_gemm_and_tied_head(tmp_path):
    """transformers' Conv1D keeps its weight ``(in, out)`` and becomes ``Gemm(transB=0)``: N:M on axis 0.
    The tied head becomes a MatMul on a transposed copy of the token embedding, mapped back to it."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    conv1d = {f"{k}.weight" for k, v in model.named_modules() if type(v).__name__ == "Conv1D"}
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k in conv1d:
                p.mul_(nmsparse.nm_mask(p, 2, 4, dim=0))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    report = export_onnx(model, (ids,), tmp_path / "gpt2.onnx", n=2, m=4)
    nm = {c.param: c for c in report.by_status("n:m")}
    assert set(nm) == conv1d and len(conv1d) == 4
    assert all(c.op == "Gemm(transB=0)" and c.axis == 0 and c.two_four for c in nm.values())
    (head,) = report.by_status("dense")
    assert head.param == "transformer.wte.weight" and head.note == "transposed" and head.shape == (32, 100)
    assert report.max_abs_diff < 1e-4


class _Value:
    def __init__(self, name: str) -> None:
        self.name = name


class _StubSession:
    """Stands in for onnxruntime.InferenceSession to reach the consistency errors a real export never hits."""

    inputs, outputs, result, fail = ["input"], ["y"], None, None

    def __init__(self, *a, **k) -> None:
        if self.fail == "load":
            raise ValueError("cannot load\nmore lines")

    def get_inputs(self):
        return [_Value(k) for k in self.inputs]

    def get_outputs(self):
        return [_Value(k) for k in self.outputs]

    def run(self, names, feeds):
        if self.fail == "run":
            raise ValueError("NOT_IMPLEMENTED : Could not find an implementation for Conv(11) node")
        return self.result


def test_onnxruntime_consistency_errors(tmp_path, monkeypatch):
    from nmsparse.export.onnx_io import graph_inputs
    from nmsparse.export.onnx_run import compare

    lin = nn.Linear(8, 4).eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        y = lin(x).numpy()
    io = graph_inputs(lin, (x,), {})
    monkeypatch.setattr(ort, "InferenceSession", _StubSession)

    def run(**stub):
        for k, v in stub.items():
            monkeypatch.setattr(_StubSession, k, v)
        return compare(lin, tmp_path / "f.onnx", io, [{}], None, None, ["y"])

    assert run(inputs=["input"], result=[y])["outputs"][0]["max_abs_diff"] == 0.0
    with pytest.raises(RuntimeError, match=r"the ONNX file takes inputs \['a', 'b'\] but the example gives "
                       r"\['input'\]; nothing was written"):
        run(inputs=["a", "b"])
    with pytest.raises(RuntimeError, match=r"onnxruntime returned 2 outputs, PyTorch 1; cannot compare them"):
        run(inputs=["input"], result=[y, y])
    with pytest.raises(RuntimeError, match=r"output 'y': onnxruntime shape \(4, 2\) != PyTorch \(2, 4\) \(inputs "
                       r"input \(2, 8\)\); nothing"):
        run(result=[y.T.copy()])
    with pytest.raises(RuntimeError, match=r"onnxruntime could not run the file: ValueError: NOT_IMPLEMENTED .*"
                       r"pass check=False to skip the comparison; nothing was written"):
        run(fail="run")
    with pytest.raises(RuntimeError, match=r"onnxruntime could not run the file: ValueError: cannot load; pass"):
        run(fail="load")
    assert os.listdir(tmp_path) == []  # its scratch folder is removed
