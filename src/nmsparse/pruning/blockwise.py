"""Prune a ``transformers`` model saved on disk to N:M block by block, never holding it whole.

:func:`prune_pretrained` reads a ``save_pretrained`` folder through :class:`~nmsparse.calibration.streaming.BlockStream`:
the calibration batches are run through the embeddings once, their hidden states written to disk
(:mod:`nmsparse.calibration.spill`), the shell (embeddings, head; never pruned) written to its shard and freed;
then for each block in order the block is loaded from the safetensors file, pruned by :func:`nmsparse.prune`
exactly as whole-model pruning would prune it (each layer's calibration inputs come from the already-pruned
model, query/key/value share one pass, padded tokens are left out; the batches are read back from disk one
at a time), run once more to give the next block its inputs (written to disk batch by batch), written to
its own shard of the output folder and dropped. Peak memory is the larger of the shell (while the
calibration batches run through the embeddings) and one block, one calibration batch's activations and
the Gram matrices and solver workspace of the layers being pruned.

The output is a ``save_pretrained`` folder (sharded ``model-XXXXX-of-YYYYY.safetensors`` with
``model.safetensors.index.json``, the input's config and tokenizer files) that
``ModelClass.from_pretrained`` loads as a plain model holding the zeros. It is written to a temporary
folder next to ``out`` and renamed at the end: a failed run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from nmsparse.plumbing.errors import WriteError
from nmsparse.plumbing.progress import Progress
from nmsparse.calibration import collect as calibration
from nmsparse.masking.nm import check_nm
from nmsparse.masking.pattern import NMPattern
from nmsparse.pruning.api import prune
from nmsparse.pruning.report import PruneReport
from nmsparse.pruning.options import PER_METHOD, resolve
from nmsparse.calibration.spill import HiddenSpill, SpilledItems
from nmsparse.calibration.streaming import BlockStream, block_output
from nmsparse.surgery.selection import KEEP_DENSE, Patterns, literal_pattern, plan
from nmsparse.plumbing.writing import remove_stale, save_safetensors, temp_path, write_error

OUTSIDE = "outside the transformer blocks (block-wise pruning prunes the blocks only)"


class _Runner(nn.Module):
    """Calls a block with recorded keyword arguments. Calibration items are
    ``{"attention_mask": 2-D token mask or absent, "block_kwargs": {...}}``: the token mask is where
    :mod:`nmsparse.calibration.collect` looks for padding, the block gets its own arguments."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, block_kwargs: dict[str, Any], attention_mask: torch.Tensor | None = None) -> Any:
        return self.block(**block_kwargs)


