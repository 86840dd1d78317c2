"""nmsparse.distillation: fixed masks provably unchanged, SR-STE masks N:M throughout, a finalized N:M
student closer to its teacher, exact resume from checkpoints, and one clear error per bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nmsparse
from nmsparse.distillation import find_blocks
from nmsparse.distillation import losses as L
from nmsparse.plumbing.errors import LoadError
from nmsparse.masking.layout import layer_is_nm
from nmsparse.surgery.sparse_model import sparse_tensors


class Net(nn.Module):
    """A stem, a list of three identical blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Dropout(0.1))
                                     for _ in range(3)])
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def pair(seed: int = 0):
    torch.manual_seed(seed)
    teacher = Net().eval()
    student = copy.deepcopy(teacher)
    nmsparse.prune(student, 2, 4, method="magnitude", keep_dense=(), progress=False)
    return student, teacher


def data(k: int = 4):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 16, generator=g) for _ in range(k)]


def gap(student, teacher, xs) -> float:
    with torch.no_grad():
        return sum(float((student(x) - teacher(x)).pow(2).mean()) for x in xs)


SEL = dict(keep_dense=())


def test_fixed_masks_unchanged_student_finalized_and_closer():
    student, teacher = pair()
    xs = data()
    before = gap(student.eval(), teacher, xs)
    masks0 = nmsparse.magnitude_masks(student, 2, 4, keep_dense=())
    report = nmsparse.distill(student, teacher, xs, steps=40, lr=3e-3, nm=(2, 4), select=SEL, output_loss="mse",
                              progress=False)
    assert report.masks_unchanged is True and report.steps == 40 and report.layers == 5
    assert report.nm_checks == 4 + 1 and len(report.records) == 4
    assert not any(True for _ in sparse_tensors(student))  # finalized: plain weights
    for name, mod in student.named_modules():
        if isinstance(mod, nn.Linear):
            assert layer_is_nm(mod.weight, 2, 4), name
            assert torch.equal(mod.weight != 0, masks0[f"{name}.weight"]), name  # the same support
    assert gap(student.eval(), teacher, xs) < 0.5 * before
    assert report.records[-1]["loss"] < report.records[0]["loss"]


def test_srste_masks_nm_at_every_log_step_and_at_the_end():
    student, teacher = pair()
    seen = []

    def check(r):  # called at every log step, with the N:M machinery in place
        seen.append(all(layer_is_nm(p.mask, 2, 4, p.layout) for _, _, _, p in sparse_tensors(student)))

    report = nmsparse.distill(student, teacher, data(), steps=12, lr=1e-2, nm="2:4", method="srste", decay=2e-4,
                              select=SEL, log_every=2, on_log=check, progress=False)
    assert report.method == "srste" and report.masks_unchanged is None and report.nm_checks == 7
    assert seen == [True] * 6
    assert all(layer_is_nm(m.weight, 2, 4) for m in student.modules() if isinstance(m, nn.Linear))


def test_a_student_sparsified_already_keeps_its_settings():
    student, teacher = pair()
    nmsparse.sparsify(student, 2, 4, method="fixed", keep_dense=())
    report = nmsparse.distill(student, teacher, data(), steps=3, output_loss="kl", progress=False,
                              finalize_student=False)
    assert report.method == "fixed" and report.masks_unchanged
    assert len(list(sparse_tensors(student))) == 5  # not finalized on request


def _run(out, steps=6, stop_at=None, **kw):
    student, teacher = pair()

    def stop(r):
        if stop_at is not None and r["step"] == stop_at:
            raise KeyboardInterrupt

    kw = dict(steps=steps, lr=1e-2, nm=(2, 4), select=SEL, dropout=True, out=out, checkpoint_every=1,
              log_every=1, progress=False, on_log=stop, **kw)
    report = nmsparse.distill(student, teacher, data(3), **kw)
    return student, report


