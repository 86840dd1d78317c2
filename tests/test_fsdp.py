"""FSDP2 (``fully_shard``) on CPU with gloo, 2 processes: masks N:M and equal on every rank, SR-STE
training equal to one process with the same global batch, DCP checkpoints that resume bit for bit,
the finalized full state dict on rank 0, and ``nmsparse train --fsdp`` under torchrun."""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

import nmsparse
from nmsparse.training.config import TrainConfig

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# (n, m, sparsify options, layer widths, shard(masks=...)): shard-local masks (the default) for plain
# 2:4 SR-STE, 4:8 transposable (rows per rank 24, 16, 8: whole 8 x 8 tiles) and fixed masks; masks
# from the gathered weight for transposable 4:8 where a rank's rows (12 of the second layer's 24) are
# not a multiple of m
CASES = {"plain": (2, 4, dict(method="srste", decay=2e-2), (48, 24, 8), "local"),
         "transposable": (4, 8, dict(method="srste", decay=2e-2, transposable=True, update_every=2),
                          (48, 32, 16), "local"),
         "fixed": (2, 4, dict(method="fixed"), (48, 24, 8), "local"),
         "gathered": (4, 8, dict(method="srste", decay=2e-2, transposable=True, update_every=2),
                      (48, 24, 8), "gathered")}
STEPS, SAVE_AFTER, BATCH = 4, 2, 16
RUN = dict(model="mlp", data="digits", nm="2:4", method="srste", epochs=2, batch_size=64, lr=0.05,
           warmup_epochs=0.5, train_subset=256, test_subset=101, threads=1, fsdp=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(case: str) -> nn.Module:
    a, b, c = CASES[case][3]
    return nn.Sequential(nn.Linear(32, a), nn.ReLU(), nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))


def _net(case: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _plain(case)
    n, m, kw = CASES[case][:3]
    nmsparse.sparsify(model, n, m, keep_dense=(), **kw)
    if kw["method"] == "fixed":  # a trained-looking start: the mask of other weights than W's own
        with torch.no_grad():
            for _, mod, p in nmsparse.sparse_layers(model):
                p.mask = nmsparse.layer_mask(torch.randn_like(p.mask, dtype=torch.float), n, m)
    return model


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(64, 32), nn.Linear(32, 32), nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.relu(self.mid(self.emb(x)))).mean(1)


def _tied() -> nn.Module:
    torch.manual_seed(0)
    model = _TiedLM()
    nmsparse.sparsify(model, 2, 4, keep_dense=(), shared="sparsify", method="srste", decay=2e-2)
    return model


def _token_batches():
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(0, 64, (BATCH, 5), generator=g), torch.randint(0, 64, (BATCH,), generator=g))
            for _ in range(STEPS)]


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 32, generator=g), torch.randint(0, 8, (BATCH,), generator=g)) for _ in range(STEPS)]


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def _step(model, opt, x, y) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


SEEN: list = []


def _recording(mask_fn, weight):
    SEEN.append((type(weight).__name__, tuple(weight.shape)))
    return mask_fn(weight)


