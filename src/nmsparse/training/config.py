"""``TrainConfig``: every knob of a training run, validated before anything is written."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from pathlib import Path
from typing import Any

from nmsparse.masking.layout import LAYOUTS
from nmsparse.surgery.parametrization import METHODS

OPTIMIZERS = ("sgd", "adamw")
MASK_METHODS = ("approx", "optimal")


def parse_nm(text: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``"dense"`` -> ``None``. Raises ValueError on anything else,
    including pairs that are not ``0 < N < M``."""
    if not isinstance(text, str):
        raise ValueError(f"nm must be a string like '2:4' or 'dense', got {text!r}")
    if text.strip().lower() == "dense":
        return None
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        n, m = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"nm must look like N:M (N weights kept per group of M, e.g. 2:4) or 'dense', got {text!r}")
    if not 0 < n < m:
        raise ValueError(f"nm {text!r}: need 0 < N < M (N = weights kept per group of M), e.g. 2:4")
    return n, m


def sparsify_supports_transposable() -> bool:
    """True when this nmsparse's ``sparsify`` takes ``transposable=`` and ``mask_method=``."""
    from nmsparse.surgery.sparse_model import sparsify

    params = inspect.signature(sparsify).parameters
    return "transposable" in params and "mask_method" in params


@dataclasses.dataclass
class TrainConfig:
    """One training run. ``batch_size`` is the global batch (split over DDP processes).

    ``nm`` is ``"N:M"`` (N kept per M) or ``"dense"``; for a dense run ``sad_nm`` (default ``"2:4"``)
    is the N:M at which SAD of the dense weights' magnitude masks is tracked. ``warmup_epochs`` of
    linear warm-up are followed by a cosine decay to zero, both stepped per iteration.
    ``train_subset`` / ``test_subset`` keep only the first k images (quick runs).
    ``fsdp`` shards parameters and optimizer state with FSDP2 instead of DDP (under torchrun);
    ``fsdp_masks`` is ``"local"`` (each rank computes its rows' masks) or ``"gathered"`` (every rank
    every mask, from the gathered weight), see :func:`nmsparse.training.fsdp.shard`.
    """

    model: str = "resnet"
    data: str = "fashion-mnist"
    data_dir: str | None = None
    nm: str = "2:4"
    method: str = "srste"
    decay: float = 2e-4
    layout: str = "channels"
    transposable: bool = False
    mask_method: str = "approx"
    update_every: int = 1
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-5
    warmup_epochs: float = 1
    epochs: int = 30
    batch_size: int = 128
    seed: int = 0
    threads: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    sad_nm: str | None = None
    device: str = "cpu"
    out: str = "runs/x"
    fsdp: bool = False
    fsdp_masks: str = "local"

    # --- derived -----------------------------------------------------------------------------
    @property
    def nm_pair(self) -> tuple[int, int] | None:
        """``(N, M)`` or ``None`` for dense."""
        return parse_nm(self.nm)

    @property
    def dense(self) -> bool:
        return self.nm_pair is None

    @property
    def sad_pair(self) -> tuple[int, int]:
        """The N:M whose masks SAD tracks: the run's own, or ``sad_nm`` (default 2:4) when dense."""
        pair = self.nm_pair
        if pair is not None:
            return pair
        sad = parse_nm(self.sad_nm or "2:4")
        assert sad is not None
        return sad

    # --- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    # --- validation -------------------------------------------------------------------------
    def validate(self, *, check_out: bool = True) -> "TrainConfig":
        """Check every field; raise ``ValueError`` with a one-line message on the first problem.
        With ``check_out``, also check that ``out`` can be created or written. Returns self."""
        from nmsparse.training.data import DATASETS
        from nmsparse.training.models import MODELS

        def fail(msg: str) -> None:
            raise ValueError(msg)

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if self.model not in MODELS:
            fail(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.data not in DATASETS:
            fail(f"unknown data {self.data!r}; choose one of {', '.join(DATASETS)}")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            fail(f"data_dir must be a path string or None, got {self.data_dir!r}")
        pair = parse_nm(self.nm)
        if self.sad_nm is not None:
            if pair is not None:
                fail("sad_nm only applies to dense runs (nm='dense'); a sparse run tracks SAD of its own masks")
            if parse_nm(self.sad_nm) is None:
                fail("sad_nm must be an N:M like '2:4', not 'dense'")
        if self.method not in METHODS:
            fail(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not is_num(self.decay):
            fail(f"decay (SR-STE lambda_w) must be a finite number, got {self.decay!r}")
        if self.layout not in LAYOUTS:
            fail(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if not isinstance(self.transposable, bool):
            fail(f"transposable must be true or false, got {self.transposable!r}")
        if self.mask_method not in MASK_METHODS:
            fail(f"unknown mask_method {self.mask_method!r}; choose one of {', '.join(MASK_METHODS)}")
        if self.transposable:
            if pair is None:
                fail("transposable masks need an N:M run, not nm='dense'")
            if not sparsify_supports_transposable():
                fail("transposable masks are not available: this nmsparse.sparsify takes no transposable= argument")
        if not is_int(self.update_every) or self.update_every < 1:
            fail(f"update_every must be an integer >= 1, got {self.update_every!r}")
        if self.optimizer not in OPTIMIZERS:
            fail(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not is_num(self.lr) or self.lr <= 0:
            fail(f"lr must be a positive number, got {self.lr!r}")
        if not is_num(self.momentum) or not 0 <= self.momentum < 1:
            fail(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            fail(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not is_int(self.epochs) or self.epochs < 1:
            fail(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not is_num(self.warmup_epochs) or not 0 <= self.warmup_epochs <= self.epochs:
            fail(f"warmup_epochs must be between 0 and epochs ({self.epochs}), got {self.warmup_epochs!r}")
        if not is_int(self.batch_size) or self.batch_size < 1:
            fail(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not is_int(self.seed) or self.seed < 0:
            fail(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.threads is not None and (not is_int(self.threads) or self.threads < 1):
            fail(f"threads must be an integer >= 1 or None, got {self.threads!r}")
        for name in ("train_subset", "test_subset"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                fail(f"{name} must be an integer >= 1 or None, got {v!r}")
        if not isinstance(self.device, str) or not (self.device in ("cpu", "cuda", "auto")
                                                     or self.device.startswith("cuda:")):
            fail(f"device must be 'cpu', 'cuda', 'cuda:K' or 'auto', got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                fail(f"device {self.device!r} asked for, but CUDA is not available")
        if not isinstance(self.fsdp, bool):
            fail(f"fsdp must be true or false, got {self.fsdp!r}")
        if self.fsdp_masks not in ("local", "gathered"):
            fail(f"fsdp_masks must be 'local' or 'gathered', got {self.fsdp_masks!r}")
        if not isinstance(self.out, str) or not self.out:
            fail(f"out must be a non-empty path, got {self.out!r}")
        if check_out:
            check_writable_dir(self.out)
        return self


def check_writable_dir(path: str) -> None:
    """Raise ValueError unless ``path`` is a writable folder or could be created as one (creates nothing)."""
    p = Path(path).absolute()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"out {path!r} exists and is not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ValueError(f"out {path!r} is not writable")
        return
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"out {path!r} cannot be created: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"out {path!r} cannot be created: {parent} is not writable")
