"""Channel permutations on a Fashion-MNIST model trained by ``nmsparse train``: kept |w| per layer
with and without permutation (2:4 and 4:8), and top-1 of ``nmsparse prune`` with and without
``--permute`` (magnitude and AdaPrune; one-shot, and after fixed-mask fine-tuning for the N:M listed
in ``--finetune-nm``).

    python experiments/permute_fmnist.py --checkpoint runs/fm2_resnet/final.safetensors \\
        --train-subset 6000 --out docs/results/permute_fmnist_resnet.json

Every prune run is a subprocess ``python -m nmsparse prune ...`` (the command is recorded in the
JSON next to its result).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import nmsparse
from nmsparse.prune.cli import read_checkpoint
from nmsparse.training.data import load_dataset
from nmsparse.training.models import build_model


def kept_tables(model: torch.nn.Module, x: torch.Tensor, nms: list[tuple[int, int]]) -> dict:
    out = {}
    for n, m in nms:
        mod = copy.deepcopy(model)
        rep = nmsparse.permute_channels(mod, n, m, example_inputs=x)
        out[f"{n}:{m}"] = rep.to_dict()
        print(rep.table(), flush=True)
    return out


def prune_run(args, nm: str, method: str, permute: bool, finetune: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "nmsparse", "prune", "--checkpoint", args.checkpoint, "--nm", nm, "--method", method,
               "--calib-samples", str(args.calib), "--out", tmp, "--overwrite", "--no-progress",
               "--threads", str(args.threads), "--seed", "0"]
        if args.train_subset:
            cmd += ["--train-subset", str(args.train_subset)]
        if permute:
            cmd.append("--permute")
        if finetune:
            cmd += ["--finetune-epochs", "1"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        full = json.loads((Path(tmp) / "prune_report.json").read_text())
    s, r = full["summary"], full["report"]
    kept_num = sum(v["kept_abs"] for v in r["results"].values())
    row = {"nm": nm, "method": method, "permute": permute, "dense": s["dense"]["test_acc"],
           "one_shot": s["pruned"]["test_acc"], "finetuned": (s["finetuned"] or {}).get("test_acc"),
           "mean_kept_abs": kept_num / max(len(r["results"]), 1), "wall_s": time.perf_counter() - t0,
           "command": " ".join(["nmsparse"] + cmd[3:]).replace(tmp, "OUT")}
    if "permutation" in r:
        row["permute_time_s"] = r["permutation"]["time_s"]
        row["kept_total"] = [r["permutation"]["kept_total_before"], r["permutation"]["kept_total_after"]]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--calib", type=int, default=100)
    p.add_argument("--train-subset", type=int, default=None, help="fine-tune (and calibrate) on the first K images")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default="magnitude,adaprune")
    p.add_argument("--nm", default="2:4,4:8")
    p.add_argument("--finetune-nm", default="2:4")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tensors, src = read_checkpoint(args.checkpoint)
    data = load_dataset(src.get("data", "fashion-mnist"), src.get("data_dir"), train_subset=1000, test_subset=100)
    model = build_model(src["model"], image_size=data.image_size, in_channels=data.in_channels,
                        num_classes=data.num_classes)
    model.load_state_dict(tensors)
    model.eval()
    nms = [tuple(int(v) for v in s.split(":")) for s in args.nm.split(",")]
    result = {"checkpoint": args.checkpoint, "model": src["model"], "uptime": os.getloadavg(),
              "kept": kept_tables(model, data.x_train[:100], nms), "prune": []}
    for nm in args.nm.split(","):
        for method in args.methods.split(","):
            for permute in (False, True):
                result["prune"].append(prune_run(args, nm, method, permute, nm in args.finetune_nm.split(",")))
    result["uptime_end"] = os.getloadavg()
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
