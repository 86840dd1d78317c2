"""``nmsparse prune``: convert a trained checkpoint to N:M in one shot, optionally fine-tune with frozen masks.

    nmsparse prune --checkpoint run/final.safetensors --model resnet --nm 2:4 --method adaprune \\
        --calib-samples 100 --out runs/pruned [--finetune-epochs K]

Writes into ``--out`` the same files as ``nmsparse train`` (``config.json``, ``metrics.jsonl``,
``final.safetensors``; with ``--finetune-epochs`` also ``checkpoint.pt``) plus ``prune_report.json``
and ``prune_report.txt`` (per layer: kept fraction of |w|, reconstruction error before/after, time;
test accuracy of the dense, pruned and fine-tuned model). Calibration samples are drawn from the
training set, balanced over classes (the AdaPrune paper uses about one per class).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nmsparse.plumbing import progress
from nmsparse.cli.help import HelpFormatter, fail
from nmsparse.plumbing.io import state_dict_mismatch
from nmsparse.masking.layout import LAYOUTS
from nmsparse.cli import prune_hf as hf_cli
from nmsparse.cli.prune_flags import keep_dense_list, method_flag_error, method_options
from nmsparse.plumbing.writing import write_text
from nmsparse.training.recipe import finetune_recipe

FINETUNE_FLAGS = ("finetune_optimizer", "finetune_lr", "finetune_weight_decay", "finetune_momentum")

EPILOG = ("Fine-tuning (--finetune-epochs K) freezes the pruned support: nmsparse.sparsify(model, method='fixed'). "
          "By default it uses the optimizer, weight decay and momentum of the run that wrote the checkpoint, at a "
          "tenth of its peak learning rate, cosine to zero, no warm-up; with another --finetune-optimizer, or a "
          "checkpoint that records no training config: SGD at 0.01 (momentum 0.9) or AdamW at 1e-4, weight "
          "decay 5e-5. The --finetune-* flags override each value.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from nmsparse.pruning import METHODS, SOLVERS

    p = sub.add_parser(
        "prune",
        help="convert a trained checkpoint to N:M (magnitude, Wanda, SparseGPT, AdaPrune), optionally fine-tune",
        description="Prune a trained model (final.safetensors of 'nmsparse train') to N:M, N weights kept in "
                    "every group of M, layer by layer with a small calibration set; optionally fine-tune with "
                    "frozen masks. Writes the outputs of 'nmsparse train' plus prune_report.json/.txt into --out.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", default=None,
                   help="final.safetensors written by 'nmsparse train' (or --hf-model for a transformers folder)")
    p.add_argument("--model", default=None, help="architecture (default: the one recorded in the checkpoint)")
    p.add_argument("--data", default=None, help="dataset (default: the checkpoint's, else fashion-mnist)")
    p.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--nm", default="2:4", help="N:M, N weights kept per group of M")
    p.add_argument("--method", default="adaprune", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--solver", default=None, help=f"AdaPrune solver: {', '.join(SOLVERS)} (default exact)")
    p.add_argument("--transposable", action="store_true", help="transposable N:M masks (N:M along both axes)")
    p.add_argument("--mask-method", default=None, help="transposable mask solver (optimal or approx)")
    p.add_argument("--permute", action="store_true",
                   help="reorder channels first (function-preserving) so the N:M masks keep more; see docs/permute.md")
    p.add_argument("--layout", default=None, help=f"conv grouping, {' or '.join(LAYOUTS)} (default: checkpoint's)")
    p.add_argument("--keep-dense", default="first,last", help="'first,last', 'first', 'last' or 'none'")
    p.add_argument("--include", action="append", default=None, help="module-name pattern to prune (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="module-name pattern to keep dense (repeatable)")
    p.add_argument("--calib-samples", type=int, default=100, help="calibration images from the training set")
    p.add_argument("--iterations", type=int, default=None,
                   help="Adam iterations per layer (--solver adam; default 1000)")
    p.add_argument("--adam-batch", type=int, default=None, help="calibration samples per Adam step (default 50)")
    p.add_argument("--damp", type=float, default=None,
                   help="ridge / Hessian dampening, relative to mean diag(X^T X) (sparsegpt, adaprune exact; "
                        "default 0.01)")
    p.add_argument("--recalibrate-bn", action="store_true",
                   help="re-estimate batch-norm statistics after pruning (on the calibration images, or --bn-samples)")
    p.add_argument("--bn-samples", type=int, default=None,
                   help="training images (balanced, no labels used) for --recalibrate-bn; default: the calibration "
                        "images. Batch-norm statistics need more images than the refit: re-estimated on 10 they "
                        "can be worse than the stale ones")
    p.add_argument("--finetune-epochs", type=int, default=0, help="epochs of fixed-mask fine-tuning after pruning")
    p.add_argument("--finetune-optimizer", default=None,
                   help="sgd or adamw; if not given: the checkpoint's training optimizer")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="fine-tuning peak learning rate, cosine to zero; if not given: a tenth of the checkpoint's")
    p.add_argument("--finetune-weight-decay", type=float, default=None,
                   help="fine-tuning weight decay; if not given: the checkpoint's")
    p.add_argument("--finetune-momentum", type=float, default=None,
                   help="SGD momentum of the fine-tuning; if not given: the checkpoint's")
    p.add_argument("--batch-size", type=int, default=128, help="fine-tuning batch size")
    p.add_argument("--train-subset", type=int, default=None, help="fine-tune on the first K training images only")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first K test images only")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw, Adam and fine-tuning")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:K")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    progress.add_argument(p, "progress of the pruning (over layers or blocks) and of fine-tuning epochs")
    hf_cli.add_arguments(p)
    p.set_defaults(func=_main)


def _error(msg: str) -> int:
    return fail("prune", msg)


CHECKPOINT_HINT = "pass the final.safetensors written by 'nmsparse train' or 'nmsparse prune'"


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and the training config recorded in a final.safetensors (``{}`` if none).

    Raises :class:`nmsparse.plumbing.errors.LoadError` for a file that is missing, a directory, empty,
    truncated, corrupted, not safetensors, or whose recorded config is not a JSON object.
    """
    from nmsparse.plumbing.errors import LoadError
    from nmsparse.plumbing.io import read_safetensors

    try:
        tensors, meta = read_safetensors(path)
    except LoadError as e:
        raise (e if e.hint else e.with_hint(CHECKPOINT_HINT)) from e
    if "config" not in meta:
        return tensors, {}
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise LoadError(path, f"its recorded training config (metadata 'config') is not valid JSON ({e.msg})",
                        "the file is damaged: write it again, or pass a good copy") from e
    if not isinstance(config, dict):
        raise LoadError(path, f"its recorded training config (metadata 'config') is a {type(config).__name__}, "
                              "not a JSON object", "the file is damaged: write it again, or pass a good copy")
    return tensors, config