def test_resume_is_exact(tmp_path):
    whole, _ = _run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):  # dropout on: the RNG state must resume too
        _run(tmp_path / "b", stop_at=4)
    resumed, report = _run(tmp_path / "b", resume=True)
    assert report.resumed_from == 4 and report.steps == 6
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "final.safetensors").is_file()
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_resume_without_a_checkpoint_starts_fresh_and_a_finished_run_only_finalizes(tmp_path):
    s1, r1 = _run(tmp_path / "c", resume=True)
    assert r1.resumed_from is None
    s2, r2 = _run(tmp_path / "c", resume=True)
    assert r2.resumed_from == 6 and r2.steps == 6
    assert all(torch.equal(v, s2.state_dict()[k]) for k, v in s1.state_dict().items())


def test_a_checkpoint_of_other_settings_or_damaged_is_refused_with_the_student_untouched(tmp_path):
    _run(tmp_path / "d", steps=2)
    student, teacher = pair()
    with pytest.raises(LoadError, match=r"other settings \(lr=0.01, now 0.02\)"):
        nmsparse.distill(student, teacher, data(3), steps=2, lr=2e-2, nm=(2, 4), select=SEL, dropout=True,
                         out=tmp_path / "d", resume=True, progress=False)
    assert not any(True for _ in sparse_tensors(student))  # untouched: not even sparsified
    path = tmp_path / "d" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["head.bias"] += 1  # a changed value under the old checksum
    torch.save(state, path)
    kw = dict(steps=2, lr=1e-2, nm=(2, 4), select=SEL, dropout=True, out=tmp_path / "d", resume=True, progress=False)
    with pytest.raises(LoadError, match="cannot resume from .*checkpoint.pt: is corrupted"):
        nmsparse.distill(student, teacher, data(3), **kw)
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(LoadError, match="cannot resume from .*checkpoint.pt"):
        nmsparse.distill(student, teacher, data(3), **kw)
    torch.save({"format": 1, "kind": "distill"}, path)
    with pytest.raises(LoadError, match="damaged distillation checkpoint \\(entry 'step'"):
        nmsparse.distill(student, teacher, data(3), **kw)
    torch.save({"epoch": 1}, path)
    with pytest.raises(LoadError, match="not an nmsparse distillation checkpoint"):
        nmsparse.distill(student, teacher, data(3), **kw)
    assert not any(True for _ in sparse_tensors(student))


def test_a_checkpoint_of_other_fixed_masks_is_refused(tmp_path):
    _run(tmp_path / "f", steps=2)
    student, teacher = pair(seed=5)  # another pruned model of the same shape: other masks
    with pytest.raises(LoadError, match="other fixed masks than this student's"):
        nmsparse.distill(student, teacher, data(3), steps=2, lr=1e-2, nm=(2, 4), select=SEL, dropout=True,
                         out=tmp_path / "f", resume=True, progress=False)
    assert not any(True for _ in sparse_tensors(student))


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    _run(tmp_path / "e", steps=2)
    student, teacher = pair()
    student.head = nn.Linear(32, 12)
    teacher2 = copy.deepcopy(student)
    with pytest.raises(LoadError, match="does not fit this student"):
        nmsparse.distill(student, teacher2, data(3), steps=2, lr=1e-2, nm=(2, 4), select=SEL, dropout=True,
                         out=tmp_path / "e", resume=True, progress=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(steps=2, lr=0), "lr must be a number > 0"),
    (dict(steps=2, temperature=-1), "temperature must be a number > 0"),
    (dict(steps=2, hidden_weight=-1), "hidden_weight must be a number >= 0"),
    (dict(steps=2, output_loss="l1"), "output_loss must be one of"),
    (dict(steps=2, output_loss="none", hidden_weight=0), "nothing to learn from"),
    (dict(steps=2, log_every=0), "log_every must be an integer >= 1"),
    (dict(steps=2, resume=True), "resume=True needs out"),
    (dict(steps=2, nm=None), "the student has no N:M layer: pass nm"),
    (dict(steps=2, method="ste"), "method must be one of"),
    (dict(steps=2, blocks=[]), "has no repeated blocks"),
    (dict(steps=2, blocks=["nope"]), "has no module named 'nope'"),
    (dict(steps=2, select=dict(include="nothing*")), "include pattern 'nothing\\*' matches no module"),
])
def test_bad_arguments_are_one_clear_error(kwargs, match):
    student, teacher = pair()
    kw = dict(nm=(2, 4), select=SEL, progress=False)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        nmsparse.distill(student, teacher, data(), **kw)
    assert not any(True for _ in sparse_tensors(student))  # checked before the student is touched


