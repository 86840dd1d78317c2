"""One-shot magnitude N:M with channel permutations chosen on the calibration data among several
local searches (``permute_channels(..., accept=A, tries=k)``, ``--accept``: ``network``, the pruned
network's output error, or ``error``, the space's layers' output error), against one search
(``tries=1``, what ``prune(permute=True)`` does with ``accept="network"``) and no permutation, on a
Fashion-MNIST checkpoint.

    python experiments/permute_tries.py --checkpoint runs/fm2_vit/final.safetensors --tries 5 \\
        --out docs/results/permute_tries_vit.json

The choice sees only the 100 calibration (training) images; the test set is read once per row at
the end. ``paired_sd``: standard deviation of the accuracy difference to the unpermuted row (same
test images).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import nmsparse
from nmsparse.cli.prune import balanced_indices
from nmsparse.training.checkpoint import atomic_write
from permute_fmnist import load_dense


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--nm", default="2:4")
    p.add_argument("--tries", type=int, default=5)
    p.add_argument("--calib", type=int, default=100)
    p.add_argument("--accept", default="error", choices=("error", "network"))
    args = p.parse_args()
    torch.set_num_threads(1)
    dense, data, src = load_dense(args.checkpoint)
    calib = [data.x_train[balanced_indices(data.y_train, args.calib, 0)]]
    n, m = (int(v) for v in args.nm.split(":"))
    out = {"checkpoint": args.checkpoint, "model": src["model"], "nm": args.nm, "accept": args.accept,
           "loadavg_start": os.getloadavg(),
           "rows": []}
    preds = {}
    for tries in (0, 1, args.tries):
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        row = {"tries": tries}
        if tries:
            rep = nmsparse.permute_channels(model, n, m, example_inputs=calib[0], calib=calib, accept=args.accept,
                                            tries=tries)
            row.update(permute_s=time.perf_counter() - t0, kept_total=list(rep.total()),
                       network=rep.settings.get("network"),
                       spaces=[(s.size, s.network_before, s.network_after, s.rejected) if args.accept == "network"
                               else (s.size, s.error_before, s.error_after, s.rejected)
                               for s in rep.spaces if s.searched])
        pr = nmsparse.prune(model, n, m, method="magnitude", calib=calib)
        with torch.no_grad():
            preds[tries] = torch.cat([model(data.x_test[s:s + 1000]).argmax(1) for s in range(0, 10000, 1000)])
        acc = float((preds[tries] == data.y_test).double().mean())
        row.update(mean_error_after=pr.mean("error_after"), one_shot=acc)
        if tries:
            d = (preds[tries] == data.y_test).double() - (preds[0] == data.y_test).double()
            row["paired_sd"] = float(d.std() / len(d) ** 0.5)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    out["loadavg_end"] = os.getloadavg()
    atomic_write(args.out, lambda f: f.write((json.dumps(out, indent=1) + "\n").encode()))


if __name__ == "__main__":
    main()
