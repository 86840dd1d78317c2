"""Markdown tables of docs/permute.md from the JSON results of experiments/permute_fmnist.py.

    python experiments/permute_tables.py docs/results/permute_fmnist_resnet.json docs/results/permute_fmnist_vit.json
"""

from __future__ import annotations

import json
import sys


def pct(v):
    return "-" if v is None else f"{100 * v:.2f}"


def main() -> None:
    for path in sys.argv[1:]:
        r = json.load(open(path))
        print(f"\n### {r['model']} ({path}), dense top-1 {pct(r['dense'])}%, {r['test_images']} test images\n")
        nms = list(r["kept"])
        print("| layer | shape | " + " | ".join(f"{nm} kept before | {nm} after | {nm} search s" for nm in nms) + " |")
        print("|---|---|" + "---|---|---|" * len(nms))
        first = r["kept"][nms[0]]["layers"]
        for i, e in enumerate(first):
            if not e["sparse"]:
                continue
            cells = []
            for nm in nms:
                x = r["kept"][nm]["layers"][i]
                s = "-" if x["search_s"] is None else f"{x['search_s']:.2f}" + (" (exact)" if x["exact"] else "")
                after = f"{x['kept_after']:.4f}" if x["status"] == "permuted" else f"{x['kept_after']:.4f} ({x['status']})"
                cells.append(f"{x['kept_before']:.4f} | {after} | {s}")
            print(f"| {e['param']} | {'x'.join(map(str, e['shape']))} | " + " | ".join(cells) + " |")
        tot = [f"{r['kept'][nm]['kept_total_before']:.4f} | {r['kept'][nm]['kept_total_after']:.4f} | "
               f"{r['kept'][nm]['time_s']:.1f} (all)" for nm in nms]
        print("| **total** | | " + " | ".join(tot) + " |")
        unperm = {e["param"]: e["reason"] for e in first if e["sparse"] and e["status"] == "unpermuted"}
        if unperm:
            print("\nUnpermuted sparse layers: " + "; ".join(f"`{k}`: {v}" for k, v in unperm.items()))
        print("\n| N:M | method | permute | mean kept \\|w\\| | top-1 one-shot | after fine-tuning | prune s |")
        print("|---|---|---|---|---|---|---|")
        for x in r["runs"]:
            print(f"| {x['nm']} | {x['method']} | {'yes' if x['permute'] else 'no'} | {x['mean_kept_abs']:.4f} | "
                  f"{pct(x['one_shot'])} | {pct(x.get('finetuned'))} | {x['prune_s']:.1f} |")
        print(f"\nload average {r['loadavg_start'][0]:.1f} at start, {r.get('loadavg_end', [0])[0]:.1f} at end; "
              f"wall {r.get('wall_s', 0):.0f} s")


if __name__ == "__main__":
    main()
