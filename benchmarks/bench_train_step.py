"""Training-step time of N:M sparse training over dense, for the ResNet at batch 128 on this CPU.

Not a test: prints the time per step of dense, SR-STE 2:4 (masks recomputed every step) and, when
:func:`nmsparse.sparsify` supports it, transposable 2:4 with masks recomputed every 40 steps, and the
ratios over dense (targets: <= 1.10 and <= 1.15). Configurations are timed in interleaved rounds
(dense, sparse, transposable, dense, ...) and the median per configuration is reported, so load
from other processes on the machine hits all of them alike.

    python benchmarks/bench_train_step.py [--threads T] [--rounds R] [--steps K] [--model resnet]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import nmsparse
from nmsparse.training.config import sparsify_supports_transposable
from nmsparse.training.loop import configure_threads
from nmsparse.training.models import build_model


def make(kind: str, model_name: str):
    torch.manual_seed(0)
    model = build_model(model_name)
    if kind == "srste 2:4":
        nmsparse.sparsify(model, 2, 4, method="srste", decay=2e-4)
    elif kind == "transposable 2:4 /40":
        nmsparse.sparsify(model, 2, 4, method="srste", decay=2e-4, update_every=40, transposable=True,
                          mask_method="approx")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)
    return model, opt


def step(model, opt, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10, help="steps per configuration per round")
    args = ap.parse_args()
    configure_threads(args.threads)  # as nmsparse train does (keeps numba from resetting torch's count)
    kinds = ["dense", "srste 2:4"]
    if sparsify_supports_transposable():
        kinds.append("transposable 2:4 /40")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    runs = {k: make(k, args.model) for k in kinds}
    for k in kinds:  # warm-up: numba compilation, allocator, oneDNN primitive caches
        for _ in range(5):
            step(*runs[k], x, y)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for k in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(*runs[k], x, y)
            times[k].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    load = os.getloadavg()[0]
    print(f"{args.model}, batch {args.batch}, torch threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds x {args.steps} steps, load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'configuration':<22}{'ms/step':>9}{'vs dense':>10}{'target':>8}")
    targets = {"srste 2:4": 1.10, "transposable 2:4 /40": 1.15}
    for k in kinds:
        ratio = med[k] / med["dense"]
        t = f"{targets[k]:.2f}" if k in targets else "-"
        print(f"{k:<22}{med[k] * 1e3:>9.1f}{ratio:>10.3f}{t:>8}")
    if not sparsify_supports_transposable():
        print("transposable: not measured (this nmsparse.sparsify takes no transposable= argument)")


if __name__ == "__main__":
    main()
