"""Prune a ``transformers`` model saved on disk to N:M block by block, never holding it whole.

:func:`prune_pretrained` reads a ``save_pretrained`` folder through :class:`~nmsparse.prune.streaming.BlockStream`:
the calibration batches are run through the embeddings once, then for each block in order the block is
loaded from the (memory-mapped) safetensors file, pruned by :func:`nmsparse.prune` exactly as whole-model
pruning would prune it (each layer's calibration inputs come from the already-pruned model, query/key/value
share one pass, padded tokens are left out), run once more to give the next block its inputs, written to
its own shard of the output folder and dropped. Peak memory is one block, the calibration hidden states of
one block boundary, and the Gram matrices of the layers being pruned, plus the shell (embeddings and head).

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
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from nmsparse.progress import Progress
from nmsparse.prune import PruneReport, calibration, prune
from nmsparse.prune.streaming import BlockStream, run_block
from nmsparse.selection import KEEP_DENSE, Patterns, literal_pattern, plan

OUTSIDE = "outside the transformer blocks (block-wise pruning prunes the blocks only)"


class _Runner(nn.Module):
    """Calls a block with recorded keyword arguments. Calibration items are
    ``{"attention_mask": 2-D token mask or absent, "block_kwargs": {...}}``: the token mask is where
    :mod:`nmsparse.prune.calibration` looks for padding, the block gets its own arguments."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, block_kwargs: dict[str, Any], attention_mask: torch.Tensor | None = None) -> Any:
        return self.block(**block_kwargs)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux: ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prune_pretrained(
    path: str | os.PathLike,
    out: str | os.PathLike,
    n: int,
    m: int,
    *,
    method: str,
    calib: Iterable,
    model_class: Any = None,
    include: Patterns = None,
    exclude: Patterns = None,
    keep_dense: Iterable[str] = KEEP_DENSE,
    dtype: torch.dtype | None = None,
    progress: bool | str = False,
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
    """
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder: choose a new output folder")
    calib = calibration.prepare(calib)
    if calib is None:
        raise ValueError("block-wise pruning needs calibration data: batches of token ids or tokenizer outputs")
    t_start = time.perf_counter()
    stream = BlockStream(path, model_class, dtype)
    entries = plan(stream.skeleton, n, m, include=include, exclude=exclude, keep_dense=keep_dense,
                   layout=options.get("layout", "channels"))
    for e in entries:
        if e.sparse and not e.name.startswith(stream.prefix):
            e.sparse, e.reason = False, OUTSIDE
    masks = [_token_mask(item) for item in calib]
    hidden = stream.block_inputs(calib)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    results, blocks_info, weight_map = {}, [], {}
    total = stream.num_blocks + 1
    name_of = lambda i: f"model-{i + 1:05d}-of-{total:05d}.safetensors"  # noqa: E731
    try:
        from safetensors.torch import save_file

        bar = Progress(stream.num_blocks, f"prune {n}:{m} {method} block by block", mode=progress, unit="block",
                       leave=True)
        for i in range(stream.num_blocks):
            t0 = time.perf_counter()
            block = stream.load_block(i)
            pre = f"{stream.prefix}{i}."
            local = [e.name[len(pre):] for e in entries if e.sparse and e.name.startswith(pre)]
            if local:
                items = [{"block_kwargs": kw, **({"attention_mask": tm} if tm is not None else {})}
                         for kw, tm in zip(hidden, masks)]
                rep = prune(_Runner(block), n, m, method=method, calib=items, keep_dense=(),
                            include=[literal_pattern(f"block.{x}") for x in local], **options)
                for r in rep.results.values():
                    r.param = pre + r.param[len("block."):]
                    results[r.param] = r
            run_block(block, hidden)  # eval mode: prune() restored the runner's (training) mode
            state = {pre + k: v.contiguous() for k, v in block.state_dict().items()}
            save_file(state, tmp / name_of(i), metadata={"format": "pt"})
            weight_map.update({k: name_of(i) for k in state})
            del block, state
            blocks_info.append({"block": i, "layers": len(local), "time_s": time.perf_counter() - t0,
                                "peak_rss_bytes": peak_rss_bytes()})
            bar.update(1)
        bar.close()
        shell = {k: v.contiguous() for k, v in stream.shell_state().items()}
        save_file(shell, tmp / name_of(stream.num_blocks), metadata={"format": "pt"})
        weight_map.update({k: name_of(stream.num_blocks) for k in shell})
        size = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        _copy_side_files(Path(path), tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    settings = dict(method=method, blockwise=True, source=str(path), blocks=blocks_info,
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
