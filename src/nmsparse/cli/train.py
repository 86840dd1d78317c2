"""``nmsparse train``: train a dense or N:M sparse network from scratch (see docs/training.md).

Every :class:`~nmsparse.training.config.TrainConfig` field is a flag. Arguments are validated before
anything is written: an invalid one prints one line on stderr and exits with code 2.
Under ``torchrun --nproc_per_node=K -m nmsparse train ...`` training uses DDP over K processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nmsparse.plumbing import progress
from nmsparse.cli.help import HelpFormatter, fail
from nmsparse.masking.layout import LAYOUTS
from nmsparse.surgery.parametrization import METHODS
from nmsparse.training.config import MASK_METHODS, OPTIMIZERS, TrainConfig
from nmsparse.training.data import DATASETS, DEFAULT_DIR
from nmsparse.training.models import model_names

_D = TrainConfig()


def _opt_int(text: str) -> int | None:
    return None if text.lower() in ("none", "all", "") else int(text)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a dense or N:M sparse network from scratch (Fashion-MNIST, digits)",
        description="Train a network from scratch, dense or N:M sparse (N weights kept in every group of M), "
                    "writing config.json, metrics.jsonl, checkpoint.pt and final.safetensors into --out. "
                    "Run under 'torchrun --nproc_per_node=K -m nmsparse train ...' for DDP.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=_D.model, help=f"architecture: {', '.join(model_names())}")
    g.add_argument("--data", default=_D.data, help=f"dataset: {', '.join(DATASETS)} (digits: scikit-learn's, for smoke runs)")
    g.add_argument("--data-dir", default=None,
                   help=f"folder of the Fashion-MNIST IDX files (.gz or plain); default $NMSPARSE_DATA or {DEFAULT_DIR}")
    g.add_argument("--train-subset", type=_opt_int, default=None, metavar="K",
                   help="use only the first K training images (quick runs)")
    g.add_argument("--test-subset", type=_opt_int, default=None, metavar="K",
                   help="use only the first K test images")

    g = p.add_argument_group("sparsity")
    g.add_argument("--nm", default=_D.nm,
                   help="N:M sparsity, N weights kept per group of M (e.g. 2:4, 1:16), or 'dense'")
    g.add_argument("--method", default=_D.method,
                   help=f"{', '.join(METHODS)}: straight-through, sparse-refined STE (adds --decay * pruned "
                        "weights to their gradient), or a mask frozen at initialisation")
    g.add_argument("--decay", type=float, default=_D.decay,
                   help="SR-STE lambda_w: decay applied to pruned weights (negative values amplify mask flips)")
    g.add_argument("--layout", default=_D.layout,
                   help=f"conv weight grouping, {' or '.join(LAYOUTS)}: along input channels at each kernel "
                        "position, or along the flattened in*kh*kw axis")
    g.add_argument("--transposable", action="store_true",
                   help="transposable masks: N:M along both input and output axes (Hubara et al. 2021)")
    g.add_argument("--mask-method", default=_D.mask_method,
                   help=f"transposable mask solver: {', '.join(MASK_METHODS)} (2-approximation or min-cost flow)")
    g.add_argument("--update-every", type=int, default=_D.update_every, metavar="K",
                   help="recompute masks every K training steps (1 = every step; Hubara et al. use 40)")
    g.add_argument("--sad-nm", default=None,
                   help="for --nm dense: the N:M at which SAD of the dense weights' magnitude masks is tracked "
                        "(default 2:4)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default=_D.optimizer, help=f"{', '.join(OPTIMIZERS)} (SGD with momentum or AdamW)")
    g.add_argument("--lr", type=float, default=_D.lr, help="peak learning rate (after warm-up, before the cosine decay)")
    g.add_argument("--momentum", type=float, default=_D.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=_D.weight_decay, help="weight decay (all parameters)")
    g.add_argument("--warmup-epochs", type=float, default=_D.warmup_epochs,
                   help="epochs of linear LR warm-up, then cosine decay to 0 (both per step)")
    g.add_argument("--epochs", type=int, default=_D.epochs, help="training epochs")
    g.add_argument("--batch-size", type=int, default=_D.batch_size,
                   help="global batch size (split evenly over DDP processes)")
    g.add_argument("--seed", type=int, default=_D.seed, help="seed of initialisation and data order")

    g = p.add_argument_group("run")
    g.add_argument("--threads", type=_opt_int, default=None,
                   help="CPU threads for torch and numba (default: torch's choice)")
    g.add_argument("--device", default=_D.device, help="cpu, cuda, cuda:K or auto")
    g.add_argument("--out", default=_D.out, help="output folder")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint.pt (starts fresh if there is none; a "
                        "damaged checkpoint or one made with other settings is an error, nothing is changed)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --out (without it, a folder holding a run is an error)")
    progress.add_argument(g, "progress of each epoch (the per-epoch summary line on stdout stays)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters and optimizer state with FSDP2 instead of DDP; "
                        "the checkpoint's model and optimizer go to checkpoint.dcp/ (docs/distributed.md)")
    g.add_argument("--fsdp-masks", choices=("local", "gathered"), default="local",
                   help="with --fsdp: each rank computes the masks of its own rows and FSDP2 gathers E * W "
                        "(local, default), or every rank computes every mask from the gathered weight (gathered; "
                        "needed when a rank's rows would split transposable tiles)")
    p.set_defaults(func=_main)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=args.model, data=args.data, data_dir=args.data_dir, nm=args.nm, method=args.method,
        decay=args.decay, layout=args.layout, transposable=args.transposable, mask_method=args.mask_method,
        update_every=args.update_every, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, epochs=args.epochs,
        batch_size=args.batch_size, seed=args.seed, threads=args.threads, train_subset=args.train_subset,
        test_subset=args.test_subset, sad_nm=args.sad_nm, device=args.device, out=args.out,
        fsdp=args.fsdp, fsdp_masks=args.fsdp_masks,
    )


def _error(msg: str) -> int:
    return fail("train", msg)


def _main(args: argparse.Namespace) -> int:
    from nmsparse.training.data import DataError

    config = config_from_args(args)
    try:
        config.validate()
        mode = progress.from_args(args)
    except ValueError as e:
        return _error(str(e))
    if (not args.resume and not args.overwrite and (Path(config.out) / "checkpoint.pt").exists()):
        return _error(f"{config.out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    from nmsparse.training.loop import train

    from nmsparse.plumbing.checksum import cli_notes

    try:
        with cli_notes("nmsparse train"):
            train(config, resume=args.resume, progress=mode)
    except DataError as e:
        return _error(str(e))
    except ValueError as e:  # settings that only the data or a checkpoint can reveal (LoadError included)
        return _error(str(e))
    return 0