def rss_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc/self/statm``; 0 where unavailable)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux: ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prune_pretrained(
    path: str | os.PathLike,
    out: str | os.PathLike,
    n: int | NMPattern,
    m: int | None = None,
    *,
    method: Any,
    calib: Iterable,
    model_class: Any = None,
    include: Patterns = None,
    exclude: Patterns = None,
    keep_dense: Iterable[str] = KEEP_DENSE,
    dtype: torch.dtype | None = None,
    progress: bool | str = False,
    blocks: int | None = None,
    on_block: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> PruneReport:
    """Prune the ``transformers`` model saved in ``path`` to N:M (N kept per group of M) block by block
    and write it to the new folder ``out``; return the report (its ``settings`` record, per block, the
    seconds taken and the peak resident memory so far).

    ``calib``: batches of token ids ``(batch, tokens)`` or tokenizer mappings. ``model_class``:
    the class to build (default ``AutoModelForCausalLM``). Layer selection (``include``,
    ``exclude``, ``keep_dense``) is that of :func:`nmsparse.prune` applied to the whole model; layers
    outside the blocks (embeddings, the head) stay dense and are listed with that reason.
    ``options`` are :func:`nmsparse.prune`'s (``solver``, ``damp``, ``transposable``, ...).
    ``blocks``: prune the first ``blocks`` blocks only (to measure time and memory on part of a large
    model); the later ones are copied unchanged, listed dense with that reason. ``on_block``: called after
    each block with its entry of ``settings["blocks"]`` (seconds, CPU seconds, resident memory now and at
    peak so far) and ``"memory"`` (resident memory after the shell's load and after it is freed), e.g. to
    log a run of hours as it goes. ``n`` may be an :class:`~nmsparse.masking.pattern.NMPattern` (``m`` left out).
    """
    pattern = check_nm(n, m)
    n, m = pattern
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder: choose a new output folder")
    method = resolve(method, {k: options.pop(k) for k in PER_METHOD if k in options})
    calib = calibration.prepare(calib)
    if calib is None:
        raise ValueError("block-wise pruning needs calibration data: batches of token ids or tokenizer outputs")
    t_start = time.perf_counter()
    stream = BlockStream(path, model_class, dtype)
    entries = plan(stream.skeleton, pattern, include=include, exclude=exclude, keep_dense=keep_dense,
                   layout=options.get("layout", "channels"))
    if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int)
                               or not 1 <= blocks <= stream.num_blocks):
        raise ValueError(f"blocks must be an integer from 1 to the model's {stream.num_blocks} blocks, got {blocks!r}")
    last = stream.num_blocks if blocks is None else blocks
    later = tuple(f"{stream.prefix}{i}." for i in range(last, stream.num_blocks))
    for e in entries:
        if e.sparse and not e.name.startswith(stream.prefix):
            e.sparse, e.reason = False, OUTSIDE
        elif e.sparse and e.name.startswith(later or ("\0",)):
            e.sparse, e.reason = False, f"after the first {last} blocks (blocks={last}): copied unchanged"
    masks = [_token_mask(item) for item in calib]
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent)  # folders of killed earlier runs
    tmp = temp_path(out, folder=True)
    tmp.mkdir()
    results, blocks_info, weight_map = {}, [], {}
    total = stream.num_blocks + 1
    name_of = lambda i: f"model-{i + 1:05d}-of-{total:05d}.safetensors"  # noqa: E731
    memory = {"rss_after_shell_load_bytes": rss_bytes()}
    spill = None
    try:
        spill = HiddenSpill(tmp)
        for kw in stream.iter_block_inputs(calib):  # one batch's hidden states in memory at a time
            spill.append(kw)
        memory["peak_rss_after_block_inputs_bytes"] = peak_rss_bytes()
        # the shell is not pruned: write it now and free it (embeddings and head) before the blocks
        shell = {k: v.contiguous() for k, v in stream.shell_state().items()}
        save_safetensors(tmp / name_of(stream.num_blocks), shell, {"format": "pt"})  # checksummed
        weight_map.update({k: name_of(stream.num_blocks) for k in shell})
        del shell
        stream.drop_shell()
        memory["rss_after_shell_freed_bytes"] = rss_bytes()
        items = SpilledItems(spill, lambda kw, j: {"block_kwargs": kw, **(
            {"attention_mask": masks[j]} if masks[j] is not None else {})})
        bar = Progress(stream.num_blocks, f"prune {n}:{m} {method.name} block by block", mode=progress, unit="block",
                       leave=True)
        for i in range(stream.num_blocks):
            t0, c0 = time.perf_counter(), time.process_time()
            block = stream.load_block(i)
            pre = f"{stream.prefix}{i}."
            local = [e.name[len(pre):] for e in entries if e.sparse and e.name.startswith(pre)]
            if local:
                rep = prune(_Runner(block), pattern, method=method, calib=items, keep_dense=(),
                            include=[literal_pattern(f"block.{x}") for x in local], **options)
                for r in rep.results.values():
                    r.param = pre + r.param[len("block."):]
                    results[r.param] = r
                del rep
            if i + 1 < last:  # the next block's inputs (eval mode: prune() restored the runner's mode)
                block.eval()
                with torch.no_grad():
                    spill.advance(lambda kw: block_output(block(**kw)))
            state = {pre + k: v.contiguous() for k, v in block.state_dict().items()}
            save_safetensors(tmp / name_of(i), state, {"format": "pt"})
            weight_map.update({k: name_of(i) for k in state})
            del block, state
            blocks_info.append({"block": i, "layers": len(local), "time_s": time.perf_counter() - t0,
                                "cpu_s": time.process_time() - c0, "rss_bytes": rss_bytes(),
                                "peak_rss_bytes": peak_rss_bytes()})
            if on_block is not None:
                on_block({**blocks_info[-1], "memory": dict(memory)})
            bar.update(1)
        bar.close()
        spill.close()
        size = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        _copy_side_files(Path(path), tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException as e:
        if spill is not None:
            spill.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a write into the hidden folder: name the user's --out
            where = Path(getattr(e, "path", None) or getattr(e, "filename", None) or out)
            shown = out / where.relative_to(tmp) if tmp in where.parents else out
            raise WriteError(shown, write_error(shown, e).cause, getattr(e, "errno", None)) from e
        raise
    settings = dict(**method.settings(), blockwise=True, source=str(path), blocks=blocks_info, memory=memory,
                    pruned_blocks=last, calib_batches=len(masks),
                    peak_rss_bytes=peak_rss_bytes(), checkpoint_bytes=stream.reader.nbytes(),
                    **{k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))})
    return PruneReport(n, m, entries, settings, results, time.perf_counter() - t_start)


def _token_mask(item: Any) -> torch.Tensor | None:
    inputs = calibration._inputs(item)
    if isinstance(inputs, Mapping):
        am = inputs.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            return am
    return None


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config and tokenizer files: everything but the weights."""
    for f in src.iterdir():
        if f.is_file() and not (f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json"
                                or f.name.endswith(".bin")):
            shutil.copy2(f, dst / f.name)
