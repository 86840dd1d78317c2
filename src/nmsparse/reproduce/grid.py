"""The reproduction grid: which training runs each of the papers' claims needs.

A :class:`Cell` is one training run (one model, one N:M setting, one method, one seed): a run id and
the :class:`~nmsparse.training.config.TrainConfig` fields that differ from the base config. Cells are
shared between experiments (the dense ResNet serves the accuracy table, the SAD figure and the curves),
so a grid is the union of its experiments' cells, run once each. Pure data: nothing here trains.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Iterable

NMS = ("2:4", "4:8", "1:4", "2:8", "1:8", "1:16")  # the SR-STE paper's table (N kept per M)
DECAYS = (-2e-4, 0.0, 2e-4, 2e-3)  # lambda_w values of the SR-STE paper's Figure 4a
TRANSPOSABLE_NMS = ("2:4", "4:8")
MASK_METHODS = ("approx", "optimal")
TRANSPOSABLE_UPDATE_EVERY = 40  # Hubara et al. recompute transposable masks every 40 iterations

EXPERIMENTS = {
    "table": "top-1 of dense, STE and SR-STE at 2:4, 4:8, 1:4, 2:8, 1:8, 1:16 (ResNet) and 2:4 (ViT)",
    "decay": "SR-STE lambda_w in {-2e-4, 0, 2e-4, 2e-3}: accuracy and SAD over epochs (Figure 4a)",
    "sad": "layer-wise SAD vs the initial mask: STE, SR-STE, dense magnitude masks (Figure 3b); curves (Figure 4b)",
    "transposable": "transposable 2:4 and 4:8 (approx and optimal masks) vs plain N:M, same budget",
}

PRIORITY = ("sad", "decay", "table", "transposable")  # run order of settings within a seed

# ViT: AdamW is the usual optimizer for transformers; SGD at lr 0.1 does not train it.
VIT_OPTIM = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run of the grid: ``key`` names it without the seed, ``run_id`` with it."""

    key: str
    seed: int
    overrides: tuple[tuple[str, object], ...]

    @property
    def run_id(self) -> str:
        return f"{self.key}_seed{self.seed}"

    @property
    def settings(self) -> dict:
        return dict(self.overrides)

    @property
    def transposable(self) -> bool:
        return bool(self.settings.get("transposable", False))


@dataclasses.dataclass(frozen=True)
class Scale:
    """Everything that sets the grid's cost and is the same for all cells."""

    epochs: int = 30
    seeds: tuple[int, ...] = (0, 1, 2)
    train_subset: int | None = None
    test_subset: int | None = None
    batch_size: int = 128
    data: str = "fashion-mnist"
    data_dir: str | None = None
    threads: int | None = None
    nms: tuple[str, ...] = NMS

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.seeds or any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct integers >= 0, got {self.seeds}")
        for name in ("train_subset", "test_subset", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {v}")
        bad = [nm for nm in self.nms if nm not in NMS]
        if bad or not self.nms:
            raise ValueError(f"nms must be a non-empty subset of {NMS}, got {self.nms}")

    def base(self) -> dict:
        """The TrainConfig fields every cell shares (``out`` and ``seed`` are set per cell)."""
        return {
            "data": self.data,
            "data_dir": self.data_dir,
            "epochs": self.epochs,
            "warmup_epochs": 1 if self.epochs >= 3 else 0,
            "batch_size": self.batch_size,
            "train_subset": self.train_subset,
            "test_subset": self.test_subset,
            "threads": self.threads,
        }

    def results_key(self) -> dict:
        """The settings two invocations must share to continue one grid (threads do not count)."""
        d = dataclasses.asdict(self)
        for k in ("seeds", "threads", "nms"):
            d.pop(k)
        return d


def _fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:g}".replace("+", "")


def cell_key(model: str, nm: str, method: str | None = None, *, decay: float = 2e-4,
             transposable: bool = False, mask_method: str = "approx", update_every: int = 1) -> str:
    """Canonical name of a setting, e.g. ``resnet_2of4_srste`` or ``resnet_dense``."""
    if nm == "dense":
        return f"{model}_dense"
    n, m = nm.split(":")
    key = f"{model}_{n}of{m}_{method}"
    if method == "srste" and decay != 2e-4:
        key += f"_decay{_fmt(decay)}"
    if transposable:
        key += f"_transposable-{mask_method}"
    if update_every != 1:
        key += f"_every{update_every}"
    return key


