"""One-shot N:M pruning of Fashion-MNIST nets trained dense by ``nmsparse train`` (issue results 1 and 2).

Part 1: from the dense checkpoint, 2:4 and 4:8 (plain and transposable) by magnitude, Wanda, SparseGPT
and AdaPrune (exact and Adam solvers), with 10 and 100 calibration images (balanced over classes,
from the training set), each without fine-tuning and after ``--finetune-epochs`` of fixed-mask
fine-tuning (frozen support; the dense run's optimizer, weight decay and momentum at a tenth of its peak
learning rate, cosine to zero, no warm-up: ``nmsparse.training.recipe.finetune_recipe``). "one-shot + BN"
re-estimates the batch-norm statistics on the calibration images after pruning (no weight changes;
models without batch norm skip it); fine-tuning starts from that.
Part 2: the dense net first pruned to 50% / 75% unstructured (per-layer magnitude, then the same
fixed-mask fine-tuning so it is a trained unstructured-sparse net), then converted to 2:4 / 4:8 / 1:4
by magnitude and by AdaPrune (existing zeros respected), without and with fine-tuning.

    python experiments/prune_fmnist.py --checkpoint runs/fm_full_resnet/final.safetensors --part 1 \\
        --out docs/results/pruning_fmnist_resnet_part1.json

(docs/results/pruning.md gives the commands of the committed results.)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nmsparse
from nmsparse.pruning import recalibrate_batchnorm
from nmsparse.cli.prune import balanced_indices, evaluate, read_checkpoint, support_mask
from nmsparse.training.recipe import finetune_recipe
from nmsparse.training.data import load_dataset
from nmsparse.training.models import build_model

METHODS = [("magnitude", "exact"), ("wanda", "exact"), ("sparsegpt", "exact"), ("adaprune", "exact"),
           ("adaprune", "adam")]


def finetune(model, names, n, m, data, epochs, recipe, batch=128, seed=0):
    """Fixed-mask fine-tuning of the layers ``names`` (support frozen), in place; returns the model.
    ``recipe``: :func:`nmsparse.training.recipe.finetune_recipe`'s dict."""
    if epochs <= 0:
        return model
    nmsparse.sparsify(model, n, m, method="fixed", include=names, keep_dense=(), mask_fn=support_mask)
    if recipe["optimizer"] == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    else:
        opt = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"],
                              weight_decay=recipe["weight_decay"])
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(data.y_train) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data.y_train), generator=g)
        for s in range(0, len(perm), batch):
            idx = perm[s:s + batch]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    nmsparse.finalize(model)
    model.eval()
    return model


