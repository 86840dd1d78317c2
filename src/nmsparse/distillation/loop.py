"""``nmsparse.distill``: an N:M student learns from its dense teacher on unlabelled inputs.

Each step runs one batch through the frozen teacher (``no_grad``, eval mode) and the student, and
minimises ``output_weight * output loss + hidden_weight * mean over blocks of the hidden-state
loss`` (:mod:`nmsparse.distillation.losses`; blocks found by :func:`nmsparse.distillation.blocks.find_blocks`)
with AdamW, a linear warm-up then cosine decay of the learning rate, and gradient clipping.

The student's N:M machinery is :func:`nmsparse.sparsify`'s: ``method="fixed"`` keeps the masks it
starts with (pruned weights get no gradient; the masks are compared at the end and must be equal),
``"srste"`` recomputes them every pass from the dense weights (SR-STE, Zhou et al. 2021; every
mask is checked to be N:M at every log step). At the end the student is finalized in place (plain
weights holding the zeros) and every sparse weight checked N:M.

With ``out``, a checkpoint (:mod:`nmsparse.distillation.state`) is written every ``checkpoint_every``
steps and at the end, ``metrics.jsonl`` (one JSON line per log step) and ``final.safetensors`` (the
finalized student's state dict); ``resume=True`` continues from the checkpoint, bit for bit the same
result as an uninterrupted run on the CPU.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from nmsparse.distillation import state as dstate
from nmsparse.distillation.blocks import BlockOutputs, find_blocks
from nmsparse.distillation import losses as L
from nmsparse.plumbing.errors import LoadError
from nmsparse.masking.layout import layer_is_nm
from nmsparse.lora.masks import lora_masks
from nmsparse.masking.pattern import NMPattern, to_pattern
from nmsparse.plumbing.progress import Progress, resolve
from nmsparse.surgery.sparse_model import finalize, masks, sparse_tensors, sparsify
from nmsparse.training import checkpoint as ckpt
from nmsparse.training.loop import warmup_cosine

STUDENT_METHODS = ("fixed", "srste")


@dataclass
class DistillReport:
    """What :func:`distill` did: ``steps`` done, ``layers`` (N:M tensors), ``records`` (one dict per
    log step: ``step``, ``loss``, ``output``, ``hidden``, ``lr``, ``time``), ``masks_unchanged``
    (fixed masks equal at the end as at the start; ``None`` for SR-STE), ``nm_checks`` (times every
    mask was checked N:M), ``seconds`` of this call, ``resumed_from`` (a step, or ``None``)."""

    steps: int
    layers: int
    method: str
    records: list[dict] = field(default_factory=list)
    masks_unchanged: bool | None = None
    nm_checks: int = 0
    seconds: float = 0.0
    resumed_from: int | None = None


def _inputs(item: Any) -> Any:
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError("a batch is an empty tuple/list; expected inputs, or (inputs, targets)")
        return item[0]
    return item


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    return x


def _call(model: nn.Module, x: Any) -> Any:
    return model(**x) if isinstance(x, Mapping) else model(x)


def _attention_mask(x: Any) -> torch.Tensor | None:
    am = x.get("attention_mask") if isinstance(x, Mapping) else None
    return am if isinstance(am, torch.Tensor) and am.dim() == 2 else None


def _prepare_student(student: nn.Module, nm: Any, method: str, decay: float, select: Mapping | None) -> None:
    """Make ``student`` N:M with ``method`` when it is not already (see :func:`distill`)."""
    have = list(sparse_tensors(student)) or lora_masks(student)
    if have:
        if nm is not None or select:
            raise ValueError("the student is already N:M (nmsparse.sparsify or nmsparse.lora): pass neither nm nor "
                             "select, its masks and method are used as they are")
        return
    if nm is None:
        raise ValueError("the student has no N:M layer: pass nm=(n, m) (its masks are then taken from its "
                         "current weights, e.g. those nmsparse.prune left) or sparsify it first")
    pattern = to_pattern(nm)
    if method not in STUDENT_METHODS:
        raise ValueError(f"method must be one of {STUDENT_METHODS}, got {method!r}")
    kw = dict(select or {})
    if getattr(student, "config", None) is not None and hasattr(student, "save_pretrained"):
        from nmsparse.integrations import hf

        hf.sparsify(student, pattern, pattern.m, method=method, decay=decay, **kw)
    else:
        sparsify(student, pattern, method=method, decay=decay, **kw)
    if not any(True for _ in sparse_tensors(student)):
        raise ValueError("sparsify selected no layer of the student: check select's include / exclude / keep_dense")


def _check_args(steps: int, lr: float, output: str, output_weight: float, hidden_weight: float,
                temperature: float, checkpoint_every: int, log_every: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    for what, v in (("lr", lr), ("temperature", temperature)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{what} must be a number > 0, got {v!r}")
    for what, v in (("output_weight", output_weight), ("hidden_weight", hidden_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{what} must be a number >= 0, got {v!r}")
    if output not in L.OUTPUT_LOSSES:
        raise ValueError(f"output_loss must be one of {L.OUTPUT_LOSSES}, got {output!r}")
    if output == "none" and hidden_weight == 0:
        raise ValueError("nothing to learn from: output_loss='none' and hidden_weight=0")
    for what, v in (("checkpoint_every", checkpoint_every), ("log_every", log_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be an integer >= 1, got {v!r}")


def _batch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence | Iterable,
    *,
    steps: int,
    lr: float = 1e-4,
    nm: tuple[int, int] | str | NMPattern | None = None,
    method: str = "fixed",
    decay: float = 2e-4,
    select: Mapping[str, Any] | None = None,
    output_loss: str = "auto",
    output_weight: float = 1.0,
    hidden_weight: float = 1.0,
    blocks: Sequence[str] | None = None,
    temperature: float = 1.0,
    weight_decay: float = 0.0,
    warmup: float = 0.05,
    grad_clip: float | None = 1.0,
    dropout: bool = False,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 200,
    log_every: int = 10,
    progress: bool | str = True,
    log: Callable[[str], None] | None = None,
    on_log: Callable[[dict], None] | None = None,
    finalize_student: bool = True,
) -> DistillReport:
    """Distil ``teacher`` (dense, frozen) into the N:M ``student`` in place for ``steps`` steps.

    ``batches``: the unlabelled inputs, a sequence (an iterable is read once into a list) of model
    inputs: a mapping (tokenized text: ``student(**batch)``), a tensor (``student(batch)``) or a
    tuple whose first element is one (labels are ignored). Steps cycle through them in a seeded
    random order per pass. ``student``: already N:M (:func:`nmsparse.sparsify`, any method; ``nm``
    and ``select`` must then be ``None``), or a plain model (e.g. pruned by :func:`nmsparse.prune`)
    with ``nm=(n, m)`` (N kept per group of M): it is sparsified with ``method`` (``"fixed"``: the
    masks of its current weights, frozen; ``"srste"``: SR-STE with ``decay`` from them) and
    ``select`` (``include``/``exclude``/``keep_dense`` of :func:`nmsparse.sparsify`); a
    ``transformers`` model through :func:`nmsparse.integrations.hf.sparsify`.

    Loss: ``output_weight`` times ``output_loss`` (``"auto"``, ``"cosine"``, ``"mse"``, ``"kl"`` at
    ``temperature``, ``"none"``; see :mod:`nmsparse.distillation.losses`) plus ``hidden_weight`` times the
    mean normalised MSE of the outputs of ``blocks`` (default: every repeated block,
    :func:`~nmsparse.distillation.blocks.find_blocks`). AdamW at ``lr`` (``weight_decay``), warm-up over the
    fraction ``warmup`` of the steps then cosine to 0, gradients clipped to norm ``grad_clip``.
    ``dropout=False`` keeps the student's dropout layers off (the student trains in train mode
    otherwise). ``progress``: a :mod:`nmsparse.plumbing.progress` mode; ``log``: gets a line every
    ``log_every`` steps, ``on_log(record)`` the record then, after that step's checkpoint (it may
