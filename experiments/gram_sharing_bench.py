"""CPU time of one calibration pass with and without Gram sharing, on block 0 of the 1.1B LLaMA.

Runs ``nmsparse.calibration.collect.collect`` for the groups of layers that read one input tensor (q/k/v;
gate/up) of block 0 of the model written by ``prune_llama_1b.py make``, on the same calibration hidden
states (random token ids; the time does not depend on them), once with ``share=True`` (one Gram matrix per
group) and once without (one per layer), alternating, ``--reps`` times; checks the Gram matrices are
bit-identical and records CPU seconds (``time.process_time``, one torch thread by default).

    nice -n 19 python experiments/gram_sharing_bench.py --folder /tmp/llama1b --samples 128 --seqlen 512 \\
        --reps 2 --json docs/results/gram_sharing_1b.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from nmsparse.calibration import collect as calibration
    from nmsparse.pruning.blockwise import _Runner
    from nmsparse.calibration.geometry import LayerGeometry
    from nmsparse.calibration.streaming import BlockStream

    stream = BlockStream(args.folder, AutoModelForCausalLM)
    vocab = stream.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.samples, args.seqlen), generator=g)
    calib = [ids[i:i + args.batch] for i in range(0, args.samples, args.batch)]
    items = [{"block_kwargs": kw} for kw in stream.iter_block_inputs(calib)]
    stream.drop_shell()
    runner = _Runner(stream.load_block(0)).eval()
    mods = dict(runner.named_modules())
    groups = {"q/k/v": ["block.self_attn.q_proj", "block.self_attn.k_proj", "block.self_attn.v_proj"],
              "gate/up": ["block.mlp.gate_proj", "block.mlp.up_proj"]}
    runs = []
    for rep in range(args.reps):
        for gname, names in groups.items():
            grams = {}
            for share in ((True, False) if rep % 2 == 0 else (False, True)):
                cols = {k: calibration.LayerCollector(LayerGeometry(mods[k], "channels"), torch.device("cpu"))
                        for k in names}
                load = os.getloadavg()
                c0, t0 = time.process_time(), time.perf_counter()
                calibration.collect(runner, cols, items, share=share)
                cpu, wall = time.process_time() - c0, time.perf_counter() - t0
                grams[share] = [cols[k].grams[0].H for k in names]
                distinct = len({id(c) for c in cols.values()})
                runs.append({"rep": rep, "group": gname, "share": share, "cpu_s": cpu, "wall_s": wall,
                             "gram_matrices": distinct, "load_before": load})
                print(json.dumps(runs[-1]), flush=True)
            same = all(torch.equal(a, b) for a, b in zip(grams[True], grams[False]))
            runs[-1]["bit_identical_to_other"] = runs[-2]["bit_identical_to_other"] = same
            if not same:
                raise SystemExit(f"{gname}: shared and unshared Gram matrices differ")
    result = {"folder": str(args.folder), "samples": args.samples, "seqlen": args.seqlen, "batch": args.batch,
              "torch_threads": args.threads, "runs": runs, "load_after": os.getloadavg()}
    for gname in groups:
        for share in (True, False):
            cpus = [r["cpu_s"] for r in runs if r["group"] == gname and r["share"] == share]
            result[f"{gname} {'shared' if share else 'one per layer'} cpu_s"] = cpus
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
