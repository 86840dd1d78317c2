"""Every one-shot method x {layer, block} reconstruction on the Fashion-MNIST ResNet and ViT (issue 21, item 2).

From a dense checkpoint written by ``nmsparse train`` (or ``experiments/distill_fmnist.py``, which
writes ``OUT/<model>_e<epochs>_s<seed>/dense/final.safetensors``), each method (magnitude, Wanda,
SparseGPT, AdaPrune) prunes the model to N:M with the default layer selection (first and last layer
dense), once layer by layer (``reconstruct=None``) and once with ``reconstruct="block"`` (the ResNet's
three one-block stages, the ViT's four transformer blocks are the repeated blocks whose parameters are
refit to the dense block's output). Calibration: ``--calib`` training images balanced over the classes,
in batches of ``--batch`` (block reconstruction holds the last ``held_out`` fraction of the batches out
for early stopping). Top-1 on the test set (all 10,000 images unless ``--test-subset``) against the
dense model's; for a model with batch norm also after re-estimating its statistics on the calibration
images (``acc_bn``). ``--extras`` adds rows of other things that may move the number: ``permute``
(``permute=True``), ``damp0.1`` (SparseGPT dampening 0.1), ``teacher`` (``target="teacher"``).

    python experiments/prune_fmnist_block.py --checkpoint runs/dense/resnet/final.safetensors \\
        --threads 1 --out docs/results/fmnist_block_recon_resnet.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

import nmsparse
from nmsparse.cli.prune import balanced_indices, evaluate, read_checkpoint
from nmsparse.pruning import recalibrate_batchnorm
from nmsparse.training.data import load_dataset
from nmsparse.training.models import build_model

METHODS = {
    "magnitude": nmsparse.Magnitude(),
    "wanda": nmsparse.Wanda(),
    "sparsegpt": nmsparse.SparseGPT(),
    "adaprune": nmsparse.AdaPrune(),
}


def parse_recon(text: str | None) -> nmsparse.BlockReconstruct:
    """``key=value,...`` -> BlockReconstruct (the types of its defaults)."""
    kw = {}
    for part in (text or "").split(","):
        if part.strip():
            k, v = part.split("=")
            kw[k] = type(getattr(nmsparse.BlockReconstruct, k))(v)
    return nmsparse.BlockReconstruct(**kw)


def configs(args) -> list[dict]:
    """The rows to run: every method x mode, then the extras (on SparseGPT and Wanda)."""
    rows = [{"method": me, "mode": mo, "extra": None} for me in filter(None, args.methods.split(","))
            for mo in args.modes.split(",")]
    for extra in filter(None, (args.extras or "").split(",")):
        for me in ("sparsegpt", "wanda") if extra != "damp0.1" else ("sparsegpt",):
            for mo in args.modes.split(","):
                if extra == "teacher" and mo != "block":
                    continue
                rows.append({"method": me, "mode": mo, "extra": extra})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--nm", default="2:4")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--modes", default="layer,block")
    ap.add_argument("--extras", default=None, help="comma list of permute, damp0.1, teacher")
    ap.add_argument("--calib", type=int, default=1024, help="calibration images (balanced over classes)")
    ap.add_argument("--batch", type=int, default=64, help="calibration batch size")
    ap.add_argument("--recon", default=None, help="BlockReconstruct options, key=value,...")
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, m = (int(v) for v in args.nm.split(":"))
    tensors, src = read_checkpoint(args.checkpoint)
    data = load_dataset(src.get("data", "fashion-mnist"), test_subset=args.test_subset)
    dense = build_model(src["model"], image_size=data.image_size, in_channels=data.in_channels,
                        num_classes=data.num_classes)
    dense.load_state_dict(tensors)
    dense.eval()
    x = data.x_train[balanced_indices(data.y_train, args.calib, args.seed)]
    calib = [x[s:s + args.batch] for s in range(0, len(x), args.batch)]
    recon = parse_recon(args.recon)
    try:
        import llvmlite.binding as llvm
        cpu = llvm.get_host_cpu_name()
    except ImportError:  # pragma: no cover
        cpu = "unknown"
    res = {"command": " ".join([Path(sys.executable).name] + sys.argv), "checkpoint": args.checkpoint,
           "checkpoint_sha256": hashlib.sha256(Path(args.checkpoint).read_bytes()).hexdigest(),
           "model": src["model"], "source_config": src, "nm": args.nm, "cpu": cpu,
           "torch_threads": torch.get_num_threads(), "calib_images": len(x), "calib_batches": len(calib),
           "test_images": len(data.y_test), "recon": recon.__dict__,
           "dense_acc": evaluate(dense, data.x_test, data.y_test)["test_acc"], "rows": []}
    print(f"{src['model']} dense {res['dense_acc']:.2%} (cpu {cpu}, {len(data.y_test)} test images)", flush=True)
    t_all = time.perf_counter()
    for cfg in configs(args):
        opt = METHODS[cfg["method"]]
        kw = {}
        rc = recon if cfg["mode"] == "block" else None
        if cfg["extra"] == "damp0.1":
            opt = nmsparse.SparseGPT(damp=0.1)
        elif cfg["extra"] == "permute":
            kw["permute"] = True
        elif cfg["extra"] == "teacher":
            rc = nmsparse.BlockReconstruct(**{**recon.__dict__, "target": "teacher"})
        model = copy.deepcopy(dense)
        load = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        rep = nmsparse.prune(model, n, m, method=opt, calib=calib, reconstruct=rc, seed=args.seed, **kw)
        dt, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        params = dict(model.named_parameters())
        ok = all(nmsparse.layer_is_nm(params[e.param], n, m) for e in rep.sparse)
        acc = evaluate(model, data.x_test, data.y_test)["test_acc"]
        acc_bn = evaluate(model, data.x_test, data.y_test)["test_acc"] if recalibrate_batchnorm(model, calib) else None
        row = {**cfg, "acc": acc, "acc_bn": acc_bn, "delta_vs_dense": acc - res["dense_acc"], "prune_s": dt,
               "prune_cpu_s": cpu_s, "load": load, "sparse_layers": len(rep.sparse), "all_nm": ok,
               "error_after": rep.mean("error_after"), "sequential": rep.settings.get("sequential")}
        if rc is not None:
            row["recon"] = rep.settings["reconstruct"]
        res["rows"].append(row)
        bn = f" bn {acc_bn:.2%}" if acc_bn is not None else ""
        print(f"{args.nm} {cfg['method']:<10} {cfg['mode']:<6} {cfg['extra'] or '':<8} top1 {acc:.2%}{bn} "
              f"({acc - res['dense_acc']:+.2%}) {dt:6.1f}s cpu {cpu_s:6.1f}s load {load:.1f}", flush=True)
        res["wall_s"] = time.perf_counter() - t_all
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
