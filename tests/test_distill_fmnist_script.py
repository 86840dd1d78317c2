"""The pure helpers of experiments/distill_fmnist.py (the experiment itself is run by hand, see docs/distill.md)."""

import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "experiments" / "distill_fmnist.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("distill_fmnist", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shuffled_passes_cover_the_images_once_and_depend_only_on_the_index(script):
    x = torch.arange(10).float().view(10, 1)
    s = script.Shuffled(x, batch=3, passes=2, seed=5)
    assert len(s) == 6  # 3 full batches per pass, the tenth image dropped
    for p in range(2):
        seen = torch.cat([s[i] for i in range(3 * p, 3 * p + 3)]).flatten().tolist()
        assert len(seen) == len(set(seen)) == 9
    again = script.Shuffled(x, batch=3, passes=2, seed=5)
    assert all(torch.equal(again[i], s[i]) for i in (4, 0, 5, 1))  # any access order, same batches
    assert not all(torch.equal(s[i], s[i + 3]) for i in range(3))  # each pass its own order
    with pytest.raises(IndexError):
        s[6]


def test_balanced_spreads_over_the_classes(script):
    labels = torch.arange(100) % 10
    idx = script.balanced(labels, 23, seed=0)
    counts = torch.bincount(labels[idx], minlength=10).tolist()
    assert sorted(counts) == [2] * 7 + [3] * 3 and len(set(idx.tolist())) == 23
    assert torch.equal(idx, script.balanced(labels, 23, seed=0))


def test_top1_counts_correct_argmax_and_keeps_the_mode(script):
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    model.train()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert script.top1(model, x, torch.tensor([0, 1, 1, 1]), batch=3) == 75.0
    assert model.training