def balanced_indices(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """``k`` training indices spread evenly over the classes (seeded), in a fixed order."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    classes = sorted(set(labels.tolist()))
    per = [k // len(classes) + (1 if i < k % len(classes) else 0) for i in range(len(classes))]
    chosen = []
    for c, q in zip(classes, per):
        chosen.append(perm[labels[perm] == c][:q])
    return torch.cat(chosen).sort().values


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> dict:
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    for s in range(0, len(y), batch):
        logits = model(x[s:s + batch])
        loss += float(torch.nn.functional.cross_entropy(logits, y[s:s + batch], reduction="sum"))
        correct += int((logits.argmax(1) == y[s:s + batch]).sum())
    model.train(was)
    return {"test_acc": correct / max(len(y), 1), "test_loss": loss / max(len(y), 1)}


def support_mask(weight: torch.Tensor) -> torch.Tensor:
    """The frozen fine-tuning mask: exactly the weights pruning kept (valid N:M, and transposable
    when the pruning was)."""
    return weight.detach() != 0


def _main(args: argparse.Namespace) -> int:
    from nmsparse.plumbing.checksum import cli_notes
    from nmsparse.plumbing.errors import WriteError

    try:
        with cli_notes("nmsparse prune"):
            return _run(args)
    except WriteError as e:  # disk full, read-only, no permission: the user's path and the cause
        return _error(str(e))


def _run(args: argparse.Namespace) -> int:
    from nmsparse.masking.nm import check_nm
    from nmsparse.pruning import METHODS, SOLVERS

    parts = args.nm.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        return _error(f"--nm must look like 2:4 (N:M with whole numbers, N weights kept per group of M), got {args.nm!r}")
    try:
        pattern = check_nm(int(parts[0]), int(parts[1]))
    except ValueError:
        return _error(f"--nm {args.nm}: need 0 < N < M (N weights kept per group of M), e.g. 2:4")
    n, m = pattern
    if args.method not in METHODS:
        return _error(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.solver is not None and args.solver not in SOLVERS:
        return _error(f"unknown --solver {args.solver!r}; choose one of {', '.join(SOLVERS)}")
    bad = method_flag_error(args)
    if bad:
        return _error(bad)
    for name in ("calib_samples", "iterations", "adam_batch", "batch_size", "bn_samples"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "iterations" else 1):
            return _error(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.bn_samples is not None and not args.recalibrate_bn:
        return _error("--bn-samples sets the images of --recalibrate-bn; pass --recalibrate-bn too")
    if args.finetune_epochs < 0:
        return _error(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    given = [f"--{k.replace('_', '-')}" for k in FINETUNE_FLAGS if getattr(args, k) is not None]
    if given and not args.finetune_epochs:
        return _error(f"{', '.join(given)} set the fine-tuning; pass --finetune-epochs K too")
    if args.hf_model:
        return hf_cli.run(args, pattern)
    if getattr(args, "blocks", None) is not None:
        return _error("--blocks is for --hf-model folders (block-wise pruning) only")
    if args.checkpoint is None:
        return _error("pass --checkpoint (final.safetensors of 'nmsparse train') or --hf-model (a transformers folder)")
    if not Path(args.checkpoint).exists():
        return _error(f"checkpoint {args.checkpoint!r} not found (expected final.safetensors of 'nmsparse train')")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        return _error(f"{out} is not empty; pass --overwrite to replace it")
    if args.threads:
        torch.set_num_threads(args.threads)

    from nmsparse.training.data import DataError, load_dataset
    from nmsparse.training.models import build_model, model_names

    try:
        mode = progress.from_args(args)
        tensors, src = read_checkpoint(args.checkpoint)
    except ValueError as e:  # LoadError included: one line naming the file and the problem
        return _error(str(e))
    if args.finetune_epochs:
        try:
            recipe = finetune_recipe(src, **{k[len("finetune_"):]: getattr(args, k) for k in FINETUNE_FLAGS})
        except ValueError as e:
            return _error(str(e))
    model_name = args.model or src.get("model")
    if model_name is None:
        return _error("the checkpoint records no model; pass --model")
    if model_name not in model_names():
        return _error(f"unknown --model {model_name!r}; choose one of {', '.join(model_names())}")
    data_name = args.data or src.get("data") or "fashion-mnist"
    layout = args.layout or src.get("layout") or "channels"
    if layout not in LAYOUTS:
        return _error(f"unknown --layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    try:
        data = load_dataset(data_name, args.data_dir or src.get("data_dir"), train_subset=args.train_subset,
                            test_subset=args.test_subset)
    except (DataError, ValueError) as e:
        return _error(str(e))
    model = build_model(model_name, image_size=data.image_size, in_channels=data.in_channels,
                        num_classes=data.num_classes)
    why = state_dict_mismatch(model.state_dict(), tensors)  # checked before the model is touched
    if why:
        recorded = f"; it records model {src['model']!r} on {src.get('data')!r}" if "model" in src else ""
        return _error(f"cannot load {args.checkpoint}: does not fit model {model_name!r} on {data_name!r} "
                      f"({why}){recorded}; pass the --model and --data it was trained with")
    model.load_state_dict(tensors)
    device = torch.device(args.device)
    model.to(device)
    xte, yte = data.x_test.to(device), data.y_test.to(device)
    dense_eval = evaluate(model, xte, yte)

    def draw(k: int) -> list[torch.Tensor]:  # k balanced training images, in batches of 100
        x = data.x_train[balanced_indices(data.y_train, k, args.seed)].to(device)
        return [x[s:s + 100] for s in range(0, len(x), 100)]

    calib = draw(args.calib_samples)
    from nmsparse.pruning import prune

    keep_dense = keep_dense_list(args.keep_dense)
    kwargs = dict(method=args.method, calib=calib, transposable=args.transposable, layout=layout,
                  include=args.include, exclude=args.exclude, keep_dense=keep_dense,
                  transposable_method=args.mask_method, seed=args.seed, progress=mode, permute=args.permute,
                  **method_options(args))
    t0 = time.perf_counter()
    try:
        report = prune(model, pattern, **kwargs)
    except (ValueError, ImportError) as e:
        return _error(str(e))
    bn_images = 0
    if args.recalibrate_bn:
        from nmsparse.pruning import recalibrate_batchnorm

        bn_calib = calib if args.bn_samples is None else draw(args.bn_samples)
        if recalibrate_batchnorm(model, bn_calib):
            bn_images = sum(len(b) for b in bn_calib)
        else:
            print(f"--recalibrate-bn: {model_name} has no batch-norm layers; nothing to re-estimate")
    prune_s = time.perf_counter() - t0
    pruned_eval = evaluate(model, xte, yte)
    if getattr(report, "permutation", None) is not None:
        print(report.permutation.table())
    print(report.table())
    print(f"test accuracy: dense {dense_eval['test_acc']:.2%}, pruned {n}:{m} {args.method} "
          f"{pruned_eval['test_acc']:.2%} ({prune_s:.1f}s)")

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from nmsparse.plumbing.writing import write_error

        raise write_error(out, e) from e
    summary = {"checkpoint": str(args.checkpoint), "model": model_name, "data": data_name, "nm": f"{n}:{m}",
               "calib_samples": sum(len(b) for b in calib), "bn_samples": bn_images, "prune_s": prune_s, "dense": dense_eval,
               "pruned": pruned_eval,
               "finetuned": None, "finetune_epochs": args.finetune_epochs}
    if args.finetune_epochs:
        summary["finetune_recipe"] = recipe
        ft = _finetune(model, args, model_name, data_name, layout, n, m, report, recipe)
        if ft is None:
            return 2
        summary["finetuned"] = {"test_acc": ft[-1]["test_acc"], "test_loss": ft[-1]["test_loss"]}
    else:
        _write_outputs(model, args, summary, src)
    full = {"summary": summary, "report": report.to_dict()}
    write_text(out / "prune_report.json", json.dumps(full, indent=2) + "\n")
    write_text(out / "prune_report.txt", report.table() + "\n" + json.dumps(summary, indent=2) + "\n")
    if summary["finetuned"]:
        print(f"after {args.finetune_epochs} epoch(s) of fixed-mask fine-tuning: "
              f"{summary['finetuned']['test_acc']:.2%}")
    print(f"outputs in {out}")
    return 0


def _write_outputs(model: torch.nn.Module, args: argparse.Namespace, summary: dict, src: dict) -> None:
    from nmsparse.plumbing.writing import save_safetensors

    out = Path(args.out)
    config = {"source": src, "prune": {k: v for k, v in vars(args).items() if k != "func"}}
    write_text(out / "config.json", json.dumps(config, indent=2, default=str) + "\n")
    rec = {"epoch": 0, "test_loss": summary["pruned"]["test_loss"], "test_acc": summary["pruned"]["test_acc"],
           "time": summary["prune_s"]}
    write_text(out / "metrics.jsonl", json.dumps(rec) + "\n")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps({**src, "model": summary["model"], "data": summary["data"]}),
            "pruned": json.dumps({"nm": summary["nm"], "method": args.method})}
    save_safetensors(out / "final.safetensors", tensors, meta)  # with the checksum nmsparse's readers verify


def _finetune(model, args, model_name, data_name, layout, n, m, report, recipe):
    """Train the pruned model with frozen masks through the training loop; returns its records."""
    from nmsparse.surgery.sparse_model import sparsify
    from nmsparse.training import loop
    from nmsparse.training.config import TrainConfig

    config = TrainConfig(model=model_name, data=data_name, data_dir=args.data_dir, nm=f"{n}:{m}", method="fixed",
                         layout=layout, optimizer=recipe["optimizer"], lr=recipe["lr"],
                         weight_decay=recipe["weight_decay"], momentum=recipe.get("momentum", TrainConfig.momentum),
                         warmup_epochs=0, epochs=args.finetune_epochs,
                         batch_size=args.batch_size, seed=args.seed, threads=args.threads,
                         train_subset=args.train_subset, test_subset=args.test_subset, device=args.device,
                         out=str(args.out))
    try:
        config.validate()
    except ValueError as e:
        _error(str(e))
        return None
    pruned_names = [e.name for e in report.sparse]
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def build(cfg, data):  # a fresh copy of the pruned model, its surviving weights frozen as the masks
        from nmsparse.training.models import build_model

        fresh = build_model(model_name, image_size=data.image_size, in_channels=data.in_channels,
                            num_classes=data.num_classes)
        fresh.load_state_dict(state)
        rep = sparsify(fresh, n, m, method="fixed", layout=layout, include=pruned_names or None,
                                keep_dense=(), mask_fn=support_mask)
        return fresh, rep

    return loop.train(config, resume=False, progress=progress.from_args(args), model_fn=build)
