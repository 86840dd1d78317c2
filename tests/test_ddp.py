"""DDP on CPU (gloo): 2 processes train a few steps; masks and weights must agree across ranks and
match one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from nmsparse.training.config import TrainConfig

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(out: Path, **kw) -> TrainConfig:
    base = dict(model="mlp", data="digits", nm="2:4", method="srste", epochs=2, batch_size=64, lr=0.05,
                warmup_epochs=0.5, train_subset=256, test_subset=100, threads=1, out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def _worker(rank: int, world: int, port: int, cfg: dict, dump: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import nmsparse
    from nmsparse.training.loop import Trainer

    trainer = Trainer(TrainConfig.from_dict(cfg), progress=False, log=None)
    masks_per_step = []

    def on_step_hook(module, args):  # record the masks at every training forward pass
        if module.training:
            masks_per_step.append(nmsparse.masks(trainer.model))

    trainer.model.register_forward_pre_hook(on_step_hook)
    records = trainer.run()
    torch.save({"state": trainer.model.state_dict(), "masks": masks_per_step, "records": records},
               f"{dump}/rank{rank}.pt")


@pytest.mark.timeout(300)
def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    port = _free_port()
    ddp_cfg = _config(tmp_path / "ddp")
    mp.start_processes(_worker, args=(2, port, ddp_cfg.to_dict(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    # identical on both ranks: every step's masks, the final weights and the reported metrics
    assert len(r0["masks"]) == len(r1["masks"]) == 2 * 4  # 256 images / 64 per global batch, 2 epochs
    for m0, m1 in zip(r0["masks"], r1["masks"]):
        assert m0.keys() == m1.keys() and all(torch.equal(m0[k], m1[k]) for k in m0)
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    drop_time = lambda recs: [{k: v for k, v in r.items() if k != "time"} for r in recs]  # noqa: E731
    assert drop_time(r0["records"]) == drop_time(r1["records"])

    # rank 0 alone wrote the outputs
    out = tmp_path / "ddp"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "final.safetensors",
                                                     "metrics.jsonl"]

    # equal to one process with the same global batch, within float tolerance
    from nmsparse.training.loop import Trainer

    single = Trainer(_config(tmp_path / "single"), progress=False, log=None)
    records = single.run()
    state = single.model.state_dict()
    for k, v in state.items():
        if v.dtype == torch.bool or v.dtype == torch.long:
            assert torch.equal(v, r0["state"][k]), k
        else:
            torch.testing.assert_close(v, r0["state"][k], rtol=1e-4, atol=1e-5, msg=k)
    for a, b in zip(records, r0["records"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.011)


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_torchrun_cli(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "nmsparse", "train", "--data", "digits", "--model", "mlp",
           "--epochs", "1", "--batch-size", "64", "--train-subset", "256", "--threads", "1",
           "--no-progress", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch   1/1") == 1  # rank 0 only
    assert (out / "final.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
