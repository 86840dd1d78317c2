"""``nmsparse prune --hf-model FOLDER``: prune a ``transformers`` model block by block from its folder.

    nmsparse prune --hf-model llama/ --calib-text corpus.txt --calib-samples 128 --seqlen 512 \\
        --nm 2:4 --method sparsegpt --eval-perplexity test.txt --out llama-2of4/

The model is streamed from its safetensors files one block at a time (:mod:`nmsparse.pruning.blockwise`),
so it need not fit in memory. Calibration: ``--calib-samples`` windows of ``--seqlen`` tokens drawn at
random (``--seed``) from the tokenized ``--calib-text``, as SparseGPT draws from C4. ``--out`` becomes a
``save_pretrained`` folder (loadable with ``from_pretrained``) plus ``prune_report.json`` / ``.txt``;
with ``--eval-perplexity`` the report holds the perplexity of the dense and the pruned model on the
non-overlapping windows of that text.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from nmsparse.cli.help import fail
from nmsparse.masking.pattern import NMPattern
from nmsparse.plumbing import progress

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# flags of the image-model path that mean nothing for a transformers folder
IMAGE_ONLY = ("checkpoint", "model", "data", "data_dir", "recalibrate_bn", "bn_samples", "finetune_optimizer",
              "finetune_lr", "finetune_weight_decay", "finetune_momentum", "train_subset", "test_subset")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("transformers models, pruned block by block from their folder")
    g.add_argument("--hf-model", default=None,
                   help="a save_pretrained folder of a causal LM (safetensors); replaces --checkpoint")
    g.add_argument("--calib-text", default=None, help="text file the calibration windows are drawn from")
    g.add_argument("--seqlen", type=int, default=512, help="tokens per calibration / evaluation window")
    g.add_argument("--calib-batch", type=int, default=8, help="calibration windows per forward pass")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the --hf-model folder)")
    g.add_argument("--dtype", default=None, help="compute dtype fp32, bf16 or fp16 (default: the checkpoint's)")
    g.add_argument("--eval-perplexity", default=None, help="text file: perplexity of the dense and pruned model")
    g.add_argument("--eval-windows", type=int, default=None, help="score at most K windows of --eval-perplexity")
    g.add_argument("--blocks", type=int, default=None,
                   help="prune the first K blocks only, copy the rest unchanged (to measure part of a large model)")
    g.add_argument("--block-log", default=None,
                   help="file to append one JSON line to after each block (seconds, CPU seconds, memory)")


def _error(msg: str) -> int:
    return fail("prune", msg)


def _tokens(tok, path: str, limit: int | None = None, chunk_chars: int = 200_000) -> torch.Tensor:
    """Token ids of a text file (1-D), tokenized a chunk of lines at a time so that memory stays small
    whatever the file's size; stops after ``limit`` tokens when given."""
    parts: list[torch.Tensor] = []
    count, buf, size = 0, [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= chunk_chars:
                parts.append(_ids(tok, "".join(buf)))
                count += parts[-1].numel()
                buf, size = [], 0
                if limit is not None and count >= limit:
                    break
        else:
            if buf:
                parts.append(_ids(tok, "".join(buf)))
    ids = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return ids[:limit] if limit is not None else ids


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def _block_logger(path: str | None):
    if path is None:
        return None

    def log(info: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({**info, "load": os.getloadavg()}) + "\n")
    return log


def run(args: argparse.Namespace, pattern: NMPattern) -> int:
    """The ``--hf-model`` path of ``nmsparse prune`` (arguments already checked by the caller:
    ``--nm`` (``pattern``), ``--method``, ``--solver`` and the positive integers)."""
    n, m = pattern
    given = [f"--{k.replace('_', '-')}" for k in IMAGE_ONLY if getattr(args, k, None) not in (None, False)]
    if args.finetune_epochs:
        given.append("--finetune-epochs")
    if getattr(args, "permute", False):
        given.append("--permute")
    if given:
        return _error(f"{', '.join(given)}: only for models from 'nmsparse train' (--checkpoint); block-wise "
                      "pruning of a --hf-model folder takes none")
    src = Path(args.hf_model)
    if not (src / "config.json").is_file():
        return _error(f"--hf-model {src} is not a save_pretrained folder (no config.json)")
    if not args.calib_text or not Path(args.calib_text).is_file():
        return _error("--hf-model needs --calib-text FILE, a text file to draw calibration windows from")
    if args.eval_perplexity and not Path(args.eval_perplexity).is_file():
        return _error(f"--eval-perplexity {args.eval_perplexity} is not a file")
    for name in ("seqlen", "calib_batch", "eval_windows", "blocks"):
        v = getattr(args, name)
        if v is not None and v < (2 if name == "seqlen" else 1):
            return _error(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.dtype is not None and args.dtype not in DTYPES:
        return _error(f"unknown --dtype {args.dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(args.out)
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        return _error(f"--out {out} would replace the --hf-model folder itself: choose another output folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        return _error(f"{out} is not empty; pass --overwrite to replace it")
    try:
        limit = json.loads((src / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        limit = None
    if isinstance(limit, int) and args.seqlen > limit:
        return _error(f"--seqlen {args.seqlen} is longer than the model's max_position_embeddings ({limit})")
    try:
        mode = progress.from_args(args)
    except ValueError as e:
        return _error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from nmsparse.pruning.blockwise import prune_pretrained
    from nmsparse.pruning.perplexity import perplexity

    try:
        tok = AutoTokenizer.from_pretrained(args.tokenizer or src, local_files_only=True)
    except (OSError, ValueError) as e:
        return _error(f"no tokenizer in {args.tokenizer or src} (pass --tokenizer FOLDER): {str(e).splitlines()[0]}")
    ids = _tokens(tok, args.calib_text)
    if ids.numel() <= args.seqlen:
        return _error(f"--calib-text has {ids.numel()} tokens, not more than --seqlen {args.seqlen}")
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, ids.numel() - args.seqlen, (args.calib_samples,), generator=g)
    windows = torch.stack([ids[s:s + args.seqlen] for s in starts.tolist()])
    calib = [windows[i:i + args.calib_batch] for i in range(0, len(windows), args.calib_batch)]
    dtype = DTYPES[args.dtype] if args.dtype else None
    eval_ids = None
    if args.eval_perplexity:
        eval_ids = _tokens(tok, args.eval_perplexity,
                           limit=args.eval_windows * args.seqlen if args.eval_windows else None)
    from nmsparse.cli.prune_flags import keep_dense_list, method_options

    kwargs = dict(method=args.method, calib=calib, include=args.include, exclude=args.exclude,
                  keep_dense=keep_dense_list(args.keep_dense), transposable=args.transposable, **method_options(args),
                  transposable_method=args.mask_method, seed=args.seed, dtype=dtype, progress=mode,
                  blocks=args.blocks, on_block=_block_logger(args.block_log))
    out_existed = out.exists()
    replace = out_existed and any(out.iterdir())  # --overwrite: write beside it, swap at the end
    if replace:  # a hidden name that the next run removes if this one is killed
        from nmsparse.plumbing.writing import remove_stale, temp_path

        remove_stale(out.parent)
    target = temp_path(out, folder=True) if replace else out
    summary: dict = {"hf_model": str(src), "nm": f"{n}:{m}", "method": args.method, "seqlen": args.seqlen,
                     "calib_samples": len(windows), "calib_text": args.calib_text}
    try:
        if eval_ids is not None:
            summary["dense_perplexity"] = perplexity(src, eval_ids, seqlen=args.seqlen, dtype=dtype)
        t0 = time.perf_counter()
        report = prune_pretrained(src, target, pattern, **kwargs)
        summary["prune_s"] = time.perf_counter() - t0
        if eval_ids is not None:
            summary["pruned_perplexity"] = perplexity(target, eval_ids, seqlen=args.seqlen, dtype=dtype)
    except (ValueError, ImportError) as e:
        if replace or not out_existed:
            shutil.rmtree(target, ignore_errors=True)
        from nmsparse.plumbing.errors import WriteError

        if isinstance(e, WriteError) and target != out and e.path.startswith(str(target)):
            e = WriteError(str(out) + e.path[len(str(target)):], e.cause, e.errno)  # the user's --out
        return _error(str(e))
    if replace:
        shutil.rmtree(out)
        os.replace(target, out)
    summary["peak_rss_bytes"] = report.settings["peak_rss_bytes"]
    full = {"summary": summary, "report": report.to_dict()}
    from nmsparse.plumbing.writing import write_text  # whole or not at all; WriteError naming the file

    write_text(out / "prune_report.json", json.dumps(full, indent=2, default=str) + "\n")
    write_text(out / "prune_report.txt", report.table() + "\n" + json.dumps(summary, indent=2) + "\n")
    print(report.table())
    if eval_ids is not None:
        print(f"perplexity ({summary['pruned_perplexity']['windows']} windows of {args.seqlen}): dense "
              f"{summary['dense_perplexity']['perplexity']:.2f}, pruned {n}:{m} {args.method} "
              f"{summary['pruned_perplexity']['perplexity']:.2f}")
    print(f"peak resident memory {report.settings['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"(weights on disk {report.settings['checkpoint_bytes'] / 2**30:.2f} GiB); outputs in {out}")
    return 0