def test_empty_batches_shared_parameters_and_a_student_sparsified_with_nm():
    student, teacher = pair()
    with pytest.raises(ValueError, match="batches is empty"):
        nmsparse.distill(student, teacher, [], steps=1, nm=(2, 4), progress=False)
    with pytest.raises(ValueError, match="share parameters"):
        nmsparse.distill(teacher, teacher, data(), steps=1, nm=(2, 4), progress=False)
    nmsparse.sparsify(student, 2, 4, method="fixed", keep_dense=())
    with pytest.raises(ValueError, match="already N:M"):
        nmsparse.distill(student, teacher, data(), steps=1, nm=(2, 4), progress=False)


def test_find_blocks_of_the_training_models():
    from nmsparse.training.models import build_model

    assert find_blocks(Net()) == ["blocks.0", "blocks.1", "blocks.2"]
    assert find_blocks(build_model("resnet")) == ["layers.0", "layers.1", "layers.2"]
    vit = find_blocks(build_model("vit"))
    assert vit and all(isinstance(build_model("vit").get_submodule(n), nn.Module) for n in vit)
    assert find_blocks(nn.Linear(3, 3)) == []


def test_losses_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    am = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    keep = am.bool()
    want = ((s - t)[keep].pow(2).sum() / t[keep].pow(2).sum())
    assert torch.allclose(L.hidden_loss(s, t, am), want)
    ps = torch.stack([s[i][keep[i]].mean(0) for i in range(3)])
    pt = torch.stack([t[i][keep[i]].mean(0) for i in range(3)])
    want = (1 - torch.nn.functional.cosine_similarity(ps, pt, dim=-1)).mean()
    assert torch.allclose(L.output_loss("cosine", s, t, am), want)
    logits = torch.randn(4, 10, generator=g)
    assert float(L.output_loss("kl", logits, logits)) == pytest.approx(0.0, abs=1e-6)
    p, q = torch.softmax(logits / 2, -1), torch.softmax(torch.zeros(4, 10) / 2, -1)
    want = (q * (q.log() - p.log())).sum(-1).mean() * 4
    assert torch.allclose(L.output_loss("kl", logits, torch.zeros(4, 10), temperature=2.0), want, atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        L.output_loss("mse", s, t[:, :4])


def test_auto_output_loss_by_output_kind():
    x = torch.zeros(2, 3)
    assert L.resolve_kind("auto", "logits", x) == "kl"
    assert L.resolve_kind("auto", "last_hidden_state", x) == "cosine"
    assert L.resolve_kind("auto", "tensor", torch.zeros(2, 3, 4)) == "cosine"
    assert L.resolve_kind("auto", "tensor", x) == "mse"
    with pytest.raises(ValueError, match="cannot find the output"):
        L.output_tensor({"foo": 1})


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 4), t=st.integers(1, 6), h=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_masked_losses_equal_the_losses_of_the_kept_tokens_only(b, t, h, seed):
    g = torch.Generator().manual_seed(seed)
    s, te = torch.randn(b, t, h, generator=g), torch.randn(b, t, h, generator=g)
    am = (torch.rand(b, t, generator=g) < 0.6).long()
    am[:, 0] = 1  # every row keeps a token
    keep = am.bool()
    assert torch.allclose(L.hidden_loss(s, te, am), (s - te)[keep].pow(2).sum() / te[keep].pow(2).sum(), atol=1e-6)
    # padded positions do not matter: changing them leaves both losses as they were
    s2 = s.clone()
    s2[~keep] = 1e3
    assert torch.allclose(L.hidden_loss(s2, te, am), L.hidden_loss(s, te, am))
    assert torch.allclose(L.output_loss("cosine", s2, te, am), L.output_loss("cosine", s, te, am), atol=1e-6)
