"""The grid runner with the real trainer on scikit-learn's digits: a tiny grid runs, a killed run
resumes from its checkpoint to the same metrics, and the report reads the real metrics."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("nmsparse.training.loop", reason="the training core (nmsparse.training) is not installed")

from nmsparse.reproduce import grid as G  # noqa: E402
from nmsparse.reproduce.report import write_report  # noqa: E402
from nmsparse.reproduce.runner import read_metrics, run_grid  # noqa: E402
from nmsparse.training.config import TrainConfig  # noqa: E402
from nmsparse.training.loop import train  # noqa: E402

SCALE = G.Scale(epochs=2, seeds=(0,), data="digits", train_subset=256, test_subset=200, batch_size=64, threads=1)


class KilledAfterEpoch(KeyboardInterrupt):
    pass


def test_real_grid_resume_and_report(tmp_path):
    cells = G.build_grid(["sad"], SCALE)
    victim = "resnet_2of4_srste_seed0"

    def killing_train(config, *, resume=False, progress=True):
        def stop(record):
            if config.out.endswith(victim) and record["epoch"] == 1 and not resume:
                raise KilledAfterEpoch
        return train(config, resume=resume, progress=False, log=None, on_epoch_end=stop)

    kw = dict(experiments=["sad"], make_config=TrainConfig.from_dict, log=lambda s: None)
    with pytest.raises(KilledAfterEpoch):
        run_grid(cells, SCALE, tmp_path, train_fn=killing_train, **kw)
    assert len(read_metrics(tmp_path / "runs" / victim)) == 1
    out = run_grid(cells, SCALE, tmp_path, train_fn=killing_train, **kw)
    assert [o.status for o in out] == ["done", "done", "resumed"]

    # the resumed run matches an uninterrupted one
    ref = tmp_path / "ref"
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "runs" / victim / "config.json").read_text()))
    cfg.out = str(ref)
    train(cfg, progress=False, log=None)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(read_metrics(ref)) == strip(read_metrics(tmp_path / "runs" / victim))

    text = write_report(tmp_path).read_text()
    assert "Runs finished: **3 of 3**" in text
    acc = read_metrics(tmp_path / "runs" / victim)[-1]["test_acc"]
    assert f"| {victim} | done | {100 * acc:.2f} | 2 |" in text
    assert (tmp_path / "layer_sad.png").exists()
