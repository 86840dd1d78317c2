"""Greedy decoding with a LLaMA-architecture causal LM: dense vs ``nmsparse.to_nm_linear``, batch 1, KV cache.

A ``transformers`` ``LlamaForCausalLM`` with random weights (default hidden 2048, MLP 5632, 4 blocks,
16 heads, vocabulary 32000: the block shapes of TinyLlama-1.1B), every block Linear pruned to 2:4 by
magnitude (``lm_head`` and the embeddings stay dense), in fp32 and bf16. For each dtype the dense
pruned model and a copy converted by ``to_nm_linear`` (kernel chosen for this CPU, crossovers measured
at conversion unless ``--no-tune``) are timed interleaved (shuffled order per run): ``generate`` of
``--tokens`` new tokens (greedy, ``use_cache=True``) from a ``--prompt``-token prompt, and the prompt's
forward pass alone (prefill). Reported per thread count: tokens/s of each (median over runs), the
ratio dense_time / nmsparse_time per run (median [min, max]), prefill ms, whether the generated tokens
are identical (fp32 should be), the load average, and the CPU and kernel.

``--bandwidth`` also measures, on one thread and on ``--threads``' last count, the achieved read
bandwidth of the batch-1 product of the 5632x2048 MLP weight (bytes read / time: packed values + masks
for the kernel, the dense weight for ``F.linear``) next to a ``torch`` copy of a 256 MiB tensor
(bytes read + written / time): how close each is to the machine's memory speed. Each figure is the
fastest of ``--bw-reps`` interleaved calls (other work on a shared machine only ever adds time).
``--dtypes none`` skips the decode part.

``--haswell`` reruns the whole benchmark in a subprocess compiled for an AVX2 + FMA CPU without AVX-512
(``NUMBA_CPU_NAME=haswell``; torch's own kernels, MKL and oneDNN capped at AVX2 too): the AVX2 path
on an AVX-512 machine.

    python benchmarks/bench_decode.py --threads 1,2 --runs 3 --bandwidth
    python benchmarks/bench_decode.py --threads 1,2 --runs 3 --bandwidth --haswell
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import nmsparse
from nmsparse.kernels import NMLinear, cpu_nm, cpu_select

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def build(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                      num_hidden_layers=args.blocks, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=args.prompt + args.tokens + 8, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
                mod.weight.mul_(nmsparse.nm_mask(mod.weight, 2, 4))
    return model


@torch.inference_mode()
def generate(model, ids, tokens: int) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, use_cache=True,
                          pad_token_id=0)


@torch.inference_mode()
def prefill(model, ids) -> None:
    model(ids, use_cache=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summary(report) -> str:
    kinds: dict[str, int] = {}
    for e in report.layers:
        key = (f"{e.kernel} up to {e.crossover} rows" if e.converted else f"dense: {e.reason[:90]}")
        kinds[key] = kinds.get(key, 0) + 1
    return "; ".join(f"{v} x {k}" for k, v in kinds.items())


def run_dtype(args, base, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    dense = copy.deepcopy(base).to(dtype)
    nm = copy.deepcopy(dense)
    t0 = time.perf_counter()
    torch.set_num_threads(max(args.thread_counts))
    report = nmsparse.to_nm_linear(nm, 2, 4, kernel=args.kernel, tune=args.tune)
    conv_s = time.perf_counter() - t0
    print(f"\n## {dtype_name}: to_nm_linear in {conv_s:.1f} s ({max(args.thread_counts)} threads): {summary(report)}")
    ids = torch.randint(10, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    print("| threads | dense tok/s | nmsparse tok/s | dense/nmsparse time (median [min, max]) | prefill dense ms "
          "| prefill nmsparse ms | same tokens | load before / after |")
    print("|---:|---:|---:|---:|---:|---:|---|---|")
    for threads in args.thread_counts:
        torch.set_num_threads(threads)
        outs = {"dense": generate(dense, ids, args.tokens), "nm": generate(nm, ids, args.tokens)}  # warm-up
        same = torch.equal(outs["dense"], outs["nm"])
        before = load()
        gen = {"dense": [], "nm": []}
        pre = {"dense": [], "nm": []}
        ratios = []
        for r in range(args.runs):
            order = ["dense", "nm"]
            random.Random(r).shuffle(order)
            t = {}
            for k in order:
                mod = dense if k == "dense" else nm
                t[k] = timed(lambda: generate(mod, ids, args.tokens))
                gen[k].append(t[k])
            ratios.append(t["dense"] / t["nm"])
            for k in order:
                mod = dense if k == "dense" else nm
                pre[k].append(min(timed(lambda: prefill(mod, ids)) for _ in range(3)))
        tok = {k: args.tokens / statistics.median(v) for k, v in gen.items()}
        print(f"| {threads} | {tok['dense']:.2f} | {tok['nm']:.2f} | {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] | {statistics.median(pre['dense']) * 1e3:.0f} | "
              f"{statistics.median(pre['nm']) * 1e3:.0f} | {'yes' if same else 'no'} | {before} / {load()} |",
              flush=True)


@torch.inference_mode()
def bandwidth(args) -> None:
    """Achieved bandwidth of batch-1 products and of a 256 MiB copy."""
    out_f, in_f = args.mlp, args.hidden
    src = torch.empty(64 << 20, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    print(f"\n## bandwidth: batch-1 product of a {out_f}x{in_f} 2:4 weight vs a 256 MiB torch copy "
          "(GB/s = 1e9 bytes/s; the copy counts bytes read + written)")
    print("| threads | dtype | dense F.linear GB/s (read) | N:M kernel GB/s (read) | dense time / kernel time "
          "| copy GB/s | load |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for threads in sorted({1, max(args.thread_counts)}):
        torch.set_num_threads(threads)
        for name, dtype in DTYPES.items():
            w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
            w = (w * nmsparse.nm_mask(w, 2, 4)).to(dtype)
            lin = torch.nn.Linear(in_f, out_f, bias=False).to(dtype)
            lin.weight.data = w
            mod = NMLinear.from_linear(lin, 2, 4, crossover=1, kernel=args.kernel)
            x = torch.randn(1, in_f).to(dtype)
            packed = sum(t.numel() * t.element_size() for t in (mod.values, mod.masks)) + x.numel() * 4
            dense_b = w.numel() * w.element_size()
            td, tk, tc = [], [], []
            mod(x), F.linear(x, w), dst.copy_(src)
            for i in range(args.bw_reps):
                td.append(timed(lambda: F.linear(x, w)))
                tk.append(timed(lambda: mod(x)))
                if i % 4 == 0:
                    tc.append(timed(lambda: dst.copy_(src)))
            d, k, c = min(td), min(tk), min(tc)  # the least disturbed call of each (a shared machine)
            print(f"| {threads} | {name} | {dense_b / d / 1e9:.1f} | {packed / k / 1e9:.1f} | {d / k:.2f} | "
                  f"{2 * src.numel() * 4 / c / 1e9:.1f} | {load()} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=5632)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per generate")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--kernel", default=None, help="auto (default), avx512, avx2, dense")
    ap.add_argument("--no-tune", dest="tune", action="store_false", help="fixed default crossovers (no timing)")
    ap.add_argument("--bandwidth", action="store_true")
    ap.add_argument("--bw-reps", type=int, default=20)
    ap.add_argument("--haswell", action="store_true",
                    help="rerun in a subprocess compiled for haswell (AVX2+FMA, no AVX-512), torch capped at AVX2")
    args = ap.parse_args()
    if args.haswell:
        argv = [a for a in sys.argv[1:] if a != "--haswell"]
        env = {**os.environ, **cpu_select.haswell_env()}
        sys.exit(subprocess.run([sys.executable, __file__, *argv], env=env).returncode)
    args.thread_counts = [int(t) for t in args.threads.split(",")]
    cpu = cpu_select.host_cpu()
    path = cpu_select.choose(4, torch.float32, args.kernel).path
    print(f"# decode benchmark: CPU {cpu.name} ({cpu.isa()}), numba kernel for 2:4 fp32: {path}; torch "
          f"{torch.__version__} (ATen CPU capability {torch.backends.cpu.get_cpu_capability()}); "
          f"LLaMA hidden {args.hidden}, MLP {args.mlp}, {args.blocks} blocks, {args.heads} heads, vocab {args.vocab}; "
          f"prompt {args.prompt} tokens, {args.tokens} new tokens, batch 1; runs {args.runs}; load {load()}")
    base = build(args) if args.dtypes != "none" else None
    for name in args.dtypes.split(","):
        if name != "none":
            run_dtype(args, base, name)
    if args.bandwidth:
        bandwidth(args)


if __name__ == "__main__":
    main()
