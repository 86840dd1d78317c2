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
        print("\n| N:M | method | permute | spaces permuted | mean kept \\|w\\| | mean calib. error | top-1 one-shot | "
              "after fine-tuning | prune s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for x in r["runs"]:
            def acc(key, sd):
                v = pct(x.get(key))
                return v if sd not in x else f"{v} (±{100 * x[sd]:.2f})"
            print(f"| {x['nm']} | {x['method']} | {x['permute']} | {x.get('spaces_permuted', '-')} | "
                  f"{x['mean_kept_abs']:.4f} | {x['mean_error_after']:.4f} | {acc('one_shot', 'paired_sd')} | "
                  f"{acc('finetuned', 'finetuned_paired_sd')} | {x['prune_s']:.1f} |")
        if r.get("seeds"):
            print("\n2:4 magnitude one-shot with other search seeds (accept=score): "
                  + "; ".join(f"seed {x['seed']}: kept {x['kept_total'][1]:.4f}, calib. error "
                              f"{x['mean_error_after']:.4f}, top-1 {pct(x['one_shot'])}" for x in r["seeds"]))
        for nm, spaces in r.get("spaces", {}).items():
            print(f"\n{nm} accept=error, per searched space (kept score before -> after; summed calibration output "
                  "error before -> after): " + "; ".join(
                      f"{s['size']} ch ({', '.join(s['searched'][:2])}{', ...' if len(s['searched']) > 2 else ''}): "
                      + (f"{s['before']:.3f} -> {s['after']:.3f}; " if s['before'] is not None else "")
                      + (f"{s['error_before']:.4f} -> {s['error_after']:.4f}" if s['error_before'] is not None
                         else "identity") + (" REJECTED" if s['rejected'] else "")
                      for s in spaces))
        print(f"\nload average {r['loadavg_start'][0]:.1f} at start, {r.get('loadavg_end', [0])[0]:.1f} at end; "
              f"wall {r.get('wall_s', 0):.0f} s")


if __name__ == "__main__":
    main()