def _setting(model: str, nm: str, method: str | None = None, *, decay: float = 2e-4,
             transposable: bool = False, mask_method: str = "approx", update_every: int = 1) -> tuple[str, dict]:
    fields: dict = {"model": model, "nm": nm}
    if nm != "dense":
        fields.update(method=method, decay=decay if method == "srste" else 0.0,
                      transposable=transposable, mask_method=mask_method, update_every=update_every)
    else:
        fields["sad_nm"] = "2:4"
    if model == "vit":
        fields.update(VIT_OPTIM)
    key = cell_key(model, nm, method, decay=decay, transposable=transposable,
                   mask_method=mask_method, update_every=update_every)
    return key, fields


def experiment_settings(experiment: str, nms: Iterable[str] = NMS) -> list[tuple[str, dict]]:
    """The settings (key, TrainConfig fields) one experiment needs, in run-priority order."""
    nms = list(nms)
    if experiment == "table":
        out = [_setting("resnet", "dense")]
        for nm in nms:
            out += [_setting("resnet", nm, "ste"), _setting("resnet", nm, "srste")]
        out += [_setting("vit", "dense"), _setting("vit", "2:4", "ste"), _setting("vit", "2:4", "srste")]
        return out
    if experiment == "decay":
        return [_setting("resnet", "2:4", "srste", decay=d) for d in DECAYS]
    if experiment == "sad":
        return [_setting("resnet", "dense"), _setting("resnet", "2:4", "ste"), _setting("resnet", "2:4", "srste")]
    if experiment == "transposable":
        out = []
        u = TRANSPOSABLE_UPDATE_EVERY
        for nm in TRANSPOSABLE_NMS:
            out.append(_setting("resnet", nm, "srste"))
            out.append(_setting("resnet", nm, "srste", update_every=u))
            for mm in MASK_METHODS:
                out.append(_setting("resnet", nm, "srste", transposable=True, mask_method=mm, update_every=u))
        return out
    if experiment == "demo":
        return [_setting("resnet", "dense"), _setting("resnet", "2:4", "srste")]
    raise ValueError(f"unknown experiment {experiment!r}; choose from {', '.join(EXPERIMENTS)}")


def check_experiments(names: Iterable[str]) -> list[str]:
    """Validate an experiment selection; returns it in canonical order, without duplicates."""
    names = list(names)
    bad = [n for n in names if n not in EXPERIMENTS]
    if bad or not names:
        raise ValueError(f"unknown experiment(s) {bad or names}: choose from {', '.join(EXPERIMENTS)}")
    return [e for e in EXPERIMENTS if e in names]


def build_grid(experiments: Iterable[str], scale: Scale) -> list[Cell]:
    """The unique cells of the selected experiments, seed-major (every setting at the first seed,
    then every setting at the next), so a grid stopped early has the most settings covered."""
    experiments = check_experiments(experiments)
    wanted = {k for e in experiments for k, _ in experiment_settings(e, scale.nms)}
    settings: dict[str, dict] = {}
    for exp in PRIORITY:  # the 2:4 core (dense, STE, SR-STE) first
        for key, fields in experiment_settings(exp, scale.nms):
            if key in wanted:
                settings.setdefault(key, fields)
    return [Cell(key, seed, tuple(sorted(fields.items()))) for seed in scale.seeds for key, fields in settings.items()]


def demo_cells(scale: Scale) -> list[Cell]:
    """The main job's runs: dense and SR-STE 2:4 ResNet at each seed of ``scale``."""
    return [Cell(key, seed, tuple(sorted(f.items()))) for seed in scale.seeds
            for key, f in experiment_settings("demo")]


def experiment_keys(experiment: str, nms: Iterable[str] = NMS) -> list[str]:
    """The cell keys (without seed) one experiment reads."""
    return [k for k, _ in experiment_settings(experiment, nms)]


def transposable_missing() -> str | None:
    """``None`` if :func:`nmsparse.sparsify` supports transposable masks, else why not."""
    from nmsparse.surgery.sparse_model import sparsify

    params = inspect.signature(sparsify).parameters
    missing = [p for p in ("transposable", "mask_method") if p not in params]
    if missing:
        return f"nmsparse.surgery.sparse_model has no {' / '.join(missing)} argument yet (transposable masks, issue 3)"
    return None
