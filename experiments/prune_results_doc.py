"""Assemble docs/results/pruning.md from the narrative parts (experiments/prune_results_{head,mid,tail}.md)
and the JSON results in docs/results (tables rendered by prune_tables.py). Run from the repository root:

    python experiments/prune_results_doc.py > docs/results/pruning.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prune_tables import fmnist, minilm, summary  # noqa: E402

R = Path("docs/results")
MODELS = (("resnet", "ResNet"), ("vit", "ViT"))


def load(name):
    p = R / name
    return json.loads(p.read_text()) if p.exists() else None


def exact_vs_adam(results) -> str:
    """Rows comparing AdaPrune's two solvers on the same configurations."""
    out = []
    for label, res in results:
        rows = {}
        for r in res["part1"]:
            rows.setdefault((r["nm"], r["transposable"], r["calib"]), {})[r["method"]] = r
        for (nm, tr, k), d in rows.items():
            if "adaprune-exact" in d and "adaprune-adam" in d:
                e, a = d["adaprune-exact"], d["adaprune-adam"]
                out.append(f"| {label} | {nm}{' transposable' if tr else ''}, calib {k} | {e['error_after']:.5f} | "
                           f"{a['error_after']:.5f} | {100 * e['acc']:.2f} / {100 * a['acc']:.2f} | "
                           f"{e['prune_s']:.1f} s / {a['prune_s']:.1f} s |")
    return "\n".join(out)


def exact_vs_adam_minilm(main, adam) -> str:
    out = []
    if not (main and adam):
        return ""
    exact = {r["nm"]: r for r in main["runs"] if r["method"] == "adaprune-exact"}
    for a in adam["runs"]:
        e = exact.get(a["nm"])
        if e:
            out.append(f"| MiniLM | {a['nm']}, 128 sentences | {e['error_after']:.5f} | {a['error_after']:.5f} | "
                       f"cosine {e['cosine_mean']:.4f} / {a['cosine_mean']:.4f} | {e['prune_s']:.0f} s / "
                       f"{a['prune_s']:.0f} s |")
    return "\n".join(out)


HERE = Path(__file__).parent
head, mid, tail = ((HERE / f"prune_results_{p}.md").read_text() for p in ("head", "mid", "tail"))
parts = [head]
m = load("pruning_minilm.json")
m_adam = load("pruning_minilm_adam.json")
if m:
    parts.append(f"\nWall time of the run: {m['wall_s'] / 60:.0f} min ({len(m['runs'])} configurations; "
                 "calibration passes, pruning and evaluation).\n")
    parts.append(minilm(m) + "\n")
if m_adam:
    parts.append("AdaPrune with the paper's Adam solver (1000 iterations per layer, lr 1e-3 / 1e-2, batch 50), "
                 f"same sentences, run separately ({m_adam['wall_s'] / 60:.0f} min):\n")
    parts.append(minilm(m_adam) + "\n")
parts.append(mid)
part1 = []
for key, label in MODELS:
    p1, p2 = load(f"pruning_fmnist_{key}_part1.json"), load(f"pruning_fmnist_{key}_part2.json")
    if p1:
        part1.append((label, p1))
        parts.append(f"\n### {label}, part 1: dense -> N:M\n\nWall time: {p1['wall_s'] / 60:.0f} min. "
                     "In short (T = transposable; top-1 one-shot"
                     f"{' (+ BN)' if key == 'resnet' else ''} / after 1 epoch of fine-tuning), "
                     "100 calibration images:\n\n" + summary(p1, 100)
                     + "\n\n10 calibration images (one per class):\n\n" + summary(p1, 10)
                     + "\n\nAll configurations:\n\n" + fmnist(p1) + "\n")
    if p2:
        parts.append(f"\n### {label}, part 2: unstructured-sparse -> N:M (AdaPrune's \"switch structure\")\n\n"
                     f"Wall time: {p2['wall_s'] / 60:.0f} min.\n\n" + fmnist(p2) + "\n")
parts.append("""
Part 2 protocol: the dense net's pruned layers are cut to 50% / 75% unstructured sparsity by per-layer
magnitude ("one-shot" top-1), fine-tuned 1 epoch with that support frozen (the unstructured-sparse
starting point, "fine-tuned" top-1), then converted to N:M with the existing zeros respected (the
result's support is inside the unstructured one, so its density is at most min(N/M, unstructured
density)), by magnitude or by AdaPrune on 100 calibration images; then 1 epoch of fixed-mask fine-tuning.
""")
rows = "\n".join(r for r in (exact_vs_adam(part1), exact_vs_adam_minilm(m, m_adam)) if r)
damp = (R / "pruning_adaprune_damp.md").read_text().strip() if (R / "pruning_adaprune_damp.md").exists() else ""
parts.append(tail.replace("EXACT_VS_ADAM", rows).replace("DAMP_TABLE", damp))
print("\n".join(parts))
