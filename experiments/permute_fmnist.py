"""Channel permutations on a Fashion-MNIST model trained by ``nmsparse train``: kept |w| per layer
with and without permutation (2:4 and 4:8), and top-1 of ``nmsparse.prune`` without permutation,
with ``permute=True`` (whose permutations are kept only where they lower the calibration output
error, ``accept="error"``) and with every permutation that raises the kept |w| (``accept="score"``),
magnitude and AdaPrune, one-shot and after one pass of fixed-mask fine-tuning over the first
``--finetune-subset`` training images (60000: one full epoch).

    python experiments/permute_fmnist.py --checkpoint runs/fm2_resnet/final.safetensors \\
        --finetune-subset 60000 --out docs/results/permute_fmnist_resnet.json

Everything runs in one process through the Python API: the permutation of ``prune(permute=True)``
(:func:`nmsparse.permute.prune_hook.permute_for_prune`, the code behind ``nmsparse prune --permute``)
is searched once per N:M and accept rule and shared by magnitude and AdaPrune (both prune by
magnitude), then ``nmsparse.prune`` prunes a copy. Every run records its per-image test predictions'
paired difference to the unpermuted run of the same configuration (``paired_sd``: the standard
deviation of that difference in accuracy, from the images on which the two disagree).
``--seeds`` extra search seeds (2:4 magnitude one-shot only) show how much one-shot accuracy moves
between permutations of nearly equal kept |w|. Fine-tuning: the pruned support frozen
(``sparsify(method="fixed")``), one pass, batch 128, the dense run's optimizer at a tenth of its
peak lr (SGD 0.01 momentum 0.9 for the ResNet, AdamW 1e-4 for the ViT), constant lr.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F

import nmsparse
from nmsparse.cli.prune import balanced_indices, evaluate, read_checkpoint, support_mask
from nmsparse.training.data import load_dataset
from nmsparse.training.models import build_model
from nmsparse.training.checkpoint import atomic_write


def finetune(model, src: dict, x: torch.Tensor, y: torch.Tensor, n: int, m: int, pruned: list[str]) -> None:
    nmsparse.sparsify(model, n, m, method="fixed", include=pruned or None, keep_dense=(), mask_fn=support_mask)
    lr, wd = float(src.get("lr", 0.1)) / 10, float(src.get("weight_decay", 5e-4))
    if src.get("optimizer") == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    model.train()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    for s in range(0, len(y), 128):
        idx = order[s:s + 128]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    nmsparse.finalize(model)
    model.eval()


def predict(model, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[s:s + batch]).argmax(1) for s in range(0, len(x), batch)])


def paired(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> float:
    """Standard deviation of the accuracy difference of two classifiers on the same images."""
    d = (a == y).double() - (b == y).double()
    return float(d.std() / len(y) ** 0.5)


def load_dense(checkpoint: str):
    """The trained dense model of an ``nmsparse train`` checkpoint (eval mode), its dataset and settings."""
    tensors, src = read_checkpoint(checkpoint)
    data = load_dataset(src.get("data", "fashion-mnist"), src.get("data_dir"))
    dense = build_model(src["model"], image_size=data.image_size, in_channels=data.in_channels,
                        num_classes=data.num_classes)
    dense.load_state_dict(tensors)
    return dense.eval(), data, src


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--calib", type=int, default=100)
    p.add_argument("--finetune-subset", type=int, default=60000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--configs", default="2:4/magnitude/ft,2:4/adaprune/ft,4:8/magnitude/ft,4:8/adaprune/ft")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dense, data, src = load_dense(args.checkpoint)
    calib_x = data.x_train[balanced_indices(data.y_train, args.calib, 0)]
    calib = [calib_x[s:s + 100] for s in range(0, len(calib_x), 100)]
    ft_x, ft_y = data.x_train[:args.finetune_subset], data.y_train[:args.finetune_subset]
    xt, yt = data.x_test, data.y_test
    t0 = time.perf_counter()
    result = {"checkpoint": args.checkpoint, "model": src["model"], "loadavg_start": os.getloadavg(),
              "dense": evaluate(dense, xt, yt)["test_acc"], "calib": args.calib,
              "finetune_subset": len(ft_y), "test_images": len(yt), "kept": {}, "spaces": {}, "runs": [],
              "seeds": []}
    print("dense", result["dense"], flush=True)

    def save():
        result["wall_s"], result["loadavg_end"] = time.perf_counter() - t0, os.getloadavg()
        atomic_write(args.out, lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))

    permuted = {}  # (nm, accept) -> (model, report, seconds)
    for nm in sorted({c.split("/")[0] for c in args.configs.split(",")}):
        n, m = (int(v) for v in nm.split(":"))
        for accept in ("error", "score"):
            model = copy.deepcopy(dense)
            t1 = time.perf_counter()
            rep = nmsparse.permute_channels(model, n, m, example_inputs=calib[0], calib=calib, accept=accept)
            permuted[nm, accept] = (model, rep, time.perf_counter() - t1)
            print(rep.table(), flush=True)
        result["kept"][nm] = permuted[nm, "score"][1].to_dict()
        result["spaces"][nm] = [{k: getattr(sp, k) for k in ("id", "size", "searched", "before", "after",
                                                             "error_before", "error_after", "rejected", "permuted")}
                                for sp in permuted[nm, "error"][1].spaces if sp.searched]
    for seed in range(1, args.seeds + 1):  # other permutations of about the same kept |w|
        model = copy.deepcopy(dense)
        prep = nmsparse.permute_channels(model, 2, 4, example_inputs=calib[0], calib=calib, accept="score", seed=seed)
        rep = nmsparse.prune(model, 2, 4, method="magnitude", calib=calib)
        row = {"seed": seed, "kept_total": list(prep.total()), "mean_error_after": rep.mean("error_after"),
               "one_shot": evaluate(model, xt, yt)["test_acc"]}
        result["seeds"].append(row)
        print(json.dumps(row), flush=True)
        save()

    for config in args.configs.split(","):
        nm, method, *ft = config.split("/")
        n, m = (int(v) for v in nm.split(":"))
        base_pred = None
        for permute in ("no", "error", "score"):
            source, perm_s = (dense, 0.0) if permute == "no" else (permuted[nm, permute][0], permuted[nm, permute][2])
            model = copy.deepcopy(source)
            t1 = time.perf_counter()
            rep = nmsparse.prune(model, n, m, method=method, calib=calib)
            pred = predict(model, xt)
            base_pred = pred if permute == "no" else base_pred
            row = {"nm": nm, "method": method, "permute": permute, "prune_s": time.perf_counter() - t1 + perm_s,
                   "permute_s": perm_s, "mean_kept_abs": rep.mean("kept_abs"),
                   "one_shot": float((pred == yt).double().mean()), "mean_error_after": rep.mean("error_after")}
            if permute != "no":
                row["paired_sd"] = paired(pred, base_pred, yt)
                row["kept_total"] = list(permuted[nm, permute][1].total())
                row["spaces_permuted"] = sum(sp.permuted for sp in permuted[nm, permute][1].spaces)
            if ft and permute != "score":
                t2 = time.perf_counter()
                finetune(model, src, ft_x, ft_y, n, m, [e.name for e in rep.sparse])
                row["finetune_s"] = time.perf_counter() - t2
                fpred = predict(model, xt)
                row["finetuned"] = float((fpred == yt).double().mean())
                if permute == "no":
                    base_ft = fpred
                else:
                    row["finetuned_paired_sd"] = paired(fpred, base_ft, yt)
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            save()


if __name__ == "__main__":
    main()
