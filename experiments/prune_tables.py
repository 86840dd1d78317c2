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
        out += ["| N:M | transposable | calib | method | top-1 one-shot | one-shot + BN re-estimated | after fine-tune | mean layer error | prune time |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in res["part1"]:
            out.append(f"| {r['nm']} | {'yes' if r['transposable'] else 'no'} | {r['calib']} | {r['method']} | "
                       f"{pct(r['acc'])} | {pct(r.get('acc_bn'))} | {pct(r['acc_ft'])} | {r['error_after']:.4f} | "
                       f"{r['prune_s']:.1f} s |")
        out.append("")
    if res["part2"]:
        out += ["| from unstructured | its top-1 (one-shot / fine-tuned) | to N:M | method | density | top-1 one-shot | + BN re-estimated | after fine-tune |",
                "|---|---|---|---|---|---|---|---|"]
        for r in res["part2"]:
            out.append(f"| {100 * r['unstructured_sparsity']:.0f}% | {pct(r['unstructured_acc_oneshot'])} / "
                       f"{pct(r['unstructured_acc'])} | {r['nm']} | {r['method']} | {r['density']:.3f} | "
                       f"{pct(r['acc'])} | {pct(r.get('acc_bn'))} | {pct(r['acc_ft'])} |")
    return "\n".join(out)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        res = json.load(open(path))
        print(f"<!-- {path} -->")
        print(minilm(res) if "runs" in res else fmnist(res))
        print()
