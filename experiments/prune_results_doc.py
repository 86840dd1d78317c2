"""Assemble docs/results/pruning.md from the narrative parts (experiments/prune_results_{head,mid,tail}.md)
and the JSON results in docs/results (tables rendered by prune_tables.py). Run from the repository root:

    python experiments/prune_results_doc.py > docs/results/pruning.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prune_tables import fmnist, minilm  # noqa: E402

R = Path("docs/results")


def load(name):
    p = R / name
    return json.loads(p.read_text()) if p.exists() else None


def exact_vs_adam(res) -> str:
    rows = {}
    for r in res["part1"]:
        key = (r["nm"], r["transposable"], r["calib"])
        rows.setdefault(key, {})[r["method"]] = r
    out = []
    for (nm, tr, k), d in rows.items():
        if "adaprune-exact" in d and "adaprune-adam" in d:
            e, a = d["adaprune-exact"], d["adaprune-adam"]
            out.append(f"| {nm}{' transposable' if tr else ''}, calib {k} | {e['error_after']:.5f} (top-1 "
                       f"{100 * e['acc']:.2f}) | {a['error_after']:.5f} (top-1 {100 * a['acc']:.2f}) | "
                       f"{e['prune_s']:.1f} s / {a['prune_s']:.1f} s |")
    return "\n".join(out)


HERE = Path(__file__).parent
head, mid, tail = ((HERE / f"prune_results_{p}.md").read_text() for p in ("head", "mid", "tail"))
parts = [head]
m = load("pruning_minilm.json")
if m:
    parts.append(f"\nWall time of the run: {m['wall_s'] / 60:.0f} min ({len(m['runs'])} configurations; "
                 "calibration passes, pruning and evaluation).\n")
    parts.append(minilm(m) + "\n")
parts.append(mid)
c100 = load("pruning_fmnist_resnet_calib100.json")
for title, name in (("Part 1, 100 calibration images", "pruning_fmnist_resnet_calib100.json"),
                    ("Part 1, 10 calibration images (one per class), no fine-tuning", "pruning_fmnist_resnet_calib10.json"),
                    ("Part 2: from unstructured-sparse to N:M (AdaPrune's \"switch structure\")",
                     "pruning_fmnist_resnet_part2.json")):
    res = load(name)
    if res:
        parts.append(f"\n### {title}\n\nWall time: {res['wall_s'] / 60:.0f} min.\n\n" + fmnist(res) + "\n")
parts.append("""
Part 2 protocol: the dense ResNet's pruned layers are cut to 50% / 75% unstructured sparsity by
per-layer magnitude ("one-shot" top-1), fine-tuned 1 epoch on 2,000 images with that support frozen
(the unstructured-sparse starting point, "fine-tuned" top-1), then converted to N:M with the existing
zeros respected (`keep_zeros=True`: the result's support is inside the unstructured one, so its
density is at most min(N/M, unstructured density)), without further training.
""")
parts.append(tail.replace("EXACT_VS_ADAM", exact_vs_adam(c100) if c100 else ""))
print("\n".join(parts))
