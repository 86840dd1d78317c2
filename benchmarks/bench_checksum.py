"""Throughput of nmsparse.plumbing.checksum against memory bandwidth (issue 19: verify at close to memory speed).

    PYTHONPATH=src python benchmarks/bench_checksum.py [--mb 512] [--rounds 5]

Per round, interleaved: ``sign`` (SHA-256 of every tensor, on several threads), ``tensor_digest`` of
one tensor on one thread, a plain copy of the same bytes (``torch.cat`` into a preallocated buffer:
read + write, the memory-speed yardstick), and loading the file from the page cache with
``safe_open``/``get_tensor`` (what the reader does) against ``nmsparse.plumbing.io.read_safetensors`` (the same load plus the
checksum; safetensors maps the file, so the first alone reads no bytes). Prints median [min, max] MB/s of the tensor bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from nmsparse.plumbing import checksum


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    per = 16 << 20  # 16 MB tensors, like a model's larger layers
    tensors = {f"w{i}": torch.randn(per // 4) for i in range(max(1, (args.mb << 20) // per))}
    total = sum(t.numel() * 4 for t in tensors.values())
    flat = torch.empty(total // 4)
    one = next(iter(tensors.values()))
    rates: dict[str, list[float]] = {"sign (threads)": [], "one tensor, 1 thread": [], "copy (memory)": [],
                                     "load, mmap only": [], "load + verify": []}
    import tempfile

    from safetensors import safe_open

    from nmsparse.plumbing.io import read_safetensors
    from nmsparse.plumbing.writing import save_safetensors

    path = os.path.join(tempfile.mkdtemp(), "bench.safetensors")
    save_safetensors(path, tensors)
    for _ in range(args.rounds):
        t = time.perf_counter()
        checksum.sign(tensors)
        rates["sign (threads)"].append(total / (time.perf_counter() - t) / 1e6)
        t = time.perf_counter()
        checksum.tensor_digest(one)
        rates["one tensor, 1 thread"].append(one.numel() * 4 / (time.perf_counter() - t) / 1e6)
        t = time.perf_counter()
        torch.cat(list(tensors.values()), out=flat)
        rates["copy (memory)"].append(total / (time.perf_counter() - t) / 1e6)
        t = time.perf_counter()
        with safe_open(path, "pt") as f:  # read_safetensors' reading, without the check (page cache warm)
            {k: f.get_tensor(k) for k in f.keys()}
        rates["load, mmap only"].append(total / (time.perf_counter() - t) / 1e6)
        t = time.perf_counter()
        read_safetensors(path)  # what nmsparse prune/export --checkpoint do
        rates["load + verify"].append(total / (time.perf_counter() - t) / 1e6)
    os.unlink(path)
    print(f"{total / 1e6:.0f} MB in {len(tensors)} tensors, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    for k, v in rates.items():
        print(f"{k:>22}: {statistics.median(v):7.0f} MB/s  [{min(v):.0f}, {max(v):.0f}]")


if __name__ == "__main__":
    main()
