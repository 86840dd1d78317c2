"""Markdown tables of docs/permute.md from the JSON results of experiments/permute_fmnist.py.

    python experiments/permute_tables.py docs/results/permute_fmnist_resnet.json docs/results/permute_fmnist_vit.json
    python experiments/permute_tables.py docs/results/permute_network_resnet.json docs/results/permute_network_vit.json
"""

from __future__ import annotations

import json
import sys


def pct(v):
    return "-" if v is None else f"{100 * v:.2f}"


def network_tables(path: str, r: dict) -> None:
    """Tables of an experiments/permute_network.py result."""
    print(f"\n#### {r['model']} ({path}), dense top-1 {pct(r['dense'])}%\n")
    ft = any("finetuned" in x for x in r["runs"])
    print("| N:M | method | permute | spaces permuted | calib. network error | top-1 one-shot |"
          + (" after one epoch |" if ft else "") + " prune s |")
    print("|---|---|---|---|---|---|" + ("---|" if ft else "") + "---|")
    for x in r["runs"]:
        def acc(key, sd):
            v = pct(x.get(key))
            return v if sd not in x else f"{v} (±{100 * x[sd]:.2f})"
        spaces = "-"
        if x["permute"]:
            spaces = f"{x['spaces_permuted']} of {len(x['spaces'])}"
            if (x["settings"].get("pruned_check") or {}).get("kept") == "unpermuted":
                spaces += " (guard: unpermuted kept)"
        print(f"| {x['nm']} | {x['method']} | {'yes' if x['permute'] else 'no'} | {spaces} | "
              f"{x['network_error']:.5f} | {acc('one_shot', 'paired_sd')} |"
              + (f" {acc('finetuned', 'finetuned_paired_sd')} |" if ft else "") + f" {x['prune_s']:.1f} |")
    if r.get("seeds"):
        print("\n2:4 magnitude, `prune(permute=True, seed=s)` (unpermuted: calib. network error "
              f"{r['seeds'][0].get('unpermuted_network_error', float('nan')):.5f}, top-1 "
              f"{pct(r['seeds'][0].get('unpermuted_one_shot'))}): " + "; ".join(
                  f"seed {x['seed']}: {x['spaces_permuted']} spaces, error {x['network_error']:.5f}, top-1 "
                  f"{pct(x['one_shot'])}" for x in r["seeds"]))
    for x in r["runs"]:
        if x["permute"] and x["method"] == "magnitude":
            print(f"\n{x['nm']} greedy steps (calib. network error before -> with the space's permutation): " + "; ".join(
                f"{s['size']} ch ({', '.join(s['searched'][:2])}{', ...' if len(s['searched']) > 2 else ''}): "
                f"{s['network_before']:.4f} -> {s['network_after']:.4f}" + (" rejected" if s["rejected"] else "")
                for s in x["spaces"] if s["network_before"] is not None))
        if x["permute"] and x["settings"].get("pruned_check"):
            c = x["settings"]["pruned_check"]
            print(f"\n{x['nm']} {x['method']} guard: pruned network error permuted {c['permuted']:.6f}, "
                  f"unpermuted {c['unpermuted']:.6f}: {c['kept']} kept")
    print(f"\nload average {r['loadavg_start'][0]:.1f} at start, {r.get('loadavg_end', [0])[0]:.1f} at end; "
          f"wall {r.get('wall_s', 0):.0f} s")


def main() -> None:
    for path in sys.argv[1:]:
        r = json.load(open(path))
        if r["runs"] and "network_error" in r["runs"][0]:
            network_tables(path, r)
            continue
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
