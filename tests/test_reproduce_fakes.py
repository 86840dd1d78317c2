"""A stand-in for nmsparse.training.loop.train that follows its contract (files, metrics, resume)
without training, so the grid runner and the report are tested fast; plus a check of the stand-in."""

from __future__ import annotations

import json
import random
from pathlib import Path

from nmsparse.training.config import TrainConfig

LAYERS = {"layer1.conv.weight": 576, "layer2.conv.weight": 2304}


# The runner only needs the config contract (from_dict / to_dict / validate): the real one is cheap.
FakeConfig = TrainConfig


class Killed(KeyboardInterrupt):
    """Stands for the process being killed: the runner does not catch it."""

    pass


class FakeTrain:
    """``train(config, resume=, progress=)``; ``kill_after={out: k}`` raises after epoch k once."""

    def __init__(self, kill_after: dict[str, int] | None = None, fail: set[str] | None = None) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.kill_after = dict(kill_after or {})
        self.fail = set(fail or ())

    @staticmethod
    def accuracy(c: FakeConfig, epoch: int) -> float:
        base = {"dense": 0.90, "srste": 0.88, "ste": 0.86}[c.method if c.nm != "dense" else "dense"]
        return base - 0.2 / epoch + 0.01 * c.seed - (0.02 if c.decay < 0 else 0.0)

    def __call__(self, config: FakeConfig, *, resume: bool = False, progress: bool = True) -> list[dict]:
        out = Path(config.out)
        name = out.name
        self.calls.append((name, resume))
        if any(f in name for f in self.fail):
            raise RuntimeError(f"boom in {name}")
        out.mkdir(parents=True, exist_ok=True)
        start = 0
        if resume:
            start = json.loads((out / "checkpoint.pt").read_text())["epoch"]
        elif (out / "metrics.jsonl").exists():
            raise AssertionError("fresh start into a folder with metrics")
        (out / "config.json").write_text(json.dumps(config.to_dict()))
        rows = []
        rng = random.Random(f"{name}")
        for epoch in range(start + 1, config.epochs + 1):
            frac = (0.02 if config.method == "ste" else 0.01) * epoch if config.nm != "dense" else 0.005 * epoch
            layers = {k: dict(size=s, vs_initial=int(frac * s), vs_previous=int(0.3 * frac * s),
                              vs_initial_frac=int(frac * s) / s, vs_previous_frac=int(0.3 * frac * s) / s)
                      for k, s in LAYERS.items()}
            size = sum(LAYERS.values())
            tot = dict(size=size, vs_initial=sum(v["vs_initial"] for v in layers.values()),
                       vs_previous=sum(v["vs_previous"] for v in layers.values()))
            tot.update(vs_initial_frac=tot["vs_initial"] / size, vs_previous_frac=tot["vs_previous"] / size)
            row = {"epoch": epoch, "loss": 1.0 / epoch + rng.random() * 0.01, "train_acc": 0.5,
                   "test_acc": self.accuracy(config, epoch), "lr": 0.1, "time": 1.5,
                   "sad": {"total": tot, "layers": layers}}
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            (out / "checkpoint.pt").write_text(json.dumps({"epoch": epoch}))
            rows.append(row)
            if self.kill_after.get(name) == epoch:
                del self.kill_after[name]
                raise Killed(f"killed {name} after epoch {epoch}")
        (out / "final.safetensors").write_bytes(b"weights")
        return rows


def test_fake_follows_the_contract(tmp_path):
    train = FakeTrain(kill_after={"r": 1})
    cfg = FakeConfig(epochs=3, out=str(tmp_path / "r"))
    try:
        train(cfg)
    except Killed:
        pass
    assert not (tmp_path / "r" / "final.safetensors").exists()
    train(cfg, resume=True)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert (tmp_path / "r" / "final.safetensors").exists()
