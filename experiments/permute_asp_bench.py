"""Our channel-permutation search against NVIDIA ASP's, on the same layers (2:4, its only N:M).

ASP's search (apex/contrib/sparsity/permutation_search_kernels: ``Exhaustive_Search`` with its
defaults, windows of 2 stripes = 8 channels, 100 escape attempts) is read from a local clone of
NVIDIA/apex (``--apex``) and imported from a temporary folder; nothing of it is copied into this
repository. Without its CUDA extension it runs its numpy CPU path. Both searches get the same
importance matrix |w| of shape (output channels x kernel positions, input channels); the figure is
the kept fraction of sum |w| after 2:4 and the wall time, interleaved over ``--rounds`` rounds.

    git clone https://github.com/NVIDIA/apex /tmp/apex   # or any checkout
    python experiments/permute_asp_bench.py --apex /tmp/apex --checkpoint runs/fm2_resnet/final.safetensors \\
        --out docs/results/permute_asp.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nmsparse.permute import kept, search_permutation
from nmsparse.cli.prune import read_checkpoint
from nmsparse.training.checkpoint import atomic_write
from nmsparse.training.models import build_model

PKG = "apex/contrib/sparsity/permutation_search_kernels"


def load_asp(apex: str, tmp: str):
    """Import ASP's permutation search package from a copy in ``tmp`` (a work tree or a bare git dir)."""
    dst = Path(tmp) / "asp_search"
    src = Path(apex) / PKG
    if src.is_dir():
        shutil.copytree(src, dst)
    else:  # a bare mirror: read the files from git
        dst.mkdir()
        names = subprocess.run(["git", "-C", apex, "ls-tree", "--name-only", "HEAD", PKG + "/"], check=True,
                               capture_output=True, text=True).stdout.split()
        for name in names:
            if name.endswith(".py"):
                text = subprocess.run(["git", "-C", apex, "show", f"HEAD:{name}"], check=True, capture_output=True,
                                      text=True).stdout
                (dst / Path(name).name).write_text(text)
    sys.path.insert(0, tmp)
    with contextlib.redirect_stdout(io.StringIO()):
        mod = importlib.import_module("asp_search.exhaustive_search")
        importlib.import_module("asp_search.permutation_utilities").use_gpu(initial_override=False)
    if not hasattr(mod, "time"):  # its module uses time.perf_counter without importing time (apex gets it elsewhere)
        mod.time = time
    return mod


def score_of(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().double().abs()
    return w.movedim(1, -1).reshape(-1, w.shape[1]) if w.dim() > 2 else w


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--apex", required=True, help="a clone (or bare mirror) of NVIDIA/apex")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--layers", default="layers.0.0.conv2,layers.1.0.shortcut.0,layers.1.0.conv2,layers.2.0.shortcut.0")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    tensors, src = read_checkpoint(str(Path(args.checkpoint).resolve()))
    model = build_model(src["model"])
    model.load_state_dict(tensors)
    mods = dict(model.named_modules())
    out_path = Path(args.out).resolve()
    apex = str(Path(args.apex).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # ASP caches its list of permutations in ./.cache
        asp = load_asp(apex, tmp)
        search_permutation(score_of(mods[args.layers.split(",")[0]].weight), 2, 4)  # compile once, not timed
        rows = {name: {"asp_s": [], "ours_s": [], "ours_local_s": []} for name in args.layers.split(",")}
        for _ in range(args.rounds):
            for name in rows:
                s = score_of(mods[name].weight)
                r = rows[name]
                r["shape"], r["identity"] = list(s.shape), kept(s, None, 2, 4) / float(s.sum())
                np.random.seed(0)
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    _, _, perm = asp.Exhaustive_Search(s.numpy().copy(), stripe_group_size=8, escape_attempts=100)
                r["asp_s"].append(time.perf_counter() - t0)
                r["asp"] = kept(s, torch.tensor(perm), 2, 4) / float(s.sum())
                t0 = time.perf_counter()
                res = search_permutation(s, 2, 4)
                r["ours_s"].append(time.perf_counter() - t0)
                r["ours"], r["ours_exact"] = res.after / float(s.sum()), res.exact
                t0 = time.perf_counter()
                res = search_permutation(s, 2, 4, search="local")
                r["ours_local_s"].append(time.perf_counter() - t0)
                r["ours_local"] = res.after / float(s.sum())
                print(name, json.dumps({k: v for k, v in r.items()}), flush=True)
    for r in rows.values():
        for k in ("asp_s", "ours_s", "ours_local_s"):
            r[k + "_median"] = statistics.median(r[k])
    out = {"checkpoint": args.checkpoint, "loadavg": os.getloadavg(), "rounds": args.rounds, "layers": rows}
    atomic_write(out_path, lambda f: f.write((json.dumps(out, indent=1) + "\n").encode()))


if __name__ == "__main__":
    main()
