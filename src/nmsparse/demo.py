"""``nmsparse demo``: a short, real run on scikit-learn's ``digits`` (8x8 images, 10 classes).

Trains a small CNN dense and SR-STE N:M sparse for the same number of steps and prints test
accuracy, the sparse model's layer report and its SAD against the initial mask.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import nmsparse
import nmsparse.nmmasks


def digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (x_train, y_train, x_test, y_test); x is (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    tr, te = perm[:cut], perm[cut:]
    return x[tr], y[tr], x[te], y[te]


def small_cnn() -> nn.Module:
    """A CNN for 8x8 inputs whose inner layers have 16/32 channels, so 2:4 .. 8:16 all fit."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def run(n: int, m: int, steps: int, seed: int) -> None:
    xtr, ytr, xte, yte = digits_tensors(seed)
    results = []
    for label in ("dense", f"SR-STE {n}:{m}"):
        torch.manual_seed(seed)
        model = small_cnn()
        tracker = None
        if label != "dense":
            report = nmsparse.sparsify(model, n, m, method="srste")
            print(report, "\n")
            tracker = nmsparse.SADTracker(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-5)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(len(ytr), (64,), generator=gen)
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        sad = tracker.measure().total if tracker else None
        results.append((label, _accuracy(model, xte, yte), time.perf_counter() - t0, sad))
    print(f"{'run':<14}{'test acc':>10}{'time':>9}  SAD vs initial mask")
    for label, acc, secs, sad in results:
        s = "-" if sad is None else f"{sad['vs_initial']} of {sad['size']} ({sad['vs_initial_frac']:.2%})"
        print(f"{label:<14}{acc:>10.2%}{secs:>8.1f}s  {s}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="short dense vs SR-STE N:M run on scikit-learn's digits")
    p.add_argument("--nm", default="2:4", help="N:M, N kept per group of M (default 2:4)")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        n, m = nmsparse.nmmasks.check_nm(*(int(v) for v in args.nm.split(":")))
    except (ValueError, TypeError) as e:
        raise SystemExit(f"nmsparse demo: error: --nm must look like 2:4 (N kept per M): {e}")
    run(n, m, args.steps, args.seed)
    return 0
