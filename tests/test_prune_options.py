"""prune()'s method options as frozen dataclasses (issue 21 item 5): the same results as the string
and keyword forms, every error message, the CLI flags; and block-wise reconstruction's options and
guarantees (masks fixed, held-out loss never higher)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse import AdaPrune, BlockReconstruct, Magnitude, SparseGPT, Wanda
from nmsparse.masking.layout import layer_is_nm
from tests.test_model_zoo import build


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 8))


def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=g) for _ in range(3)]


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("obj,name,kw", [
    (Magnitude(), "magnitude", {}),
    (Wanda(), "wanda", {}),
    (SparseGPT(), "sparsegpt", {}),
    (SparseGPT(damp=0.1, blocksize=8), "sparsegpt", {"damp": 0.1, "blocksize": 8}),
    (AdaPrune(), "adaprune", {}),
    (AdaPrune(damp=0.05), "adaprune", {"damp": 0.05}),
    (AdaPrune(solver="adam", iterations=20, batch_size=4, lr=1e-2, bias_lr=1e-1),
     "adaprune", {"solver": "adam", "iterations": 20, "batch_size": 4, "lr": 1e-2, "bias_lr": 1e-1}),
])
def test_object_string_and_keywords_agree(obj, name, kw):
    a, b = net(), net()
    ra = nmsparse.prune(a, 2, 4, method=obj, calib=calib())
    rb = nmsparse.prune(b, 2, 4, method=name, calib=calib(), **kw)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ra.settings == rb.settings and ra.settings["method"] == name
    assert json.loads(json.dumps(ra.to_dict()))["settings"]["method"] == name


def test_settings_record_the_options_that_apply():
    assert SparseGPT(damp=0.1).settings() == {"method": "sparsegpt", "damp": 0.1, "blocksize": 128,
                                            "precision": "float64"}
    assert AdaPrune().settings() == {"method": "adaprune", "solver": "exact", "damp": 0.01}
    assert AdaPrune(solver="adam").settings() == {"method": "adaprune", "solver": "adam", "iterations": 1000,
                                                  "batch_size": 50, "lr": 1e-3, "bias_lr": 1e-2}
    assert Wanda().settings() == {"method": "wanda"}


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SparseGPT().damp = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("kw,match", [
    (dict(method="wanda", damp=0.02), r"^damp=0\.02 does not apply to method='wanda' \(it is an option of "
                                      r"'sparsegpt' and 'adaprune'\); 'wanda' takes no options$"),
    (dict(method="magnitude", solver="exact"), r"^solver='exact' does not apply to method='magnitude' \(it is an "
                                               r"option of 'adaprune'\); 'magnitude' takes no options$"),
    (dict(method="adaprune", blocksize=64), r"^blocksize=64 does not apply to method='adaprune' \(it is an option "
                                            r"of 'sparsegpt'\); 'adaprune' takes solver, damp, iterations, "
                                            r"batch_size, lr, bias_lr$"),
    (dict(method="sparsegpt", lr=0.1), r"^lr=0\.1 does not apply to method='sparsegpt' .*'sparsegpt' takes damp, "
                                       r"blocksize, precision$"),
    (dict(method=SparseGPT(), damp=0.02), r"^damp=0\.02 given as a keyword of prune\(\) together with "
                                          r"method=SparseGPT\(damp=0\.01, blocksize=128, precision='float64'\): "
                                          r"set it in the options object instead, e\.g\. SparseGPT\(damp=\.\.\.\)$"),
    (dict(method=SparseGPT), r"^method=SparseGPT is a class: pass an instance, SparseGPT\(\)$"),
    (dict(method="obs"), r"^method must be one of \('magnitude', 'wanda', 'sparsegpt', 'adaprune'\) or an options"),
    (dict(method=3), r"^method must be one of"),
    (dict(method="adaprune", solver="sgd"), r"^solver must be one of \('exact', 'adam'\), got 'sgd'$"),
    (dict(method="adaprune", iterations=5), r"^iterations only apply to solver='adam', not solver='exact'"),
    (dict(method="adaprune", solver="adam", damp=0.5), r"^damp only applies to solver='exact', not solver='adam'"),
    (dict(method="sparsegpt", damp=-1.0), r"^damp must be a number >= 0, got -1\.0$"),
    (dict(method="sparsegpt", blocksize=0), r"^blocksize must be an integer > 0, got 0$"),
    (dict(method="sparsegpt", blocksize=True), r"^blocksize must be an integer > 0, got True$"),
    (dict(method="adaprune", solver="adam", lr=0.0), r"^lr must be a number > 0, got 0\.0$"),
    (dict(method="adaprune", solver="adam", bias_lr=float("nan")), r"^bias_lr must be a number > 0, got nan$"),
    (dict(method="adaprune", solver="adam", batch_size=0), r"^batch_size must be an integer > 0, got 0$"),
    (dict(method="adaprune", solver="adam", iterations=-1), r"^iterations must be an integer >= 0, got -1$"),
    (dict(method="sparsegpt", sequential="yes"), r"^sequential must be True, False or 'block', got 'yes'$"),
    (dict(method="sparsegpt", reconstruct="net"), r"^reconstruct must be None, 'layer', 'block' or a "
                                                  r"nmsparse\.BlockReconstruct\(\.\.\.\), got 'net'$"),
    (dict(method="sparsegpt", reconstruct="block", sequential=False),
     r"^reconstruct='block' works block by block: it needs sequential=True or 'block'$"),
])
def test_prune_option_errors_leave_the_model_untouched(kw, match):
    model = net()
    before = _weights(model)
    with pytest.raises(ValueError, match=match):
        nmsparse.prune(model, 2, 4, calib=calib(), **kw)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("make,match", [
    (lambda: SparseGPT(damp=-1), r"^SparseGPT: damp must be a number >= 0, got -1$"),
    (lambda: SparseGPT(blocksize=2.5), r"^SparseGPT: blocksize must be an integer > 0, got 2\.5$"),
    (lambda: SparseGPT(precision="half"),
     r"^SparseGPT: precision must be one of \('float64', 'float32'\), got 'half'$"),
    (lambda: AdaPrune(solver="lbfgs"), r"^AdaPrune: solver must be one of \('exact', 'adam'\), got 'lbfgs'$"),
    (lambda: AdaPrune(iterations=10, lr=0.1), r"^AdaPrune: iterations, lr only apply to solver='adam', not "
                                               r"solver='exact' \(pass solver='adam' or drop them\)$"),
    (lambda: AdaPrune(solver="adam", damp=0.1), r"^AdaPrune: damp only applies to solver='exact', not "
                                                 r"solver='adam' \(pass solver='exact' or drop it\)$"),
    (lambda: BlockReconstruct(steps=-1), r"^BlockReconstruct: steps must be an integer >= 0, got -1$"),
    (lambda: BlockReconstruct(lr=0), r"^BlockReconstruct: lr must be a number > 0, got 0$"),
    (lambda: BlockReconstruct(eval_every=0), r"^BlockReconstruct: eval_every must be an integer > 0, got 0$"),
    (lambda: BlockReconstruct(patience=0), r"^BlockReconstruct: patience must be an integer > 0, got 0$"),
    (lambda: BlockReconstruct(held_out=1.0), r"^BlockReconstruct: held_out must be a fraction in \[0, 1\), got 1\.0$"),
    (lambda: BlockReconstruct(target="x"), r"^BlockReconstruct: target must be 'dense' or 'teacher', got 'x'$"),
])
def test_dataclass_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_reconstruct_needs_calibration_data():
    with pytest.raises(ValueError, match=r"^reconstruct='block' needs calibration data: pass calib="):
        nmsparse.prune(net(), 2, 4, method="magnitude", reconstruct="block")


def test_reconstruct_needs_blocks_and_leaves_the_model_untouched():
    model, batches, _ = build("cnn")
    before = _weights(model)
    with pytest.raises(ValueError, match=r"^reconstruct='block' needs repeated blocks that can be run one by one "
                                         r"\(model: no nn\.ModuleList or nn\.Sequential of identical blocks.*use reconstruct=None$"):
        nmsparse.prune(model, 2, 4, method="sparsegpt", calib=batches, keep_dense=(), reconstruct="block")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.fixture
def one_thread():
    """Tiny blocks: the thread pool's start-up dominates each small op (and starves a busy machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _bert2():
    t = pytest.importorskip("transformers")
    cfg = t.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = t.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(5):
        am = torch.ones(4, 6, dtype=torch.long)
        am[0, 4:] = 0  # padding
        batches.append({"input_ids": torch.randint(3, 64, (4, 6), generator=g), "attention_mask": am})
    return model, batches