def _worker(rank: int, world: int, port: int, dump: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from nmsparse.training import fsdp
    from nmsparse.training.loop import Trainer

    dist.init_process_group("gloo")
    out: dict = {}
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for case in CASES:
        model = _net(case)
        layer = model[2].parametrizations.weight[0]
        layer.mask_fn = functools.partial(_recording, layer.mask_fn)
        model = fsdp.shard(model, masks=CASES[case][4])
        SEEN.clear()
        opt = _sgd(model)
        masks, sharded_rows, pruned_gathered = [], {}, []
        # what the layer's forward gets from FSDP2's all-gather: E * W (local masks) or W
        model[2].register_forward_pre_hook(lambda mod, _: pruned_gathered.append(
            float(mod.parametrizations.weight.original.detach().eq(0).float().mean())))
        for i, (x, y) in enumerate(_batches()):
            _step(model, opt, x[part], y[part])
            masks.append(nmsparse.masks(model))
            if i + 1 == SAVE_AFTER:
                fsdp.save_checkpoint(f"{dump}/{case}.dcp", model, opt)
                saved = fsdp.full_state_dict(model)
        for name, mod, _ in nmsparse.sparse_layers(model):
            sharded_rows[name] = mod.parametrizations.weight.original.to_local().shape[0]
        full, final = fsdp.full_state_dict(model), fsdp.finalized_state_dict(model)
        # resume: a fresh model (other initial weights) loads the checkpoint, then takes the last steps
        model2 = fsdp.shard(_net(case, seed=7), masks=CASES[case][4])
        opt2 = _sgd(model2)
        fsdp.load_checkpoint(f"{dump}/{case}.dcp", model2, opt2)
        for x, y in _batches()[SAVE_AFTER:]:
            _step(model2, opt2, x[part], y[part])
        out[case] = dict(masks=masks, full=full, final=final, resumed=fsdp.full_state_dict(model2),
                         rows=sharded_rows, seen=list(SEEN), zeros=pruned_gathered, saved=saved)
    # reshard_after_forward=False: a training step after an evaluation pass (which leaves the
    # parameters unsharded) still refreshes its masks
    model = fsdp.shard(_net("plain"), reshard_after_forward=False)
    opt = _sgd(model)
    out["noreshard"] = []
    for x, y in _batches():
        _step(model, opt, x[part], y[part])
        model.eval()
        with torch.no_grad():
            model(x[part])
        model.train()
        out["noreshard"].append(nmsparse.masks(model))
    # a tied weight made N:M (shared="sparsify"): its owner and user go into one FSDP2 unit
    model = fsdp.shard(_tied(), masks="gathered")
    opt = _sgd(model)
    out["tied"] = []
    for x, y in _token_batches():
        _step(model, opt, x[part], y[part])
        out["tied"].append(nmsparse.masks(model))
    out["errors"] = []
    for call in (lambda: nmsparse.sparsify(model, 2, 4), lambda: fsdp.shard(model)):
        try:
            call()
        except ValueError as e:
            out["errors"].append(str(e))

    # the training loop: an uninterrupted run, and one killed after its first epoch (resumed by the
    # CLI test under torchrun)
    class Killed(Exception):
        pass

    def kill(record):
        if record["epoch"] == 1:
            raise Killed

    Trainer(TrainConfig(**RUN, out=f"{dump}/full"), progress=False, log=None).run()
    try:
        Trainer(TrainConfig(**RUN, out=f"{dump}/part"), progress=False, log=None, on_epoch_end=kill).run()
    except Killed:
        out["killed"] = True
    torch.save(out, f"{dump}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    dump = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(_worker, args=(2, _free_port(), str(dump)), nprocs=2, join=True, start_method="spawn")
    return dump, [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _reference(case: str):
    model = _net(case)
    opt = _sgd(model)
    masks = []
    for x, y in _batches():
        _step(model, opt, x, y)
        masks.append(nmsparse.masks(model))
    return model, masks


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_matches_single_process(two_ranks, case):
    _, (r0, r1) = two_ranks
    n, m, kw, (a, b, c), where = CASES[case]
    ref, ref_masks = _reference(case)
    # shards really are shards: each rank holds half the rows
    assert r0[case]["rows"] == {"0": a // 2, "2": b // 2, "4": c // 2}
    # the mask function gets, at every update (every step; every other step with update_every=2;
    # never for fixed masks), the rank's own rows with local masks, the whole gathered weight else
    updates = 0 if kw["method"] == "fixed" else STEPS // kw.get("update_every", 1)
    rows = b // 2 if where == "local" else b
    assert r0[case]["seen"] == r1[case]["seen"] == [("Tensor", (rows, a))] * updates
    # FSDP2 gathered E * W (zeros: at least the pruned fraction) with local masks, dense W else
    for zeros in (r0[case]["zeros"], r1[case]["zeros"]):
        assert len(zeros) == STEPS
        assert all(z >= 1 - n / m for z in zeros) if where == "local" else all(z < 0.01 for z in zeros)
    # every step's masks: N:M (transposable where asked), equal on both ranks and to one process
    check = nmsparse.layer_is_transposable_nm if kw.get("transposable") else nmsparse.layer_is_nm
    assert len(r0[case]["masks"]) == len(r1[case]["masks"]) == STEPS
    for m0, m1, mr in zip(r0[case]["masks"], r1[case]["masks"], ref_masks):
        assert m0.keys() == m1.keys() == mr.keys() == {"0.weight", "2.weight", "4.weight"}
        for k in m0:
            assert check(m0[k].float(), n, m) and torch.equal(m0[k], m1[k]) and torch.equal(m0[k], mr[k]), k
    # the whole model on rank 0 equals one process's after the same steps (fp32 tolerance)
    assert r1[case]["full"] == {} and r1[case]["final"] == {}
    full, state = r0[case]["full"], ref.state_dict()
    assert full.keys() == state.keys()
    for k in state:
        torch.testing.assert_close(full[k], state[k], rtol=1e-5, atol=1e-6, msg=k)
    # finalized: plain keys, E * W, as nmsparse.finalize gives for the unsharded model
    final, ref_final = r0[case]["final"], nmsparse.finalize(ref).state_dict()
    assert final.keys() == ref_final.keys() == {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    for k in ref_final:
        torch.testing.assert_close(final[k], ref_final[k], rtol=1e-5, atol=1e-6, msg=k)
    _plain(case).load_state_dict(final)
    # resumed from the DCP checkpoint: bit for bit the uninterrupted run (weights, masks, mask steps)
    for k, v in full.items():
        assert torch.equal(r0[case]["resumed"][k], v), k


def _load_alone(rank: int, world: int, port: int, dump: str, case: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from nmsparse.training import fsdp

    dist.init_process_group("gloo")
    model = fsdp.shard(_net(case, seed=7), masks=CASES[case][4])
    fsdp.load_checkpoint(f"{dump}/{case}.dcp", model, _sgd(model))
    torch.save(fsdp.full_state_dict(model), f"{dump}/{case}-alone.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_checkpoint_of_two_ranks_loads_into_one(two_ranks):
    """DCP reshards: weights and shard-local masks saved by 2 ranks load into 1 (every row on it)."""
    dump, (r0, _) = two_ranks
    mp.start_processes(_load_alone, args=(1, _free_port(), str(dump), "plain"), nprocs=1, join=True,
                       start_method="spawn")
    alone = torch.load(dump / "plain-alone.pt", weights_only=True)
    assert alone.keys() == r0["plain"]["saved"].keys()
    for k, v in r0["plain"]["saved"].items():
        assert torch.equal(alone[k], v), k


def test_tied_sparse_weight_in_one_unit(two_ranks):
    _, (r0, r1) = two_ranks
    model, ref = _tied(), []
    opt = _sgd(model)
    for x, y in _token_batches():
        _step(model, opt, x, y)
        ref.append(nmsparse.masks(model))
    for got in (r0["tied"], r1["tied"]):
        assert len(got) == STEPS and got[0].keys() == {"head.weight", "mid.weight"}
        for mg, mr in zip(got, ref):
            assert all(torch.equal(mg[k], mr[k]) for k in mr)
    assert any(not torch.equal(ref[0][k], ref[-1][k]) for k in ref[0])  # the masks did change


def test_local_masks_without_reshard_after_forward(two_ranks):
    _, (r0, r1) = two_ranks
    _, ref_masks = _reference("plain")
    for got in (r0["noreshard"], r1["noreshard"]):
        assert len(got) == STEPS
        for mg, mr in zip(got, ref_masks):
            assert all(torch.equal(mg[k], mr[k]) for k in mr)


def test_sparsify_after_shard_and_shard_twice_are_refused(two_ranks):
    _, (r0, _) = two_ranks
    assert len(r0["errors"]) == 2
    assert "sparsify a model before sharding it" in r0["errors"][0]
    assert "model is already sharded" in r0["errors"][1]


def test_errors_before_any_collective(tmp_path):
    from torch.nn.utils import parametrize

    from nmsparse.training import fsdp

    with pytest.raises(ValueError, match="fsdp must be true or false, got 'yes'"):
        TrainConfig(fsdp="yes").validate(check_out=False)
    with pytest.raises(ValueError, match="fsdp_masks must be 'local' or 'gathered', got 'rows'"):
        TrainConfig(fsdp=True, fsdp_masks="rows").validate(check_out=False)
    model = _net("plain")
    with pytest.raises(ValueError, match="FSDP2 needs a process group: run under 'torchrun"):
        fsdp.shard(model)
    with pytest.raises(ValueError, match="masks must be 'local' or 'gathered', got 'rows'"):
        fsdp.shard(model, masks="rows")
    with pytest.raises(ValueError, match="is not a torch.distributed.checkpoint folder"):
        fsdp.load_checkpoint(tmp_path, model)
    with pytest.raises(ValueError, match="names no FSDP checkpoint folder \\('../elsewhere'\\)"):
        fsdp.load_run_checkpoint(tmp_path, "../elsewhere", model, _sgd(model))

    class Twice(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(model[2], "weight", Twice())
    with pytest.raises(ValueError, match="layer '2': its weight has other parametrizations besides N:M"):
        fsdp.finalized_state_dict(model)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")
def test_dcp_non_tensor_items_read_as_plain_data_only(tmp_path):
    import torch.distributed.checkpoint as dcp

    from nmsparse.training.fsdp import read_dcp

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    for name, value in (("good", 0.1), ("evil", Evil())):
        dcp.save({"x": torch.arange(3.0), "obj": value}, checkpoint_id=str(tmp_path / name), no_dist=True)
    state = {"x": torch.zeros(3), "obj": None}
    read_dcp(state, tmp_path / "good", no_dist=True)
    assert torch.equal(state["x"], torch.arange(3.0)) and state["obj"] == 0.1
    with pytest.raises(ValueError, match="cannot load the checkpoint .*evil: checkpoint item 'obj' is not plain "
                                         "data; refusing to unpickle it"):
        read_dcp({"x": torch.zeros(3), "obj": None}, tmp_path / "evil", no_dist=True)
    assert not (tmp_path / "pwned").exists()


def test_dcp_metadata_reader_refuses_code(two_ranks, tmp_path):
    from nmsparse.training.fsdp import _safe_reader

    dump, _ = two_ranks
    md = _safe_reader(str(dump / "plain.dcp")).read_metadata()  # DCP's own metadata: read
    assert any("original" in k for k in md.state_dict_metadata)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "bad.dcp"
    shutil.copytree(dump / "plain.dcp", bad)
    (bad / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.system"):
        _safe_reader(str(bad)).read_metadata()
    assert not (tmp_path / "pwned").exists()
    # a dotted name through an allowed module (its ``os`` import) is refused too (protocol 4 STACK_GLOBAL)
    cmd = ("echo pwned > " + str(tmp_path / "pwned")).encode()
    payload = (b"\x80\x04" + b"\x8c" + bytes([len(b"torch.distributed.checkpoint.metadata")])
               + b"torch.distributed.checkpoint.metadata" + b"\x8c\x09os.system\x93"
               + b"\x8c" + bytes([len(cmd)]) + cmd + b"\x85R.")
    (bad / ".metadata").write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load torch.distributed.checkpoint.metadata.os"):
        _safe_reader(str(bad)).read_metadata()
    assert not (tmp_path / "pwned").exists()


def _metrics(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(s).items() if k != "time"} for s in lines]


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_cli_fsdp_torchrun_resume(two_ranks, tmp_path):
    dump, (r0, r1) = two_ranks
    full = dump / "full"
    assert r0["killed"] and r1["killed"]

    def resume(part):
        shutil.copytree(dump / "part", part)
        assert sorted(p.name for p in part.iterdir()) == ["checkpoint.dcp", "checkpoint.pt", "config.json",
                                                          "metrics.jsonl"]
        # the killed run resumes under torchrun through the CLI and ends where the uninterrupted one did
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "nmsparse", "train", "--fsdp", "--resume", "--no-progress",
               "--out", str(part)]
        for k, v in RUN.items():
            if k not in ("fsdp", "threads"):
                cmd += [f"--{k.replace('_', '-')}", str(v)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
        return subprocess.run(cmd + ["--threads", "1"], capture_output=True, text=True, timeout=240, env=env)

    part = tmp_path / "part"
    proc = resume(part)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # A rank's C++ runtime aborted (seen twice in full-suite runs on a loaded 2-core machine, never
        # alone; not yet understood, see the issue notes): one more try from a fresh copy, which must pass.
        part = tmp_path / "part-retry"
        proc = resume(part)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"resuming {part} after epoch 1/2") == 1  # rank 0 only
    assert sorted(p.name for p in part.iterdir()) == ["checkpoint.dcp", "checkpoint.pt", "config.json",
                                                      "final.safetensors", "metrics.jsonl"]
    assert [p.name for p in (part / "checkpoint.dcp").iterdir()] == ["epoch-2"]  # older epochs removed
    fa, fb = load_file(full / "final.safetensors"), load_file(part / "final.safetensors")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert _metrics(full) == _metrics(part) and len(_metrics(full)) == 2
    assert "net.3.parametrizations.weight.original" not in fa and nmsparse.layer_is_nm(fa["net.3.weight"], 2, 4)


def test_cli_errors(two_ranks, tmp_path, capsys):
    from nmsparse.cli.dispatch import main

    dump, _ = two_ranks
    base = ["train", "--data", "digits", "--model", "mlp", "--train-subset", "64", "--no-progress"]
    # --fsdp outside torchrun
    assert main(base + ["--fsdp", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fsdp shards over several processes: run under 'torchrun" in err
    # an FSDP run resumed without --fsdp (and the reverse is the same check): refused, nothing touched
    part = tmp_path / "part"
    shutil.copytree(dump / "full", part)
    before = (part / "checkpoint.pt").read_bytes()
    args = [f"--{k.replace('_', '-')}={v}" for k, v in RUN.items() if k != "fsdp"]
    assert main(["train", *args, "--resume", "--no-progress", "--out", str(part)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings (fsdp=True, now False)" in err
    assert (part / "checkpoint.pt").read_bytes() == before


_PARTIAL = """
import os, sys, torch, torch.nn as nn, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
from nmsparse.training import fsdp
torch.manual_seed(0)
d = sys.argv[1]
fsdp.save_checkpoint(d, nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
os.remove(os.path.join(d, "nmsparse.sha256.json"))  # a folder from before manifests: DCP's own check
data = [f for f in os.listdir(d) if f.endswith(".distcp")][0]
with open(os.path.join(d, data), "r+b") as f:
    f.truncate(os.path.getsize(os.path.join(d, data)) - 40)
torch.manual_seed(1)
b = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
before = {k: v.clone() for k, v in b.state_dict().items()}
try:
    fsdp.load_checkpoint(d, b)
    print("loaded")
except ValueError as e:
    print("raised", str(e).splitlines()[0][:60])
print("changed", [k for k, v in b.state_dict().items() if not torch.equal(v, before[k])])
dist.destroy_process_group()
"""


def test_damaged_dcp_folder_leaves_the_model_unchanged(tmp_path):
    """A truncated shard of a folder without a checksum manifest (DCP's own check) raises one ValueError
    and no tensor of the model was written before it (with a manifest: see the next test)."""
    res = subprocess.run([sys.executable, "-c", _PARTIAL, str(tmp_path / "ck"), str(_free_port())],
                         capture_output=True, text=True, timeout=300)
    assert "raised cannot load the checkpoint" in res.stdout, res.stdout + res.stderr
    assert "changed []" in res.stdout, res.stdout


def test_local_masks_refused_where_shards_split_groups():
    """shard(masks='local') checks every layer before anything changes; the error names the layer,
    its shape, the rows per rank and the way out."""
    from transformers.pytorch_utils import Conv1D

    from nmsparse.training.fsdp_masks import check_local

    def layers(model):
        return [(f[: -len(t) - 1], mod, t, p) for f, mod, t, p in nmsparse.sparse_tensors(model)]

    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 24))
    nmsparse.sparsify(model, 4, 8, keep_dense=(), transposable=True)
    check_local(layers(model), 1)
    with pytest.raises(ValueError, match=r"layer '1': weight \(24, 48\) over 2 ranks puts 12 rows on a rank, not "
                                         r"whole transposable m x m tiles; .* multiple of 8: use another number of "
                                         r"processes or shard\(..., masks='gathered'\)"):
        check_local(layers(model), 2)
    check_local(layers(model), 3)  # 16, 16 and 16 rows; 8 and 8 rows
    # Conv1D stores (in, out): dim 0 holds the groups, so whole groups per rank are needed
    conv = nn.Sequential(Conv1D(8, 12))
    nmsparse.sparsify(conv, 2, 4, keep_dense=())
    check_local(layers(conv), 3)
    with pytest.raises(ValueError, match=r"layer '0': weight \(12, 8\) over 2 ranks puts 6 rows on a rank, not "
                                         r"whole groups of 4 \(dim 0 is the input\)"):
        check_local(layers(conv), 2)
    # plain masks of (out, in) weights: any rows, an uneven last shard included
    plain = nn.Sequential(nn.Linear(8, 7))
    nmsparse.sparsify(plain, 2, 4, keep_dense=())
    check_local(layers(plain), 2)
    tied = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
    tied[1].weight = tied[0].weight
    nmsparse.sparsify(tied, 2, 4, keep_dense=(), include=["1"], shared="sparsify")
    with pytest.raises(ValueError, match="its weight is shared by several modules; shard-local masks do not "
                                         "support that: use shard\\(..., masks='gathered'\\)"):
        check_local(layers(tied), 2)


def test_masked_shard_keeps_views_and_moves_only():
    """The dense shard's wrapper survives what fully_shard does to a parameter (views, chunks,
    new_zeros + copy_, moves) and in-place updates; clones and arithmetic give plain tensors."""
    from nmsparse.training.fsdp_masks import MaskedShard, local_weight

    model = _net("plain")
    p = model[2].parametrizations.weight[0]
    t = MaskedShard(torch.arange(12.0).view(3, 4), p)
    for view in (t.view(-1), t.detach(), t[1:], t.narrow(0, 0, 2), torch.chunk(t, 2)[0], t.new_zeros(2, 4),
                 t.to("cpu", torch.float64)):
        assert type(view) is MaskedShard and view.owner is p
    for plain in (t.clone(), t * 2, t.sum(), torch.cat([t, t])):
        assert type(plain) is torch.Tensor
    assert t.add_(1) is t and torch.equal(t.data_, torch.arange(1.0, 13.0).view(3, 4))
    t.narrow(0, 0, 1).copy_(torch.zeros(1, 4))  # through a view: writes the wrapped storage
    assert torch.equal(local_weight(t)[0], torch.zeros(4)) and type(local_weight(t)) is torch.Tensor


_FLIP = """
import os, sys, warnings, torch, torch.nn as nn, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
from nmsparse.plumbing.folder_checksum import MANIFEST
from nmsparse.training import fsdp
torch.manual_seed(0)
d, how = sys.argv[1], sys.argv[3]
fsdp.save_checkpoint(d, nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
print("manifest", os.path.isfile(os.path.join(d, MANIFEST)))
data = [f for f in os.listdir(d) if f.endswith(".distcp")][0]
if how == "flip":  # one bit of one weight: DCP itself would load it silently
    p = os.path.join(d, data)
    raw = bytearray(open(p, "rb").read())
    raw[len(raw) // 2] ^= 0x10
    open(p, "wb").write(bytes(raw))
elif how == "old":  # a folder from before manifests
    os.remove(os.path.join(d, MANIFEST))
torch.manual_seed(1)
b = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
before = {k: v.clone() for k, v in b.state_dict().items()}
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    try:
        fsdp.load_checkpoint(d, b)
        print("loaded")
    except ValueError as e:
        print("raised", type(e).__name__, str(e).replace(d, "D"))
print("warned", [str(x.message).replace(d, "D") for x in w if "checksum" in str(x.message)])
print("changed", sorted(k for k, v in b.state_dict().items() if not torch.equal(v, before[k])))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("how", ["flip", "old", "none"])
def test_dcp_folder_carries_a_checksum_manifest_that_load_verifies(tmp_path, how):
    """A flipped bit in a shard (which DCP loads silently) is a LoadError naming the file, model untouched;
    a folder without a manifest loads unverified with a note; an intact one loads."""
    res = subprocess.run([sys.executable, "-c", _FLIP, str(tmp_path / "ck"), str(_free_port()), how],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert out[0] == "manifest True"
    if how == "flip":
        assert out[1].startswith("raised LoadError cannot load D: checksum mismatch in '") and out[1].endswith(
            ".distcp'; the file is damaged: write it again, or use a good copy")
        assert out[-1] == "changed []"
    elif how == "old":
        assert out[1] == "loaded"
        assert out[2] == ("warned ['D carries no checksum (written before nmsparse recorded one): "
                          "loaded unverified']")
    else:
        assert out[1] == "loaded" and out[2] == "warned []"
        assert out[-1] != "changed []"  # the weights came from the folder
