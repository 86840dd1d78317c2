"""Render the JSON results of experiments/prune_minilm.py and prune_fmnist.py as markdown tables.

    python experiments/prune_tables.py docs/results/pruning_minilm.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def minilm(res: dict) -> str:
    lines = ["| N:M | method | mean cosine to dense | min cosine | top-10 NN agreement | mean layer error before -> after | prune time |",
             "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        t = " (transposable)" if r.get("transposable") else ""
        lines.append(f"| {r['nm']}{t} | {r['method']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.3f} | "
                     f"{r['knn10_agreement']:.3f} | {r['error_before']:.4f} -> {r['error_after']:.4f} | {r['prune_s']:.0f} s |")
    return "\n".join(lines)


def fmnist(res: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    out = [f"dense top-1: {pct(res['dense_acc'])}% on {res['test_images']} test images", ""]
    if res["part1"]:
        bn = any(r.get("acc_bn") is not None for r in res["part1"])
        head = ["N:M", "transposable", "calib", "method", "top-1 one-shot"] + (["+ BN"] if bn else []) + [
            "after 1 epoch fine-tune", "mean layer error", "prune time"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in res["part1"]:
            cells = [r["nm"], "yes" if r["transposable"] else "no", str(r["calib"]), r["method"], pct(r["acc"])]
            cells += [pct(r.get("acc_bn"))] if bn else []
            cells += [pct(r["acc_ft"]), f"{r['error_after']:.4f}", f"{r['prune_s']:.1f} s"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if res["part2"]:
        bn = any(r.get("acc_bn") is not None for r in res["part2"])
        head = ["from unstructured", "its top-1 (one-shot / fine-tuned)", "to N:M", "method", "density",
                "top-1 one-shot"] + (["+ BN"] if bn else []) + ["after 1 epoch fine-tune", "mean layer error"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in res["part2"]:
            cells = [f"{100 * r['unstructured_sparsity']:.0f}%",
                     f"{pct(r['unstructured_acc_oneshot'])} / {pct(r['unstructured_acc'])}", r["nm"], r["method"],
                     f"{r['density']:.3f}", pct(r["acc"])]
            cells += [pct(r.get("acc_bn"))] if bn else []
            cells += [pct(r["acc_ft"]), f"{r['error_after']:.4f}"]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def summary(res: dict, calib: int = 100) -> str:
    """One compact table: per method, plain and transposable 2:4 / 4:8 at ``calib`` images,
    'one-shot (+ BN) / fine-tuned' top-1."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    cols = [(nm, tr) for nm in ("2:4", "4:8") for tr in (False, True)]
    rows: dict[str, dict] = {}
    for r in res["part1"]:
        if r["calib"] == calib:
            rows.setdefault(r["method"], {})[(r["nm"], r["transposable"])] = r
    head = ["method"] + [f"{nm}{' T' if tr else ''}" for nm, tr in cols]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, d in rows.items():
        cells = [method]
        for c in cols:
            r = d.get(c)
            if r is None:
                cells.append("-")
                continue
            one = pct(r["acc"]) + (f" ({pct(r['acc_bn'])})" if r.get("acc_bn") is not None else "")
            cells.append(f"{one} / {pct(r['acc_ft'])}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        res = json.load(open(path))
        print(f"<!-- {path} -->")
        print(minilm(res) if "runs" in res else fmnist(res))
        print()