@pytest.mark.parametrize("method", [Magnitude(), Wanda(), SparseGPT(), AdaPrune()], ids=lambda o: o.name)
def test_block_reconstruction_keeps_masks_and_lowers_held_out_loss(method, one_thread):
    model, batches = _bert2()
    plain = copy.deepcopy(model)
    nmsparse.prune(plain, 2, 4, method=method, calib=batches, include="encoder.*", keep_dense=())
    rep = nmsparse.prune(model, 2, 4, method=method, calib=batches, include="encoder.*", keep_dense=(),
                         reconstruct=BlockReconstruct(steps=16, lr=1e-3, eval_every=4, patience=100))
    blocks = rep.settings["reconstruct"]["blocks"]
    assert set(blocks) == {"encoder.layer.0", "encoder.layer.1"}
    for info in blocks.values():
        assert info["held_out_batches"] == 1 and info["train_batches"] == 4
        assert info["loss_after"] <= info["loss_before"]
    if method.name in ("magnitude", "wanda"):  # no weight update of their own: the refit must help
        assert blocks["encoder.layer.0"]["loss_after"] < blocks["encoder.layer.0"]["loss_before"]
    mods, pmods = dict(model.named_modules()), dict(plain.named_modules())
    for e in rep.sparse:
        w = mods[e.name].weight
        assert layer_is_nm(w, 2, 4), e.param
        if e.name.startswith("encoder.layer.0."):  # same inputs, same masks: the refit keeps them
            assert bool(((w != 0) <= (pmods[e.name].weight != 0)).all())


