"""The training loop: N:M sparse (or dense) training from scratch, with metrics, SAD, checkpoints
that resume bit for bit, and DDP (or FSDP2 with ``config.fsdp``) when launched by ``torchrun``.

Output folder (``config.out``), written by rank 0 only:

* ``config.json``: ``TrainConfig.to_dict()``, everything needed to rerun.
* ``metrics.jsonl``: one JSON object per epoch: ``epoch`` (from 1), ``loss`` (mean training loss),
  ``train_acc``, ``test_loss``, ``test_acc``, ``lr`` (of the epoch's last step), ``time`` (seconds),
  ``sad`` (:meth:`nmsparse.SADTracker.measure` as a dict, against the initial mask and the previous
  epoch; for a dense run, of the dense weights' magnitude masks at ``sad_nm``), or ``null``.
* ``checkpoint.pt``: see :mod:`nmsparse.training.checkpoint`; rewritten atomically every epoch.
  With FSDP2 it holds everything but model and optimizer, which are in the
  ``torch.distributed.checkpoint`` folder ``checkpoint.dcp/epoch-K`` it names (``"dcp"``; see
  :mod:`nmsparse.training.fsdp`).
* ``final.safetensors``: the finalized weights (``E * W``, no N:M machinery), loadable into a fresh
  model from :func:`nmsparse.training.models.build_model`.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from nmsparse.surgery import sparse_model as S
from nmsparse.surgery.sad_tracker import SADTracker
from nmsparse.plumbing.errors import LoadError
from nmsparse.plumbing.progress import Progress, resolve
from nmsparse.plumbing.writing import write_text
from nmsparse.training import checkpoint as ckpt
from nmsparse.training import distributed as D
from nmsparse.training.config import TrainConfig
from nmsparse.training.data import Dataset, load_dataset
from nmsparse.training.models import build_model
from nmsparse.plumbing.writing import save_safetensors
from nmsparse.training.resume import (  # noqa: F401 - RESUME_FREE_FIELDS, read_resume_state: public here too
    CHECKPOINT, RESUME_FREE_FIELDS, RESUME_HINT, read_resume_state, state_mismatch,
)

EVAL_BATCH = 1000


def _refreshed_nm_buffers(model: nn.Module) -> list[str]:
    """Names of the ``mask`` and ``step`` buffers of the N:M layers whose masks refresh (method not
    ``"fixed"``). DDP need not broadcast them on every pass (1 byte per weight): they are equal on
    every rank by construction (see :mod:`nmsparse.training.distributed`), and each refresh replaces
    them with new tensors, which DDP's list of buffers (made at wrap time) would not see anyway."""
    ids = {id(b) for _, _, _, p in S.sparse_tensors(model) if p.method != "fixed"
           for b in p.buffers()}
    return [name for name, b in model.named_buffers() if id(b) in ids]


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor at optimizer step ``s`` (0-based): linear warm-up from ``1/warmup_steps`` to 1 over
    ``warmup_steps``, then a half cosine from 1 down to 0 at ``total_steps``."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warmup_steps) / span)))

    return factor


ModelFn = Callable[[TrainConfig, Dataset], tuple[nn.Module, Any]]


def build_sparse_model(config: TrainConfig, data: Dataset) -> tuple[nn.Module, Any]:
    """The model of ``config`` (initialised from the global RNG), made N:M when ``config.nm`` says so.
    Returns ``(model, SparsityReport or None)``."""
    model = build_model(config.model, image_size=data.image_size, in_channels=data.in_channels,
                        num_classes=data.num_classes)
    pair = config.nm_pair
    if pair is None:
        return model, None
    kwargs: dict[str, Any] = dict(method=config.method, decay=config.decay, layout=config.layout,
                                  update_every=config.update_every)
    if config.transposable:
        kwargs.update(transposable=True, mask_method=config.mask_method)
    with warnings.catch_warnings():  # "made no layer sparse" becomes the one error below
        warnings.filterwarnings("ignore", message="sparsify made no layer sparse")
        report = S.sparsify(model, *pair, **kwargs)
    if not report.sparse:
        why = "; ".join(f"{e.param}: {e.reason}" for e in report.dense[:3])
        raise ValueError(f"--nm {config.nm} makes no layer of model {config.model!r} on {config.data!r} N:M ({why}); "
                         f"choose an M that divides the layers' input sizes, e.g. 2:4")
    return model, report


