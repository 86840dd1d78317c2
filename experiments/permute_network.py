"""``prune(permute=True)`` with the network-level acceptance rule (``accept="network"``) against
``prune(permute=False)`` on a Fashion-MNIST checkpoint of ``nmsparse train``: one-shot top-1 on the
10,000 test images, the pruned networks' relative output error on the calibration images (the
quantity the rule guarantees not to raise), and optionally one pass of fixed-mask fine-tuning.

    python experiments/permute_network.py --checkpoint runs/fm2_vit/final.safetensors \\
        --configs 2:4/magnitude,2:4/adaprune,4:8/magnitude,4:8/adaprune --seeds 4 \\
        --out docs/results/permute_network_vit.json

Every row prunes a fresh copy of the dense model through the public call (``nmsparse.prune``), so
``prune s`` includes the permutation search, the network checks and, for AdaPrune, the second
(unpermuted) prune of its guard. The choice sees only the calibration images; the test set is read
once per row. ``paired_sd``: standard deviation of the accuracy difference to the unpermuted row of
the same configuration on the same test images. ``--seeds k``: 2:4 magnitude one-shot also with
permutation-search seeds 1..k (the spread between permutations of nearly equal kept |w|).
A config ending in ``/ft`` is fine-tuned (both rows) as in ``experiments/permute_fmnist.py``; where
``prune(permute=True)`` returned exactly the unpermuted pruned weights (its guard kept them), the
deterministic fine-tuning would repeat the unpermuted row's, so that row's result is reused
(``same_weights_as_unpermuted``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import nmsparse
from nmsparse.permute.network import NetworkObjective
from nmsparse.cli.prune import balanced_indices
from nmsparse.training.checkpoint import atomic_write
from permute_fmnist import finetune, load_dense, paired, predict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--calib", type=int, default=100)
    p.add_argument("--configs", default="2:4/magnitude,2:4/adaprune,4:8/magnitude,4:8/adaprune")
    p.add_argument("--seeds", type=int, default=0)
    p.add_argument("--finetune-subset", type=int, default=60000)
    args = p.parse_args()
    torch.set_num_threads(1)
    dense, data, src = load_dense(args.checkpoint)
    calib = [data.x_train[balanced_indices(data.y_train, args.calib, 0)]]
    objective = NetworkObjective(dense, calib)
    xt, yt = data.x_test, data.y_test
    ft_x, ft_y = data.x_train[:args.finetune_subset], data.y_train[:args.finetune_subset]
    t0 = time.perf_counter()
    out = {"checkpoint": args.checkpoint, "model": src["model"], "calib": args.calib,
           "loadavg_start": os.getloadavg(), "dense": float((predict(dense, xt) == yt).double().mean()),
           "finetune_subset": len(ft_y), "runs": [], "seeds": []}

    def save():
        out["wall_s"], out["loadavg_end"] = time.perf_counter() - t0, os.getloadavg()
        atomic_write(args.out, lambda f: f.write((json.dumps(out, indent=1) + "\n").encode()))

    def one(n, m, method, permute, seed=0):
        model = copy.deepcopy(dense)
        t1 = time.perf_counter()
        rep = nmsparse.prune(model, n, m, method=method, calib=calib, permute=permute, seed=seed)
        row = {"prune_s": time.perf_counter() - t1, "network_error": objective.evaluate(model),
               "mean_kept_abs": rep.mean("kept_abs"), "mean_error_after": rep.mean("error_after")}
        if permute:
            pr = rep.permutation
            row.update(settings=pr.settings, kept_total=list(pr.total()),
                       spaces_permuted=sum(sp.permuted for sp in pr.spaces),
                       spaces=[{k: getattr(sp, k) for k in ("id", "size", "searched", "before", "after", "time_s",
                                                            "network_before", "network_after", "rejected",
                                                            "permuted")}
                               for sp in pr.spaces if sp.searched])
        return model, rep, row

    for config in args.configs.split(","):
        nm, method, *ft = config.split("/")
        n, m = (int(v) for v in nm.split(":"))
        base = base_ft = base_state = base_row = None
        for permute in (False, True):
            model, rep, row = one(n, m, method, permute)
            pred = predict(model, xt)
            row.update(nm=nm, method=method, permute=permute, one_shot=float((pred == yt).double().mean()))
            if permute:
                row["paired_sd"] = paired(pred, base, yt)
            base = pred if not permute else base
            same = permute and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base_state))
            if not permute:  # the unpermuted pruned weights, before any fine-tuning
                base_state = [v.detach().clone() for v in model.state_dict().values()]
            if permute:
                row["same_weights_as_unpermuted"] = same
            if ft and same:  # the guard kept the unpermuted pruned network: the same fine-tuning
                row.update(finetuned=base_row["finetuned"], finetuned_paired_sd=0.0, finetune_s=0.0)
            elif ft:
                t2 = time.perf_counter()
                finetune(model, src, ft_x, ft_y, n, m, [e.name for e in rep.sparse])
                fpred = predict(model, xt)
                row.update(finetune_s=time.perf_counter() - t2, finetuned=float((fpred == yt).double().mean()))
                if permute:
                    row["finetuned_paired_sd"] = paired(fpred, base_ft, yt)
                base_ft = fpred if not permute else base_ft
            base_row = row if not permute else base_row
            out["runs"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("settings", "spaces")}), flush=True)
            save()
    base = next((r for r in out["runs"] if r["nm"] == "2:4" and r["method"] == "magnitude" and not r["permute"]),
                None)
    for seed in range(1, args.seeds + 1):
        model, rep, row = one(2, 4, "magnitude", True, seed)
        row.update(seed=seed, one_shot=float((predict(model, xt) == yt).double().mean()))
        if base is not None:
            row["unpermuted_network_error"], row["unpermuted_one_shot"] = base["network_error"], base["one_shot"]
        out["seeds"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("settings", "spaces")}), flush=True)
        save()
    save()


if __name__ == "__main__":
    main()