def test_block_reconstruction_with_no_steps_changes_nothing(one_thread):
    model, batches = _bert2()
    plain = copy.deepcopy(model)
    nmsparse.prune(plain, 2, 4, method="sparsegpt", calib=batches, include="encoder.*", keep_dense=())
    nmsparse.prune(model, 2, 4, method="sparsegpt", calib=batches, include="encoder.*", keep_dense=(),
                   reconstruct=BlockReconstruct(steps=0))
    wa, wb = _weights(model), _weights(plain)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_block_reconstruction_teacher_target(one_thread):
    model, batches = _bert2()
    rep = nmsparse.prune(model, 2, 4, method="wanda", calib=batches, include="encoder.*", keep_dense=(),
                         reconstruct=BlockReconstruct(steps=8, target="teacher", eval_every=4))
    assert rep.settings["reconstruct"]["target"] == "teacher"
    assert all(i["loss_after"] <= i["loss_before"] for i in rep.settings["reconstruct"]["blocks"].values())


def test_cli_flag_that_does_not_apply_is_one_line(tmp_path, capsys):
    pytest.importorskip("nmsparse.training.models")
    from nmsparse.cli.dispatch import main
    from tests.test_prune_cli import _checkpoint

    ckpt = _checkpoint(tmp_path)
    assert main(["prune", "--checkpoint", str(ckpt), "--method", "wanda", "--damp", "0.02",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--damp 0.02 does not apply to --method wanda (it is an option of 'sparsegpt' and 'adaprune')")
    assert len(err.splitlines()) == 1
    assert main(["prune", "--checkpoint", str(ckpt), "--method", "adaprune", "--iterations", "5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--iterations only apply to --solver adam, not --solver exact" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
