"""The reproduction grid and its runner: cells, skipping, resuming, failures, refusing mixed grids,
and the CLI's argument errors (with a fake trainer that follows train()'s contract)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from nmsparse.reproduce import grid as G
from nmsparse.reproduce.runner import cell_status, run_grid, read_metrics
from test_reproduce_fakes import FakeConfig, FakeTrain, Killed

SMALL = G.Scale(epochs=2, seeds=(0, 1), train_subset=64, test_subset=32, nms=("2:4", "1:8"))


def _run(cells, out, train, scale=SMALL, exps=("sad",)):
    return run_grid(cells, scale, out, experiments=list(exps), train_fn=train,
                    make_config=FakeConfig.from_dict, log=lambda s: None, command="test")


def test_full_grid_has_every_cell_once():
    cells = G.build_grid(list(G.EXPERIMENTS), G.Scale())
    ids = [c.run_id for c in cells]
    assert len(ids) == len(set(ids)) == 25 * 3
    keys = {c.key for c in cells}
    for nm in G.NMS:
        assert {f"resnet_{nm.replace(':', 'of')}_ste", f"resnet_{nm.replace(':', 'of')}_srste"} <= keys
    assert {"resnet_dense", "vit_dense", "vit_2of4_ste", "vit_2of4_srste"} <= keys
    decays = {c.settings["decay"] for c in cells if c.key.startswith("resnet_2of4_srste") and not c.transposable
              and c.settings["update_every"] == 1}
    assert decays == set(G.DECAYS)
    t = [c for c in cells if c.transposable]
    assert {(c.settings["nm"], c.settings["mask_method"]) for c in t} == {(a, b) for a in ("2:4", "4:8") for b in ("approx", "optimal")}
    # seed-major, with the 2:4 core first
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)
    assert [c.key for c in cells[:3]] == ["resnet_dense", "resnet_2of4_ste", "resnet_2of4_srste"]


def test_shared_cells_and_settings():
    cells = G.build_grid(["sad", "decay"], G.Scale(seeds=(0,)))
    assert [c.key for c in cells] == ["resnet_dense", "resnet_2of4_ste", "resnet_2of4_srste",
                                      "resnet_2of4_srste_decay-0.0002", "resnet_2of4_srste_decay0",
                                      "resnet_2of4_srste_decay0.002"]
    by = {c.key: c.settings for c in cells}
    assert by["resnet_dense"] == {"model": "resnet", "nm": "dense", "sad_nm": "2:4"}
    assert by["resnet_2of4_ste"]["decay"] == 0.0 and by["resnet_2of4_srste"]["decay"] == 2e-4
    vit = [c for c in G.build_grid(["table"], G.Scale(seeds=(0,))) if c.key.startswith("vit")]
    assert all(c.settings["optimizer"] == "adamw" for c in vit)


@given(st.lists(st.sampled_from(list(G.EXPERIMENTS)), min_size=1, unique=True),
       st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True))
@settings(max_examples=30, deadline=None)
def test_grid_is_union_of_experiments(exps, seeds):
    scale = G.Scale(seeds=tuple(seeds))
    cells = G.build_grid(exps, scale)
    want = {k for e in exps for k in G.experiment_keys(e)}
    assert {c.key for c in cells} == want
    assert len(cells) == len(want) * len(seeds)


@pytest.mark.parametrize("kw, msg", [(dict(epochs=0), "epochs"), (dict(seeds=()), "seeds"),
                                     (dict(seeds=(1, 1)), "seeds"), (dict(train_subset=0), "train_subset"),
                                     (dict(nms=("3:4",)), "nms")])
def test_scale_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        G.Scale(**kw)


def test_unknown_experiment():
    with pytest.raises(ValueError, match="unknown experiment"):
        G.build_grid(["tabel"], G.Scale())


def test_runs_then_skips(tmp_path):
    cells = G.build_grid(["sad"], SMALL)
    train = FakeTrain()
    out = _run(cells, tmp_path, train)
    assert [o.status for o in out] == ["ran"] * 6
    assert all(cell_status(tmp_path / "runs" / c.run_id, 2) == "done" for c in cells)
    cfg = json.loads((tmp_path / "runs" / "resnet_2of4_srste_seed1" / "config.json").read_text())
    assert cfg["seed"] == 1 and cfg["nm"] == "2:4" and cfg["train_subset"] == 64 and cfg["epochs"] == 2
    train2 = FakeTrain()
    out = _run(cells, tmp_path, train2)
    assert [o.status for o in out] == ["done"] * 6 and train2.calls == []
    events = [json.loads(x) for x in (tmp_path / "invocations.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "end", "start", "end"]
    assert events[1]["ran"] == 6 and events[3]["done"] == 6


def test_killed_grid_resumes_where_it_stopped(tmp_path):
    cells = G.build_grid(["sad"], SMALL)
    victim = "resnet_2of4_ste_seed0"
    train = FakeTrain(kill_after={victim: 1})
    with pytest.raises(Killed):
        _run(cells, tmp_path, train)
    assert cell_status(tmp_path / "runs" / "resnet_dense_seed0", 2) == "done"
    assert cell_status(tmp_path / "runs" / victim, 2) == "partial"
    assert not (tmp_path / "runs" / "resnet_2of4_srste_seed0").exists()
    out = _run(cells, tmp_path, train)
    status = {o.cell.run_id: o.status for o in out}
    assert status["resnet_dense_seed0"] == "done" and status[victim] == "resumed"
    assert list(status.values()).count("ran") == 4
    assert (victim, True) in train.calls
    assert [r["epoch"] for r in read_metrics(tmp_path / "runs" / victim)] == [1, 2]


def test_started_without_checkpoint_restarts_clean(tmp_path):
    cells = G.build_grid(["sad"], G.Scale(epochs=2, seeds=(0,)))
    d = tmp_path / "runs" / cells[0].run_id
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 0.1}\n{"epo')  # torn line, no checkpoint
    assert cell_status(d, 2) == "todo"
    train = FakeTrain()
    _run(cells, tmp_path, train, scale=G.Scale(epochs=2, seeds=(0,)))
    assert (cells[0].run_id, False) in train.calls
    assert [r["epoch"] for r in read_metrics(d)] == [1, 2]


def test_failure_is_kept_and_retried(tmp_path):
    scale = G.Scale(epochs=1, seeds=(0,))
    cells = G.build_grid(["sad"], scale)
    out = _run(cells, tmp_path, FakeTrain(fail={"_ste_"}), scale=scale)
    st_ = {o.cell.key: o for o in out}
    assert st_["resnet_2of4_ste"].status == "failed" and "boom" in st_["resnet_2of4_ste"].reason
    assert "boom" in (tmp_path / "runs" / "resnet_2of4_ste_seed0" / "error.txt").read_text()
    assert st_["resnet_2of4_srste"].status == "ran"  # the grid went on
    out = _run(cells, tmp_path, FakeTrain(), scale=scale)
    assert [o.status for o in out] == ["done", "ran", "done"]
    assert not (tmp_path / "runs" / "resnet_2of4_ste_seed0" / "error.txt").exists()


def test_other_settings_are_refused_and_nothing_written(tmp_path):
    cells = G.build_grid(["sad"], SMALL)
    _run(cells, tmp_path, FakeTrain())
    before = (tmp_path / "invocations.jsonl").read_text()
    other = G.Scale(epochs=3, seeds=(0, 1), train_subset=64, test_subset=32)
    train = FakeTrain()
    with pytest.raises(ValueError, match="epochs=2 there, 3 asked"):
        _run(G.build_grid(["sad"], other), tmp_path, train, scale=other)
    assert train.calls == [] and (tmp_path / "invocations.jsonl").read_text() == before
    # more seeds or experiments at the same settings extend the grid
    more = G.Scale(epochs=2, seeds=(0, 1, 2), train_subset=64, test_subset=32, nms=("2:4",))
    out = _run(G.build_grid(["sad", "decay"], more), tmp_path, FakeTrain(), scale=more, exps=("sad", "decay"))
    assert sum(o.status == "done" for o in out) == 6 and sum(o.status == "ran" for o in out) == 12
    grid = json.loads((tmp_path / "grid.json").read_text())
    assert grid["seeds"] == [0, 1, 2] and grid["experiments"] == ["sad", "decay"]


def test_invalid_cell_config_writes_nothing(tmp_path):
    bad = [G.Cell("resnet_5of4_srste", 0, (("model", "resnet"), ("nm", "5:4"), ("method", "srste")))]
    with pytest.raises(ValueError, match="nm .5:4.: need 0 < N < M"):
        _run(bad, tmp_path / "g", FakeTrain())
    assert not (tmp_path / "g").exists()


def test_transposable_cells_not_run_when_feature_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "transposable_missing", lambda: "no transposable masks here")
    import nmsparse.reproduce.runner as R
    monkeypatch.setattr(R, "transposable_missing", lambda: "no transposable masks here")
    scale = G.Scale(epochs=1, seeds=(0,))
    cells = G.build_grid(["transposable"], scale)
    train = FakeTrain()
    out = _run(cells, tmp_path, train, scale=scale, exps=("transposable",))
    for o in out:
        assert o.status == ("not run" if o.cell.transposable else "ran")
        if o.cell.transposable:
            assert o.reason == "no transposable masks here"
    assert len(train.calls) == 4  # the plain N:M cells only


def test_demo_cells():
    cells = G.demo_cells(G.Scale(epochs=2, seeds=(0,)))
    assert [c.run_id for c in cells] == ["resnet_dense_seed0", "resnet_2of4_srste_seed0"]


def test_shards_split_the_grid(tmp_path):
    cells = G.build_grid(["sad"], SMALL)
    t1, t2 = FakeTrain(), FakeTrain()
    for i, t in ((1, t1), (2, t2)):
        run_grid(cells, SMALL, tmp_path, experiments=["sad"], train_fn=t, make_config=FakeConfig.from_dict,
                 log=lambda s: None, shard=(i, 2))
    assert [c for c, _ in t1.calls] == [c.run_id for c in cells[0::2]]
    assert [c for c, _ in t2.calls] == [c.run_id for c in cells[1::2]]
    assert json.loads((tmp_path / "grid.json").read_text())["cells"] == [c.run_id for c in cells]


def test_concurrent_shards_write_the_manifest_safely(tmp_path):
    """Shards started together write grid.json at once: each write must use its own temporary file."""
    import threading

    from nmsparse.reproduce.runner import write_manifest

    scale = G.Scale(epochs=1, seeds=(0,), train_subset=64, test_subset=32, nms=("2:4",))
    cells = G.build_grid(["sad"], scale)
    errors = []

    def writer():
        try:
            for _ in range(30):
                write_manifest(tmp_path, scale, cells, ["sad"])
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads((tmp_path / "grid.json").read_text())["experiments"] == ["sad"]
    assert [p.name for p in tmp_path.iterdir()] == ["grid.json"]
