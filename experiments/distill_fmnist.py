"""Fashion-MNIST ResNet / ViT at 2:4: dense -> one-shot 2:4 -> distilled from the dense model (issue 21, item 3).

1. Train the dense net on all 60,000 training images with the recipe of ``nmsparse train`` /
   ``nmsparse reproduce`` (:class:`nmsparse.training.TrainConfig`'s defaults: ResNet SGD lr 0.1,
   momentum 0.9, weight decay 5e-5, 1 warm-up epoch then cosine, batch 128; the ViT with
   ``reproduce``'s AdamW settings, lr 1e-3, weight decay 0.05), into ``OUT/dense`` (checkpointed every
   epoch: a rerun resumes or reuses it), and evaluate it on all 10,000 test images.
2. One-shot 2:4 copies by magnitude, Wanda and SparseGPT (``--calib`` training images, balanced over
   the classes), with :func:`nmsparse.prune`'s default layer selection; each evaluated.
3. ``nmsparse.distill`` the ``--prune-method`` copy from the dense net on unlabelled training images
   (labels never used): KL of the logits + normalised MSE of every block's output, masks fixed
   (``--method fixed``) or SR-STE from them (``--method srste``), into ``OUT/distill-...`` (checkpointed:
   a rerun resumes, a finished run is reused), then evaluate the finalized student and check every sparse
   weight 2:4 with ``nmsparse.is_nm``.

    python experiments/distill_fmnist.py --model resnet --epochs 8 --steps 938 --lr 5e-4 \\
        --out runs/distill_fmnist --json docs/results/distill_fmnist_resnet.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import nmsparse
from nmsparse.reproduce.grid import VIT_OPTIM
from nmsparse.training import TrainConfig, Trainer
from nmsparse.training.data import load_dataset

N, M = 2, 4
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


class Shuffled(Sequence):
    """``passes`` shuffled passes over ``x`` in batches of ``batch`` (the last partial batch of a pass
    dropped), as a sequence: item ``i`` depends only on ``i`` and ``seed``, so a resumed distillation
    sees the same batches. Images only: the labels are never given to the distillation."""

    def __init__(self, x: torch.Tensor, batch: int, passes: int, seed: int) -> None:
        self.x, self.batch, self.seed = x, batch, seed
        self.per_pass = len(x) // batch
        self.n = self.per_pass * passes
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        p, j = divmod(i, self.per_pass)
        if self._perm is None or self._perm[0] != p:
            g = torch.Generator().manual_seed(self.seed * 7919 + p)
            self._perm = (p, torch.randperm(len(self.x), generator=g))
        return self.x[self._perm[1][j * self.batch:(j + 1) * self.batch]]


@torch.no_grad()
def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy in percent (eval mode; the model's mode is restored)."""
    was = model.training
    model.eval()
    correct = sum(int((model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum()) for s in range(0, len(y), batch))
    model.train(was)
    return 100.0 * correct / len(y)


def balanced(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """``k`` indices spread evenly over the classes (seeded)."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    classes = sorted(set(labels.tolist()))
    per = [k // len(classes) + (i < k % len(classes)) for i in range(len(classes))]
    return torch.cat([perm[labels[perm] == c][:q] for c, q in zip(classes, per)]).sort().values


def dense_config(args: argparse.Namespace) -> TrainConfig:
    """The run of ``nmsparse train --model MODEL --nm dense`` with reproduce's optimizer settings."""
    fields = dict(model=args.model, nm="dense", epochs=args.epochs, seed=args.seed, threads=args.threads,
                  out=str(Path(args.out) / f"{args.model}_e{args.epochs}_s{args.seed}" / "dense"))
    if args.model == "vit":
        fields.update(VIT_OPTIM)
    return TrainConfig(**fields).validate()


def train_dense(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """Train (or resume, or reuse) the dense net; returns it and its per-epoch records."""
    trainer = Trainer(dense_config(args), resume=True, progress="lines" if args.progress else "off")
    if trainer.epoch < trainer.config.epochs:
        trainer.run()
    model = trainer.model.eval()
    return model, {"epochs": trainer.epoch, "records": trainer.records, "config": trainer.config.to_dict(),
                   "seconds": sum(r["time"] for r in trainer.records)}


def load_now() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("resnet", "vit"), required=True)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=8, help="dense training epochs (all 60,000 images each)")
    ap.add_argument("--calib", type=int, default=128, help="calibration images for one-shot pruning")
    ap.add_argument("--prune-method", choices=PRUNE_METHODS, default="sparsegpt",
                    help="the one-shot model that is distilled")
    ap.add_argument("--method", choices=("fixed", "srste"), default="fixed", help="student masks during distillation")
    ap.add_argument("--steps", type=int, default=938, help="distillation steps (469 = one pass over the images)")
    ap.add_argument("--batch", type=int, default=128, help="distillation batch (images)")
    ap.add_argument("--lr", type=float, default=5e-4, help="distillation AdamW peak lr")
    ap.add_argument("--hidden-weight", type=float, default=1.0, help="weight of the blocks' hidden-state loss")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=0,
                    help="evaluate the student on the test set every K steps (a curve; multiple of 50; 0: off)")
    ap.add_argument("--out", default="runs/distill_fmnist", help="folder of the dense run and the distillation")
    ap.add_argument("--json", default=None, help="results file (default docs/results/distill_fmnist_MODEL.json)")
    ap.add_argument("--progress", action="store_true", help="progress lines of training and distillation")
    args = ap.parse_args(argv)
    json_path = Path(args.json or f"docs/results/distill_fmnist_{args.model}.json")
    if args.eval_every % 50:
        ap.error("--eval-every must be a multiple of 50 (the log interval)")

    from llvmlite import binding

    from nmsparse.training.loop import configure_threads

    configure_threads(args.threads)
    t_all = time.perf_counter()
    loads = {"start": load_now()}
    data = load_dataset("fashion-mnist")
    x_test, y_test = data.x_test, data.y_test

    dense, dense_info = train_dense(args)
    for p in dense.parameters():
        p.requires_grad_(False)
    loads["after_dense"] = load_now()
    result: dict = {
        "model": args.model, "nm": f"{N}:{M}", "seed": args.seed,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "cpu": binding.get_host_cpu_name(), "threads": args.threads, "torch": torch.__version__,
        "dense": {"top1": top1(dense, x_test, y_test), "epochs": dense_info["epochs"],
                  "train_seconds": round(dense_info["seconds"], 1), "config": dense_info["config"],
                  "curve": [round(100 * r["test_acc"], 2) for r in dense_info["records"]]},
        "test_images": len(y_test), "train_images": len(data.y_train),
    }
    print(f"dense {args.model}: {result['dense']['top1']:.2f}% after {dense_info['epochs']} epochs", flush=True)

    idx = balanced(data.y_train, args.calib, args.seed)
    calib = [data.x_train[idx[s:s + 64]] for s in range(0, len(idx), 64)]
    one_shot, student, report = {}, None, None
    for method in PRUNE_METHODS:
        m = copy.deepcopy(dense)
        t0 = time.perf_counter()
        r = nmsparse.prune(m, N, M, method=method, calib=calib)
        entry = {"top1": top1(m, x_test, y_test), "seconds": round(time.perf_counter() - t0, 2),
                 "mean_layer_error": r.mean("error_after")}
        one_shot[method] = entry
        print(f"one-shot {method}: {entry['top1']:.2f}%", flush=True)
        if method == args.prune_method:
            student, report = m, r
    assert student is not None and report is not None
    result["one_shot"] = one_shot
    result["calib_images"] = args.calib
    result["layers"] = {"sparse": [e.param for e in report.layers if e.sparse],
                        "dense": {e.param: e.reason for e in report.layers if not e.sparse}}
    for p in student.parameters():
        p.requires_grad_(True)

    run = Path(dense_config(args).out).parent / (f"distill-{args.prune_method}-{args.method}-s{args.steps}"
                                                 f"-b{args.batch}-lr{args.lr:g}-h{args.hidden_weight:g}"
                                                 f"-t{args.temperature:g}-c{args.calib}")
    passes = math.ceil(args.steps * args.batch / (len(data.x_train) // args.batch * args.batch))
    batches = Shuffled(data.x_train, args.batch, max(1, passes), args.seed)
    curve_file = run / "curve.jsonl"  # the test curve of earlier calls of a resumed run
    curve: list[dict] = [json.loads(t) for t in curve_file.read_text().splitlines()] if curve_file.exists() else []

    def on_log(rec: dict) -> None:
        if args.eval_every and rec["step"] % args.eval_every == 0:
            acc = top1(student, x_test, y_test)
            curve[:] = [c for c in curve if c["step"] < rec["step"]]
            curve.append({"step": rec["step"], "top1": acc, "loss": rec["loss"], "time": round(rec["time"], 1)})
            curve_file.write_text("".join(json.dumps(c) + "\n" for c in curve))
            print(f"step {rec['step']}: student {acc:.2f}% (loss {rec['loss']:.4f}, {rec['time']:.0f} s)", flush=True)

    loads["before_distill"] = load_now()
    dr = nmsparse.distill(student, dense, batches, steps=args.steps, lr=args.lr, nm=(N, M), method=args.method,
                          output_loss="kl", hidden_weight=args.hidden_weight, temperature=args.temperature,
                          seed=args.seed, out=run, resume=True, checkpoint_every=100, log_every=50,
                          progress="lines" if args.progress else "off", on_log=on_log)
    loads["after_distill"] = load_now()
    sparse_names = result["layers"]["sparse"]
    params = dict(student.named_parameters())
    not_nm = [k for k in sparse_names if not nmsparse.is_nm(params[k], N, M, dim=1)]
    distilled = top1(student, x_test, y_test)
    steps_time = [r["time"] for r in dr.records]
    result["distill"] = {
        "top1": distilled, "gap_to_dense": round(result["dense"]["top1"] - distilled, 2),
        "from": args.prune_method, "method": dr.method, "steps": dr.steps, "batch": args.batch, "lr": args.lr,
        "output_loss": "kl", "hidden_weight": args.hidden_weight, "temperature": args.temperature,
        "images_seen": dr.steps * args.batch, "nm_layers": dr.layers, "masks_unchanged": dr.masks_unchanged,
        "nm_checks": dr.nm_checks, "resumed_from": dr.resumed_from,
        "seconds_this_call": round(dr.seconds, 1), "seconds_training": round(steps_time[-1], 1) if steps_time else None,
        "final_loss": dr.records[-1]["loss"] if dr.records else None, "curve": curve, "out": str(run),
    }
    result["is_nm_all_sparse_weights"] = not not_nm
    result["not_nm"] = not_nm
    result["load_average"] = loads
    result["wall_seconds_this_invocation"] = round(time.perf_counter() - t_all, 1)
    print(f"distilled {args.model} ({args.prune_method} -> {dr.method}, {dr.steps} steps): {distilled:.2f}% "
          f"(dense {result['dense']['top1']:.2f}%, gap {result['distill']['gap_to_dense']:+.2f}); "
          f"all {len(sparse_names)} sparse weights 2:4: {not not_nm}", flush=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    if not_nm:
        print(f"NOT 2:4 after distillation: {not_nm}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