def configure_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch and numba (``None``: keep torch's count).

    numba's OpenMP pool, started by the first parallel mask kernel, calls ``omp_set_num_threads``
    with its own count, which silently resets torch's thread count in the same process. Starting the
    pool here first, then setting torch's count, makes ``threads`` (and torchrun's OMP_NUM_THREADS)
    stick.
    """
    before = torch.get_num_threads()
    try:
        import numba
        from numba.np.ufunc.parallel import _launch_threads

        _launch_threads()
        if threads is not None:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except Exception:  # pragma: no cover - numba missing or its threading layer refusing
        pass
    torch.set_num_threads(threads if threads is not None else before)


class Trainer:
    """One run of ``config``. :meth:`run` trains and returns the per-epoch records.

    ``self.model`` is the plain model (not the DDP wrapper); ``self.records`` the records so far.
    ``on_epoch_end(record)`` is called on every rank after each epoch's checkpoint is written.
    ``log`` receives the one-line summaries (rank 0 only; ``None`` for silence).
    ``model_fn(config, data) -> (model, report)`` builds the model (default :func:`build_sparse_model`).
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False, progress: bool | str = True,
                 log: Callable[[str], None] | None = print,
                 on_epoch_end: Callable[[dict], None] | None = None,
                 model_fn: ModelFn | None = None) -> None:
        config.validate()
        self.config = config
        self.progress = resolve(progress)  # "bar", "lines" or "off" (ValueError before anything is done)
        self.on_epoch_end = on_epoch_end
        self.out = Path(config.out)
        configure_threads(config.threads)
        # Load data before anything is written: a missing dataset writes nothing.
        self.data = load_dataset(config.data, config.data_dir, train_subset=config.train_subset,
                                 test_subset=config.test_subset)
        self.ctx = D.setup(config.device)
        # A checkpoint to resume is read and its settings checked before the model is built.
        state = read_resume_state(config, map_location=self.ctx.device) if resume else None
        self._log = log if self.ctx.is_main else None
        if config.fsdp and not self.ctx.distributed:
            raise ValueError("fsdp shards over several processes: run under 'torchrun --nproc_per_node=K "
                             "-m nmsparse train --fsdp ...' with K >= 2")
        if self.ctx.distributed and config.batch_size % self.ctx.world_size:
            raise ValueError(f"batch_size {config.batch_size} (global) is not a multiple of the "
                             f"{self.ctx.world_size} processes")
        dev = self.ctx.device
        if dev.type != "cpu":
            d = self.data
            d.x_train, d.y_train, d.x_test, d.y_test = (t.to(dev) for t in (d.x_train, d.y_train, d.x_test, d.y_test))

        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.model, self.report = (model_fn or build_sparse_model)(config, self.data)
        self.model.to(dev)
        self.net: nn.Module = self.model
        if config.fsdp:
            from nmsparse.training import fsdp

            self.net = fsdp.shard(self.model, masks=config.fsdp_masks)  # in place: self.net is self.model
        elif self.ctx.distributed:
            ids = [dev.index] if dev.type == "cuda" else None
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self.model, _refreshed_nm_buffers(self.model))
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

        cfg = config
        if cfg.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

        n_train = len(self.data.y_train)
        self.sampler = DistributedSampler(_Indices(n_train), num_replicas=self.ctx.world_size, rank=self.ctx.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=False)
        self.local_batch = cfg.batch_size // self.ctx.world_size
        self.steps_per_epoch = math.ceil(self.sampler.num_samples / self.local_batch)
        total = cfg.epochs * self.steps_per_epoch
        warm = min(total, round(cfg.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(warm, total))

        if self.report is not None:
            self.tracker = SADTracker(self.model)
        else:
            n, m = cfg.sad_pair
            model = self.model
            magnitude_masks = S.magnitude_masks
            if cfg.fsdp:
                from nmsparse.training.fsdp import magnitude_masks
            self.tracker = SADTracker(lambda: magnitude_masks(model, n, m, layout=cfg.layout))

        self.records: list[dict] = []
        self.epoch = 0
        if state is not None:
            self._restore(state)
        elif self.ctx.is_main:
            for name in (CHECKPOINT, "metrics.jsonl", "final.safetensors", "config.json"):
                if (self.out / name).is_dir():
                    raise ValueError(f"{self.out / name} is a directory where the run writes a file: "
                                     f"remove it or use another --out")
            try:  # the up-front check cannot foresee everything (e.g. root under /proc)
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"cannot create the output folder {str(self.out)!r}: {e.strerror or e}") from e
            write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            for stale in ("metrics.jsonl", CHECKPOINT, "final.safetensors"):
                (self.out / stale).unlink(missing_ok=True)
            shutil.rmtree(self.out / "checkpoint.dcp", ignore_errors=True)
        D.barrier(self.ctx)

    # --- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The checkpoint's contents (with FSDP2: all but model and optimizer, see the module doc)."""
        state = {
            "epoch": self.epoch,
            "config": self.config.to_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "sad": {"initial": self.tracker.initial, "previous": self.tracker.previous},
            "records": self.records,
        }
        if not self.config.fsdp:
            state.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        """Check that ``state`` (from :func:`read_resume_state`) fits this run, then restore it. Every
        check comes first: a checkpoint that does not fit raises LoadError with nothing changed. With
        FSDP2 the model and optimizer come from the DCP folder the checkpoint names, which checks them."""
        why = state_mismatch(state, self.model, self.optimizer, self.tracker, self.config)
        if why:
            raise LoadError(self.out / CHECKPOINT, why, RESUME_HINT, action="cannot resume from")
        if self.config.fsdp:
            from nmsparse.training import fsdp

            fsdp.load_run_checkpoint(self.out, state.get("dcp"), self.model, self.optimizer)
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.tracker.initial = dict(state["sad"]["initial"])
        self.tracker.previous = dict(state["sad"]["previous"])
        self.records = list(state["records"])
        self.epoch = int(state["epoch"])
        ckpt.set_rng_state(state["rng"])
        if self._log:
            self._log(f"resuming {self.out} after epoch {self.epoch}/{self.config.epochs}")

    def _save(self) -> None:
        dcp = None
        if self.config.fsdp:  # every rank writes its shards, then checkpoint.pt names the folder
            from nmsparse.training import fsdp

            dcp = fsdp.save_run_checkpoint(self.out, self.epoch, self.model, self.optimizer)
        if not self.ctx.is_main:
            return
        ckpt.save(self.out / "checkpoint.pt", self.state() if dcp is None else dict(self.state(), dcp=dcp))
        if dcp is not None:
            fsdp.remove_old_run_checkpoints(self.out, keep=dcp)
        lines = "".join(json.dumps(r) + "\n" for r in self.records)
        write_text(self.out / "metrics.jsonl", lines)

    def save_final(self) -> Path:
        """Write ``final.safetensors``: the finalized weights of a copy of the model."""
        path = self.out / "final.safetensors"
        if self.config.fsdp:  # gathered on rank 0 (a collective)
            from nmsparse.training import fsdp

            gathered = fsdp.finalized_state_dict(self.model)
        if self.ctx.is_main:
            if self.config.fsdp:
                tensors = {k: v.detach().contiguous().clone() for k, v in gathered.items()}
            else:  # nmsparse.finalize is safe on a deep copy: the training model is left untouched
                final = S.finalize(copy.deepcopy(self.model)).to("cpu")
                tensors = {k: v.detach().contiguous().clone() for k, v in final.state_dict().items()}
            meta = {"config": json.dumps(self.config.to_dict()), "epochs": str(self.epoch)}
            save_safetensors(path, tensors, meta)  # with the checksum every nmsparse reader verifies
        D.barrier(self.ctx)
        return path

    # --- training -----------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        cfg, ctx, data = self.config, self.ctx, self.data
        self.sampler.set_epoch(self.epoch)
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long, device=data.x_train.device)
        self.net.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        correct = torch.zeros((), dtype=torch.long, device=ctx.device)
        count = 0
        # lines mode: the per-epoch summary is the log's line; without a log, the bar's closing line
        bar = Progress(self.steps_per_epoch, f"epoch {self.epoch + 1}/{cfg.epochs}", unit="step",
                       mode=self.progress if ctx.is_main else "off", summary=self._log is None)
        lr = self.optimizer.param_groups[0]["lr"]
        for b in range(self.steps_per_epoch):
            idx = order[b * self.local_batch:(b + 1) * self.local_batch]
            x, y = data.x_train[idx], data.y_train[idx]
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.argmax(1) == y).sum()
            count += len(y)
            bar.update(1)
            if b % 20 == 0 and bar.mode != "off":
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{lr:.4g}")
        bar.close()
        s_loss, s_correct, s_count = D.all_sum(ctx, [float(loss_sum), float(correct), float(count)])
        return {"loss": s_loss / s_count, "train_acc": s_correct / s_count, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test loss and accuracy (each rank evaluates a shard, results summed)."""
        ctx, data = self.ctx, self.data
        self.model.eval()
        xs, ys = data.x_test[ctx.rank::ctx.world_size], data.y_test[ctx.rank::ctx.world_size]
        loss_sum, correct = 0.0, 0
        # FSDP2 all-gathers in every forward: every rank runs as many batches (the last maybe empty)
        longest = -(-len(data.y_test) // ctx.world_size) if self.config.fsdp else len(ys)
        for s in range(0, longest, EVAL_BATCH):
            logits = self.model(xs[s:s + EVAL_BATCH])
            y = ys[s:s + EVAL_BATCH]
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        self.model.train()
        s_loss, s_correct, s_count = D.all_sum(ctx, [loss_sum, float(correct), float(len(ys))])
        return {"test_loss": s_loss / max(s_count, 1), "test_acc": s_correct / max(s_count, 1)}

    def run(self) -> list[dict]:
        cfg = self.config
        try:
            while self.epoch < cfg.epochs:
                t0 = time.perf_counter()
                train = self.train_epoch()
                if cfg.fsdp:  # BatchNorm statistics: rank 0's, as DDP keeps them
                    from nmsparse.training.fsdp import sync_buffers

                    sync_buffers(self.model)
                test = self.evaluate()
                self.epoch += 1
                D.check_same(self.ctx, [t.float() for t in S.masks(self.model).values()], "masks")
                sad = self.tracker.measure().to_dict()
                record = {"epoch": self.epoch, "loss": train["loss"], "train_acc": train["train_acc"],
                          "test_loss": test["test_loss"], "test_acc": test["test_acc"], "lr": train["lr"],
                          "time": time.perf_counter() - t0, "sad": sad}
                self.records.append(record)
                self._save()
                if self._log:
                    self._log(summary_line(record, cfg.epochs))
                if self.on_epoch_end is not None:
                    self.on_epoch_end(record)
            final = self.save_final()
            if self._log:
                self._log(f"done: test accuracy {self.records[-1]['test_acc']:.2%}; weights in {final}")
            return self.records
        finally:
            D.teardown(self.ctx)


def summary_line(r: dict, epochs: int) -> str:
    sad = r.get("sad")
    s = ""
    if sad:
        t = sad["total"]
        s = f"  SAD {t['vs_initial_frac']:.2%} vs init, {t['vs_previous_frac']:.2%} vs prev"
    return (f"epoch {r['epoch']:>3}/{epochs}  loss {r['loss']:.4f}  train {r['train_acc']:.2%}  "
            f"test {r['test_acc']:.2%}  lr {r['lr']:.4g}{s}  {r['time']:.1f}s")


def train(config: TrainConfig, *, resume: bool = False, progress: bool | str = True,
          log: Callable[[str], None] | None = print,
          on_epoch_end: Callable[[dict], None] | None = None,
          model_fn: ModelFn | None = None) -> list[dict]:
    """Train ``config`` into ``config.out`` and return the per-epoch records (see module doc).

    With ``resume=True`` a run with a ``checkpoint.pt`` in ``config.out`` continues after its last
    completed epoch (same settings required; a finished run only rewrites ``final.safetensors``);
    without a checkpoint it starts fresh; a checkpoint that is damaged, made with other settings or
    does not fit the model raises :class:`nmsparse.plumbing.errors.LoadError` (a ValueError) before anything
    is changed. With ``resume=False`` an earlier run in ``config.out`` is replaced. ``progress``:
    a :mod:`nmsparse.plumbing.progress` mode (``True``: ``$NMSPARSE_PROGRESS`` or auto, a tqdm bar per epoch on
    a terminal, plain lines otherwise; ``False``: none); ``log`` gets one summary line per epoch
    (``None``: silent); ``on_epoch_end(record)`` is called after each epoch's checkpoint;
    ``model_fn(config, data) -> (model, report)`` replaces the model builder (e.g. to fine-tune a
    pruned model with frozen masks).
    """
    return Trainer(config, resume=resume, progress=progress, log=log, on_epoch_end=on_epoch_end,
                   model_fn=model_fn).run()