evaluate the student: train mode is set again after it). ``out``/``resume``/``checkpoint_every``: see the module doc.

    A student with N:M LoRA layers (:func:`nmsparse.lora.get_nm_peft_model`) trains its adapters
    (``method`` ``"lora"``; their masks are checked unchanged) and is not finalized: merge it with
    :func:`nmsparse.lora.merge`.

    Returns a :class:`DistillReport`; the student is left in eval mode, finalized when
    ``finalize_student``. Every
    argument is checked before the student is touched; a checkpoint that does not fit raises
    :class:`~nmsparse.plumbing.errors.LoadError` with the student unchanged.
    """
    t_start = time.perf_counter()
    _check_args(steps, lr, output_loss, output_weight, hidden_weight, temperature, checkpoint_every, log_every)
    mode = resolve(progress)
    if resume and out is None:
        raise ValueError("resume=True needs out (the folder holding the checkpoint)")
    data = list(batches) if not isinstance(batches, Sequence) else batches
    if not len(data):
        raise ValueError("batches is empty: distillation needs at least one batch of inputs")
    if {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}:
        raise ValueError("student and teacher share parameters: pass a copy of the dense model as the student")
    names = list(blocks) if blocks is not None else (find_blocks(teacher) if hidden_weight > 0 else [])
    if hidden_weight > 0 and not names:
        raise ValueError(f"{type(teacher).__name__} has no repeated blocks to match hidden states on: pass "
                         "hidden_weight=0 or blocks=[module names]")
    student_names = [_resolve(student, b) for b in names]
    for model, who, wanted in ((teacher, "teacher", names), (student, "student", student_names)):
        mods = dict(model.named_modules())
        missing = [b for b in wanted if b not in mods]
        if missing:
            raise ValueError(f"the {who} ({type(model).__name__}) has no module named {missing[0]!r} (blocks): "
                             "student and teacher must have the same architecture")
    settings = dict(steps=steps, lr=float(lr), output_loss=output_loss, output_weight=float(output_weight),
                    hidden_weight=float(hidden_weight), blocks=names, temperature=float(temperature),
                    weight_decay=float(weight_decay), warmup=float(warmup),
                    grad_clip=None if grad_clip is None else float(grad_clip), dropout=bool(dropout), seed=seed,
                    batches=len(data))

    def setup(model: nn.Module):
        _prepare_student(model, nm, method, decay, select)
        layers = list(sparse_tensors(model))
        config = dict(settings, method=layers[0][3].method if layers else "lora",
                      nm=[layers[0][3].n, layers[0][3].m] if layers else None)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        warm = min(steps, round(warmup * steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warm, steps))
        return layers, config, params, optimizer, scheduler

    out_dir = Path(out) if out is not None else None
    saved = None
    if resume and ((out_dir / dstate.CHECKPOINT).exists() or (out_dir / dstate.CHECKPOINT).is_symlink()):
        saved = dstate.load(out_dir / dstate.CHECKPOINT)  # checked on a copy: a misfit leaves the student as it was
        probe = copy.deepcopy(student)
        _, p_config, _, p_opt, _ = setup(probe)
        why = dstate.mismatch(saved, p_config, probe, p_opt)
        if why is None and p_config["method"] in ("fixed", "lora"):
            fresh = _all_masks(probe)
            probe.load_state_dict(saved["model"])
            if any(not torch.equal(fresh[k], v) for k, v in _all_masks(probe).items()):
                why = "it holds other fixed masks than this student's (resume from the same starting student)"
        if why:
            hint = dstate.SETTINGS_HINT if why.startswith("was made") else dstate.HINT
            raise LoadError(out_dir / dstate.CHECKPOINT, why, hint, action="cannot resume from")
        del probe, p_opt
    layers, config, params, optimizer, scheduler = setup(student)
    method_used = config["method"]
    device = next(student.parameters()).device

    torch.manual_seed(seed)
    report = DistillReport(steps=0, layers=len(layers), method=method_used)
    start_masks = _all_masks(student)
    if saved is not None:
        student.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        ckpt.set_rng_state(saved["rng"])
        report.records = list(saved["records"])
        report.steps = report.resumed_from = saved["step"]
    elif out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in (dstate.CHECKPOINT, "metrics.jsonl", "final.safetensors"):
            (out_dir / stale).unlink(missing_ok=True)

    teacher.eval()
    _train_mode(student, dropout)
    kind: str | None = None

    def save() -> None:
        if out_dir is None:
            return
        dstate.save(out_dir / dstate.CHECKPOINT, {
            "step": report.steps, "config": config, "model": student.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": ckpt.rng_state(),
            "records": report.records})
        lines = "".join(json.dumps(r) + "\n" for r in report.records)
        ckpt.atomic_write(out_dir / "metrics.jsonl", lambda f: f.write(lines.encode()))

    bar = Progress(steps, "distill", unit="step", mode=mode)
    bar.update(report.steps)
    t0 = time.perf_counter()
    sums = torch.zeros(3, dtype=torch.float64)
    count = 0
    with BlockOutputs(teacher, names) as t_hooks, BlockOutputs(student, student_names) as s_hooks:
        while report.steps < steps:
            epoch, i = divmod(report.steps, len(data))
            x = _to(_inputs(data[_batch_order(len(data), seed, epoch)[i]]), device)
            am = _attention_mask(x)
            t_hooks.clear()
            s_hooks.clear()
            with torch.no_grad():
                t_out, what = L.output_tensor(_call(teacher, x))
            s_out, _ = L.output_tensor(_call(student, x))
            kind = kind or L.resolve_kind(output_loss, what, t_out)
            lo = L.output_loss(kind, s_out, t_out, am, temperature) if kind != "none" else s_out.new_zeros(())
            lh = s_out.new_zeros(())
            if names:
                lh = sum(L.hidden_loss(s_hooks.outputs[sn], t_hooks.outputs[n], am)
                         for n, sn in zip(names, student_names)) / len(names)
            loss = output_weight * lo + hidden_weight * lh
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            report.steps += 1
            sums += torch.tensor([float(loss.detach()), float(lo.detach()), float(lh.detach())], dtype=torch.float64)
            count += 1
            bar.update(1)
            if report.steps % log_every == 0 or report.steps == steps:
                r = {"step": report.steps, "loss": float(sums[0]) / count, "output": float(sums[1]) / count,
                     "hidden": float(sums[2]) / count, "lr": lr_now, "time": time.perf_counter() - t0}
                report.records.append(r)
                sums.zero_()
                count = 0
                _check_nm(student)
                report.nm_checks += 1
                bar.set_postfix(loss=f"{r['loss']:.4f}")
                if log is not None:
                    log(f"step {r['step']}/{steps}  loss {r['loss']:.5f}  output {r['output']:.5f}  "
                        f"hidden {r['hidden']:.5f}  lr {lr_now:.3g}")
            if report.steps % checkpoint_every == 0 or report.steps == steps:
                save()
            if on_log is not None and report.records and report.records[-1]["step"] == report.steps:
                on_log(report.records[-1])
                _train_mode(student, dropout)
    bar.close()
    _check_nm(student)
    report.nm_checks += 1
    if method_used in ("fixed", "lora"):
        now = _all_masks(student)
        report.masks_unchanged = all(torch.equal(start_masks[k], now[k]) for k in start_masks)
        if not report.masks_unchanged:  # a bug, never the user's doing
            raise RuntimeError("a fixed mask changed during distillation")
    student.eval()
    if finalize_student and method_used != "lora":
        finalize(student)
        for full, n, m, layout in [(f, p.n, p.m, p.layout) for f, _, _, p in layers]:
            mod_name, _, tname = full.rpartition(".")
            w = getattr(student.get_submodule(mod_name) if mod_name else student, tname)
            if not layer_is_nm(w.detach(), n, m, layout):
                raise RuntimeError(f"finalized weight {full!r} is not {n}:{m}")
        if out_dir is not None:
            from safetensors.torch import save as st_save

            tensors = {k: v.detach().contiguous().clone() for k, v in student.state_dict().items()}
            data_bytes = st_save(tensors, metadata={"distill": json.dumps(config), "steps": str(report.steps)})
            ckpt.atomic_write(out_dir / "final.safetensors", lambda f: f.write(data_bytes))
    report.seconds = time.perf_counter() - t_start
    return report


def _all_masks(student: nn.Module) -> dict[str, torch.Tensor]:
    """The masks of the student's N:M layers: :func:`nmsparse.masks` and those of N:M LoRA layers."""
    return {**masks(student), **{f"lora:{k}": v for k, v in lora_masks(student).items()}}


def _resolve(student: nn.Module, name: str) -> str:
    """The student's module for the teacher's block ``name``: the same name, or the one module whose
    name ends with ``.name`` (a wrapped student, e.g. peft's ``base_model.model.`` prefix)."""
    mods = dict(student.named_modules())
    if name in mods:
        return name
    found = [k for k in mods if k.endswith("." + name)]
    return found[0] if len(found) == 1 else name


def _train_mode(student: nn.Module, dropout: bool) -> None:
    """Train mode (the N:M masks' refresh hooks run in it), dropout layers off unless ``dropout``."""
    student.train()
    if not dropout:
        for mod in student.modules():
            if isinstance(mod, nn.modules.dropout._DropoutNd):
                mod.eval()


def _check_nm(student: nn.Module) -> None:
    """Every mask of ``student`` N:M in its layer's layout (raises ``RuntimeError`` otherwise: a bug)."""
    for full, _, _, p in sparse_tensors(student):
        if not layer_is_nm(p.mask, p.n, p.m, p.layout):
            raise RuntimeError(f"the mask of {full!r} is not {p.n}:{p.m}")
