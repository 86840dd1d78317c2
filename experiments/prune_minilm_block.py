"""Sequential calibration and block-wise reconstruction on all-MiniLM-L6-v2 (issue 21, items 1 and 2).

The setup of ``experiments/prune_minilm.py`` (the same weights, the same stdlib-docstring sentences,
calibration and evaluation sets drawn the same way, the same metric: mean cosine of mean-pooled
sentence embeddings to the dense model's on held-out sentences), all 36 encoder Linears pruned.

``time``: the wall time of ``prune`` with whole-model passes per layer group (``sequential=False``,
the path before issue 21) and block by block (``sequential=True``), for Wanda and SparseGPT,
interleaved (the order alternates between repetitions), in one process; checks that both give the
same weights. ``table``: every method x {layer, block} reconstruction (``reconstruct="block"``),
cosine and pruning time; ``--recon`` sets the BlockReconstruct options (``key=value,...``).

    python experiments/prune_minilm_block.py time --reps 5 --out docs/results/minilm_sequential_time.json
    python experiments/prune_minilm_block.py table --nm 2:4 --out docs/results/minilm_block_recon.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import nmsparse  # noqa: E402
from prune_minilm import batches, compare, embed, load_minilm, pick, stdlib_sentences  # noqa: E402

METHODS = {
    "magnitude": nmsparse.Magnitude(),
    "wanda": nmsparse.Wanda(),
    "sparsegpt": nmsparse.SparseGPT(),
    "adaprune": nmsparse.AdaPrune(),
}


def setup(args):
    calib_pool, eval_pool = stdlib_sentences()
    calib_s = pick(calib_pool, args.calib, args.seed)
    eval_s = pick(eval_pool, args.eval, args.seed + 1)
    dense, tok = load_minilm()
    calib = batches(tok, calib_s, args.batch, 128)
    return dense, tok, calib, eval_s


def _parse_recon(text: str | None) -> nmsparse.BlockReconstruct:
    kw = {}
    for part in (text or "").split(","):
        if part.strip():
            k, v = part.split("=")
            cur = getattr(nmsparse.BlockReconstruct, k)
            kw[k] = type(cur)(v) if not isinstance(cur, bool) else v.lower() in ("1", "true", "yes")
    return nmsparse.BlockReconstruct(**kw)


def run_time(args) -> dict:
    dense, tok, calib, _ = setup(args)
    runs = []
    for rep in range(args.reps):
        for method in args.methods.split(","):
            order = [False, True] if rep % 2 == 0 else [True, False]
            weights = {}
            for sequential in order:
                model = copy.deepcopy(dense)
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                nmsparse.prune(model, *args.nm_pair, method=METHODS[method], calib=calib, include="encoder.*",
                               keep_dense=(), sequential=sequential)
                dt = time.perf_counter() - t0
                weights[sequential] = model.state_dict()
                runs.append({"rep": rep, "method": method, "sequential": sequential, "prune_s": dt, "load": load})
                print(f"rep {rep} {method:<10} sequential={sequential!s:<5} {dt:6.2f}s (load {load:.1f})", flush=True)
            same = all(torch.equal(weights[False][k], weights[True][k]) for k in weights[False])
            runs[-1]["same_weights"] = runs[-2]["same_weights"] = same
            if not same:
                print("  WEIGHTS DIFFER", flush=True)
    summary = {}
    for method in args.methods.split(","):
        for sequential in (False, True):
            t = [r["prune_s"] for r in runs if r["method"] == method and r["sequential"] == sequential]
            summary[f"{method} sequential={sequential}"] = {"median": statistics.median(t), "min": min(t),
                                                            "max": max(t)}
        a = [r["prune_s"] for r in runs if r["method"] == method and not r["sequential"]]
        b = [r["prune_s"] for r in runs if r["method"] == method and r["sequential"]]
        summary[f"{method} speed-up"] = statistics.median(x / y for x, y in zip(a, b))
    for k, v in summary.items():
        print(k, v)
    return {"runs": runs, "summary": summary}


def run_table(args) -> dict:
    dense, tok, calib, eval_s = setup(args)
    dense_emb = embed(dense, tok, eval_s)
    recon = _parse_recon(args.recon)
    rows = []
    for method in args.methods.split(","):
        for mode in args.modes.split(","):
            model = copy.deepcopy(dense)
            opt = METHODS[method]
            if method == "sparsegpt" and args.damp is not None:
                opt = nmsparse.SparseGPT(damp=args.damp)
            t0 = time.perf_counter()
            rep = nmsparse.prune(model, *args.nm_pair, method=opt, calib=calib, include="encoder.*", keep_dense=(),
                                 reconstruct=recon if mode == "block" else None)
            dt = time.perf_counter() - t0
            row = {"nm": args.nm, "method": method, "reconstruct": mode, "prune_s": dt,
                   "load": os.getloadavg()[0], **compare(embed(model, tok, eval_s), dense_emb)}
            if mode == "block":
                row["recon"] = rep.settings["reconstruct"]
            rows.append(row)
            print(f"{args.nm} {method:<10} {mode:<6} cos {row['cosine_mean']:.4f} knn10 {row['knn10_agreement']:.3f} "
                  f"{dt:6.1f}s (load {row['load']:.1f})", flush=True)
            if args.out:
                _write(args, {"rows": rows})
    return {"rows": rows}


def _write(args, body: dict) -> None:
    out = {"command": " ".join(sys.argv), "cpu": "AMD EPYC (znver5)", "torch_threads": torch.get_num_threads(),
           "calibration_sentences": args.calib, "evaluation_sentences": args.eval, **body}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("time", "table"))
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--nm", default="2:4")
    ap.add_argument("--methods", default=None)
    ap.add_argument("--modes", default="layer,block")
    ap.add_argument("--recon", default=None, help="BlockReconstruct options, key=value,...")
    ap.add_argument("--damp", type=float, default=None, help="SparseGPT dampening")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.nm_pair = tuple(int(v) for v in args.nm.split(":"))
    if args.methods is None:
        args.methods = "wanda,sparsegpt" if args.what == "time" else ",".join(METHODS)
    body = run_time(args) if args.what == "time" else run_table(args)
    if args.out:
        _write(args, body)


if __name__ == "__main__":
    main()
