"""AdaPrune's exact solver at several ridge strengths against the paper's Adam solver, on the
Fashion-MNIST nets trained dense (see docs/results/pruning.md, "exact least squares vs Adam"):

    python experiments/adaprune_damp.py runs/fm_full_vit/final.safetensors runs/fm_full_resnet/final.safetensors

For each checkpoint: 2:4, plain and transposable, 100 balanced calibration images; prints the mean
layer error after the refit, top-1 on the 10,000 test images and the pruning time.
"""

from __future__ import annotations

import argparse
import copy

import torch

import nmsparse
from nmsparse.cli.prune import balanced_indices, evaluate, read_checkpoint
from nmsparse.training.data import load_dataset
from nmsparse.training.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--damps", default="0.01,1e-3,1e-4,1e-5")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist")
    calib = [data.x_train[balanced_indices(data.y_train, 100, 0)]]
    print("| model | masks | solver | damp | mean layer error | top-1 | time |\n|---|---|---|---|---|---|---|")
    for path in args.checkpoints:
        tensors, src = read_checkpoint(path)
        dense = build_model(src["model"])
        dense.load_state_dict(tensors)
        dense.eval()
        for tr in (False, True):
            runs = [("adam", 0.01)] + [("exact", float(d)) for d in args.damps.split(",")]
            for solver, damp in runs:
                model = copy.deepcopy(dense)
                rep = nmsparse.prune(model, 2, 4, method="adaprune", calib=calib, solver=solver, damp=damp,
                                     transposable=tr, transposable_method="approx")
                acc = evaluate(model, data.x_test, data.y_test)["test_acc"]
                print(f"| {src['model']} | 2:4{' transposable' if tr else ''} | {solver} | "
                      f"{damp if solver == 'exact' else '-'} | {rep.mean('error_after'):.5f} | {100 * acc:.2f} | "
                      f"{rep.time_s:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
