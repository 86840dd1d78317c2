"""SAD and SADTracker."""

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse import SADTracker, sad, sparsify


def test_sad_counts_differing_positions():
    a = torch.tensor([[True, False, True, False]])
    b = torch.tensor([[False, True, True, False]])
    assert sad(a, b) == 2 and sad(a, a) == 0 and sad(b, a) == 2
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 64, generator=g) > 0.5, torch.rand(64, 64, generator=g) > 0.5
    assert sad(x, y) == sum(int(p != q) for p, q in zip(x.flatten().tolist(), y.flatten().tolist()))


def test_sad_errors():
    with pytest.raises(ValueError, match="one shape"):
        sad(torch.zeros(4, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean mask tensors; b is torch.float32"):
        sad(torch.zeros(4, dtype=torch.bool), torch.zeros(4))
    with pytest.raises(ValueError, match="boolean"):
        sad([True], torch.zeros(1, dtype=torch.bool))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 2))


def test_tracker_against_initial_and_previous():
    model = _model()
    sparsify(model, 2, 4, method="ste")
    tracker = SADTracker(model)
    assert tracker.measure().total["vs_initial"] == 0
    first = nmsparse.masks(model)
    p = model[2].parametrizations.weight.original
    with torch.no_grad():
        p.mul_(-1).add_(torch.randn_like(p))
    model(torch.randn(3, 8))
    r1 = tracker.measure()
    now = nmsparse.masks(model)
    assert r1.layers["2.weight"]["vs_initial"] == sad(now["2.weight"], first["2.weight"]) > 0
    assert r1.layers["2.weight"]["vs_previous"] == r1.layers["2.weight"]["vs_initial"]
    r2 = tracker.measure()  # nothing changed since
    assert r2.layers["2.weight"]["vs_previous"] == 0
    assert r2.layers["2.weight"]["vs_initial"] == r1.layers["2.weight"]["vs_initial"]
    size = sum(m.numel() for m in now.values())
    assert r2.total["size"] == size
    assert r2.total["vs_initial_frac"] == pytest.approx(r2.total["vs_initial"] / size)
    assert r2.layers["2.weight"]["vs_initial_frac"] == pytest.approx(r2.layers["2.weight"]["vs_initial"] / 256)
    assert len(tracker.history) == 3 and set(r2.to_dict()) == {"layers", "total"}


def test_tracker_on_dense_model_magnitude_masks():
    model = _model()
    tracker = SADTracker(lambda: nmsparse.magnitude_masks(model, 2, 4))
    with torch.no_grad():
        model[2].weight.add_(torch.randn_like(model[2].weight))
    rec = tracker.measure()
    assert rec.layers["2.weight"]["vs_initial"] > 0 and rec.layers["4.weight"]["vs_initial"] == 0


def test_tracker_without_masks_is_an_error():
    with pytest.raises(ValueError, match="no masks"):
        SADTracker(_model())
