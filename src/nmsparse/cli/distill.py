"""``nmsparse distill``: recover an N:M transformers model by distillation from its dense original.

    nmsparse distill --student pruned/ --teacher dense/ --text corpus.txt --nm 2:4 --steps 1000 --out recovered/

``--student``: a ``save_pretrained`` folder of the pruned model (plain weights holding the zeros, as
``nmsparse prune --hf-model`` writes; its masks are taken from them), or of a sparsified one (its
recorded settings are used, ``--nm`` must then be left out). ``--teacher``: the dense model's folder
(its tokenizer is used). ``--text``: UTF-8 text, one training text per non-empty line (unlabelled).
``--out`` gets ``checkpoint.pt`` (every ``--checkpoint-every`` steps; ``--resume`` continues from it),
``metrics.jsonl``, ``final.safetensors`` and ``model/``: the finalized N:M student and the tokenizer,
a ``save_pretrained`` folder that any ``from_pretrained`` loads.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nmsparse.plumbing import progress
from nmsparse.cli.help import HelpFormatter, fail
from nmsparse.distillation.losses import OUTPUT_LOSSES

CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSequenceClassification")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="recover an N:M transformers model by distillation from its dense original",
                       description=" ".join(" ".join(__doc__.split("\n\n")[i].split()) for i in (0, 2)).replace("``", ""),
                       formatter_class=HelpFormatter)
    p.add_argument("--student", required=True, help="save_pretrained folder of the pruned (or sparsified) model")
    p.add_argument("--teacher", required=True, help="save_pretrained folder of the dense model (and its tokenizer)")
    p.add_argument("--text", required=True, help="UTF-8 text file, one training text per non-empty line")
    p.add_argument("--model-class", default="AutoModel", choices=CLASSES,
                   help="transformers class both are loaded with (its output is distilled: hidden states or logits)")
    p.add_argument("--nm", default=None, help="N:M of a pruned --student (N kept per group of M), e.g. 2:4")
    p.add_argument("--method", default="fixed", choices=("fixed", "srste"),
                   help="fixed: the student's masks stay; srste: SR-STE from them")
    p.add_argument("--include", default=None, help="comma-separated module patterns to make N:M (e.g. 'encoder.*')")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=16, help="texts per step")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (longer ones are cut)")
    p.add_argument("--output-loss", default="auto", choices=OUTPUT_LOSSES,
                   help="loss on the final output (auto: kl for logits, cosine of mean-pooled hidden states)")
    p.add_argument("--hidden-weight", type=float, default=1.0, help="weight of every block's hidden-state loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint-every", type=int, default=200, metavar="K")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    progress.add_argument(p, "progress bar of the steps")
    p.set_defaults(func=_main)


def _error(msg: str) -> int:
    return fail("distill", msg)


def read_texts(path: str) -> list[str]:
    """The non-empty lines of a UTF-8 file, stripped (``ValueError`` naming the file otherwise)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --text {path}: {getattr(e, 'strerror', None) or e}") from e
    texts = [s.strip() for s in lines if s.strip()]
    if not texts:
        raise ValueError(f"--text {path} holds no text (no non-empty line)")
    return texts


def token_batches(tok, texts: list[str], size: int, max_length: int) -> list[dict]:
    """Tokenized batches of ``size`` texts, sorted by length so that padding stays small."""
    order = sorted(texts, key=len)
    return [dict(tok(order[i:i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
            for i in range(0, len(order), size)]


def _main(args: argparse.Namespace) -> int:
    for name in ("steps", "batch_size", "max_length", "checkpoint_every"):
        if getattr(args, name) < 1:
            return _error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for flag in ("student", "teacher"):
        if not (Path(getattr(args, flag)) / "config.json").is_file():
            return _error(f"--{flag} {getattr(args, flag)} is not a save_pretrained folder (no config.json)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _error(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (args.resume or args.overwrite):
        return _error(f"{out} is not empty; pass --resume to continue its run or --overwrite to replace it")
    try:
        mode = progress.from_args(args)
        texts = read_texts(args.text)
        nm = None
        if args.nm is not None:
            from nmsparse.training.config import parse_nm

            nm = parse_nm(args.nm)
            if nm is None:
                raise ValueError("--nm dense: the student must be N:M, e.g. --nm 2:4")
    except ValueError as e:
        return _error(str(e))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from nmsparse.distillation.loop import distill
    from nmsparse.integrations import hf

    cls = getattr(transformers, args.model_class)
    try:
        sparsified = isinstance(getattr(transformers.AutoConfig.from_pretrained(args.student, local_files_only=True),
                                        hf.CONFIG_KEY, None), dict)
        if sparsified and nm is not None:
            return _error(f"--student {args.student} is sparsified already (its config records its N:M): "
                          "leave out --nm")
        if not sparsified and nm is None:
            return _error("--student holds plain weights: pass --nm N:M (its masks are taken from its weights)")
        if mode != "bar":
            transformers.utils.logging.disable_progress_bar()
        tok = transformers.AutoTokenizer.from_pretrained(args.teacher, local_files_only=True)
        teacher = cls.from_pretrained(args.teacher, local_files_only=True).eval()
        student = (hf.from_pretrained(cls, args.student) if sparsified
                   else cls.from_pretrained(args.student, local_files_only=True))
        select = None if sparsified else dict(include=[s for s in (args.include or "").split(",") if s] or None,
                                              keep_dense=() if args.include else ("embeddings*", "*pooler*",
                                                                                  "lm_head", "classifier*"))
        batches = token_batches(tok, texts, args.batch_size, args.max_length)
        log = print if mode == "lines" else None
        report = distill(student, teacher, batches, steps=args.steps, lr=args.lr, nm=nm, method=args.method,
                         select=select, output_loss=args.output_loss, hidden_weight=args.hidden_weight,
                         seed=args.seed, out=out, resume=args.resume, checkpoint_every=args.checkpoint_every,
                         progress=mode, log=log)
    except (ValueError, OSError) as e:  # LoadError included
        return _error(str(e).splitlines()[0])
    if hf.CONFIG_KEY in student.config.to_dict():
        delattr(student.config, hf.CONFIG_KEY)  # finalized: plain weights, nothing to record
    student.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    last = report.records[-1] if report.records else {}
    print(f"distilled {report.layers} N:M layers for {report.steps} steps (loss {last.get('loss', float('nan')):.5f}); "
          f"masks {'unchanged' if report.masks_unchanged else 'N:M throughout'}; model in {out / 'model'}")
    return 0
