"""Channel permutations on a Fashion-MNIST model trained by ``nmsparse train``: kept |w| per layer
with and without permutation (2:4 and 4:8), and top-1 of ``nmsparse.prune`` with and without
``permute=True`` (magnitude and AdaPrune), one-shot and after one epoch of fixed-mask fine-tuning on a
subset of the training images.

    python experiments/permute_fmnist.py --checkpoint runs/fm2_resnet/final.safetensors \\
        --finetune-subset 3000 --out docs/results/permute_fmnist_resnet.json

Everything runs in one process through the Python API (the same code as ``nmsparse prune
--permute``): the data set is read and the dense model evaluated once. Fine-tuning: the pruned
support frozen (``sparsify(method="fixed")``), one pass over the first ``--finetune-subset`` training
images, batch 128, the dense run's optimizer at a tenth of its peak lr (SGD 0.01 momentum 0.9 for the
ResNet, AdamW 1e-4 for the ViT), constant lr.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nmsparse
from nmsparse.prune.cli import balanced_indices, evaluate, read_checkpoint, support_mask
from nmsparse.training.data import load_dataset
from nmsparse.training.models import build_model


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--calib", type=int, default=100)
    p.add_argument("--finetune-subset", type=int, default=3000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--configs", default="2:4/magnitude/ft,2:4/adaprune/ft,4:8/magnitude,4:8/adaprune")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tensors, src = read_checkpoint(args.checkpoint)
    data = load_dataset(src.get("data", "fashion-mnist"), src.get("data_dir"))
    dense = build_model(src["model"], image_size=data.image_size, in_channels=data.in_channels,
                        num_classes=data.num_classes)
    dense.load_state_dict(tensors)
    dense.eval()
    calib_x = data.x_train[balanced_indices(data.y_train, args.calib, 0)]
    calib = [calib_x[s:s + 100] for s in range(0, len(calib_x), 100)]
    ft_x, ft_y = data.x_train[:args.finetune_subset], data.y_train[:args.finetune_subset]
    t0 = time.perf_counter()
    result = {"checkpoint": args.checkpoint, "model": src["model"], "loadavg_start": os.getloadavg(),
              "dense": evaluate(dense, data.x_test, data.y_test)["test_acc"], "calib": args.calib,
              "finetune_subset": args.finetune_subset, "test_images": len(data.y_test), "kept": {}, "runs": []}
    print("dense", result["dense"], flush=True)
    for nm in sorted({c.split("/")[0] for c in args.configs.split(",")}):
        n, m = (int(v) for v in nm.split(":"))
        rep = nmsparse.permute_channels(copy.deepcopy(dense), n, m, example_inputs=calib[0])
        result["kept"][nm] = rep.to_dict()
        print(rep.table(), flush=True)
    for config in args.configs.split(","):
        nm, method, *ft = config.split("/")
        n, m = (int(v) for v in nm.split(":"))
        for permute in (False, True):
            model = copy.deepcopy(dense)
            t1 = time.perf_counter()
            rep = nmsparse.prune(model, n, m, method=method, calib=calib, permute=permute)
            row = {"nm": nm, "method": method, "permute": permute, "prune_s": time.perf_counter() - t1,
                   "mean_kept_abs": rep.mean("kept_abs"), "one_shot": evaluate(model, data.x_test, data.y_test)["test_acc"],
                   "mean_error_after": rep.mean("error_after")}
            if permute:
                row["permute_s"] = rep.permutation.time_s
                row["kept_total"] = list(rep.permutation.total())
            if ft:
                finetune(model, src, ft_x, ft_y, n, m, [e.name for e in rep.sparse])
                row["finetuned"] = evaluate(model, data.x_test, data.y_test)["test_acc"]
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            result["wall_s"], result["loadavg_end"] = time.perf_counter() - t0, os.getloadavg()
            tmp = Path(args.out).with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            tmp.replace(args.out)


if __name__ == "__main__":
    main()