def unstructured(model, names, density):
    """Per-layer magnitude pruning to ``density`` (fraction kept) of the layers ``names``."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for k in names:
            w = mods[k].weight
            keep = max(1, int(round(density * w.numel())))
            thr = w.abs().flatten().kthvalue(w.numel() - keep + 1).values
            w.mul_((w.abs() >= thr).to(w.dtype))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--nm", default="2:4,4:8")
    ap.add_argument("--calib", default="10,100")
    ap.add_argument("--transposable", default="no,yes")
    ap.add_argument("--methods", default=",".join(f"{m}-{s}" if m == "adaprune" else m for m, s in METHODS))
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--train-subset", type=int, default=None, help="fine-tuning images (first K)")
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--part", default="1,2")
    ap.add_argument("--finetune-when", default="all",
                    help="part 1 configs to fine-tune: 'all', or 'plain-max-calib' (non-transposable, largest calib)")
    ap.add_argument("--part2-finetune", type=int, default=None,
                    help="fine-tuning epochs of the part-2 conversions (default --finetune-epochs)")
    ap.add_argument("--finetune-lr", type=float, default=None, help="default: a tenth of the dense run's peak lr")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    tensors, src = read_checkpoint(args.checkpoint)
    recipe = finetune_recipe(src, lr=args.finetune_lr)
    data = load_dataset(src.get("data", "fashion-mnist"), train_subset=args.train_subset,
                        test_subset=args.test_subset)
    dense = build_model(src["model"], image_size=data.image_size, in_channels=data.in_channels,
                        num_classes=data.num_classes)
    dense.load_state_dict(tensors)
    dense.eval()
    res = {"checkpoint": args.checkpoint, "source_config": src, "test_images": len(data.y_test),
           "finetune_images": len(data.y_train), "finetune_epochs": args.finetune_epochs, "finetune_recipe": recipe,
           "dense_acc": evaluate(dense, data.x_test, data.y_test)["test_acc"], "part1": [], "part2": []}
    print(f"{src['model']}: dense {res['dense_acc']:.2%}", flush=True)

    def bn_acc(model, calib):
        """Top-1 after re-estimating batch-norm statistics on ``calib`` (None for a model without BN)."""
        if not recalibrate_batchnorm(model, calib):
            return None
        return evaluate(model, data.x_test, data.y_test)["test_acc"]

    def tuned(model, names, n, m, epochs):
        """(top-1, seconds) after fixed-mask fine-tuning, or (None, None) for no fine-tuning."""
        if not epochs:
            return None, None
        t0 = time.perf_counter()
        finetune(model, names, n, m, data, epochs, recipe)
        return evaluate(model, data.x_test, data.y_test)["test_acc"], time.perf_counter() - t0

    def save():
        res["wall_s"] = time.perf_counter() - t_all
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")

    nms = [tuple(int(v) for v in s.split(":")) for s in args.nm.split(",")]
    calibs = {k: [data.x_train[balanced_indices(data.y_train, k, 0)]] for k in map(int, args.calib.split(","))}
    parts = args.part.split(",")
    if "1" in parts:
        for n, m in nms:
            for tr in args.transposable.split(","):
                for k, calib in calibs.items():
                    for spec in args.methods.split(","):
                        method, _, solver = spec.partition("-")
                        model = copy.deepcopy(dense)
                        t0 = time.perf_counter()
                        try:
                            rep = nmsparse.prune(model, n, m, method=method, calib=calib, transposable=tr == "yes",
                                                 solver=solver or "exact", transposable_method="approx")
                        except ImportError as e:
                            print(f"skip transposable: {e}")
                            break
                        t = time.perf_counter() - t0
                        acc = evaluate(model, data.x_test, data.y_test)["test_acc"]
                        acc_bn = bn_acc(model, calib)
                        names = [e.name for e in rep.sparse]
                        do_ft = args.finetune_epochs and (args.finetune_when == "all" or (
                            tr == "no" and k == max(calibs)))
                        ft, ft_s = tuned(model, names, n, m, args.finetune_epochs if do_ft else 0)
                        row = {"nm": f"{n}:{m}", "transposable": tr == "yes", "calib": k, "method": spec,
                               "acc": acc, "acc_bn": acc_bn, "acc_ft": ft, "prune_s": t, "finetune_s": ft_s,
                               "error_after": rep.mean("error_after")}
                        res["part1"].append(row)
                        print(json.dumps(row), flush=True)
                        save()
    if "2" in parts:
        names = [e.name for e in nmsparse.plan(dense, 2, 4) if e.sparse]
        for density in (0.5, 0.25):
            base = copy.deepcopy(dense)
            unstructured(base, names, density)
            acc0 = evaluate(base, data.x_test, data.y_test)["test_acc"]
            base = finetune(base, names, 2, 4, data, args.finetune_epochs, recipe)
            acc_u = evaluate(base, data.x_test, data.y_test)["test_acc"]
            for n, m in [(2, 4), (4, 8), (1, 4)]:
                for spec in ("magnitude", "adaprune-exact"):
                    method, _, solver = spec.partition("-")
                    model = copy.deepcopy(base)
                    rep = nmsparse.prune(model, n, m, method=method, calib=calibs[max(calibs)],
                                         solver=solver or "exact", include=names, keep_dense=())
                    acc = evaluate(model, data.x_test, data.y_test)["test_acc"]
                    acc_bn = bn_acc(model, calibs[max(calibs)])
                    ep2 = args.finetune_epochs if args.part2_finetune is None else args.part2_finetune
                    dens = sum(float((dict(model.named_modules())[k].weight != 0).float().mean()) for k in names)
                    ft, _ = tuned(model, names, n, m, ep2)
                    row = {"unstructured_sparsity": 1 - density, "unstructured_acc_oneshot": acc0,
                           "unstructured_acc": acc_u, "nm": f"{n}:{m}", "method": spec, "acc": acc, "acc_bn": acc_bn,
                           "acc_ft": ft, "density": dens / len(names), "error_after": rep.mean("error_after")}
                    res["part2"].append(row)
                    print(json.dumps(row), flush=True)
                    save()
    save()
    print(f"wall {time.perf_counter() - t_all:.0f}s")


if __name__ == "__main__":
    main()
