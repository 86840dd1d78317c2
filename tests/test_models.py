"""The model registry: shapes, and that every inner layer takes N:M from 2:4 to 8:16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.masking.layout import SUPPORTED
from nmsparse.training.models import MODELS, ResNet, build_model, model_names


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("size", [28, 8])
def test_forward_shape(name, size):
    torch.manual_seed(0)
    model = build_model(name, image_size=size)
    out = model(torch.randn(3, 1, size, size))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8), (2, 8), (1, 8), (1, 16), (8, 16)])
@pytest.mark.parametrize("layout", ["channels", "flat"])
def test_every_inner_layer_fits_nm(name, nm, layout):
    torch.manual_seed(0)
    model = build_model(name, image_size=8)  # the same layers as at 28x28, cheaper to run
    report = nmsparse.sparsify(model, *nm, layout=layout)
    reasons = {e.reason for e in report.dense}
    # only the first and the last weight layers (and the ViT's position embedding) stay dense
    assert reasons <= {"first weight layer (keep_dense)", "last weight layer (keep_dense)"} | \
        {r for r in reasons if r.endswith(f"is not supported ({SUPPORTED})")} | \
        {f"a parameter of the ViT module itself, not the weight of a supported layer ({SUPPORTED})"}
    assert sum(1 for e in report.dense if "keep_dense" in e.reason) == 2
    assert len(report.sparse) >= 1
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    nmsparse.finalize(model)
    for e in report.sparse:
        w = model.get_submodule(e.name).weight
        assert nmsparse.layer_is_nm(w, *nm, layout=layout)


def test_resnet_shape_and_size():
    model = build_model("resnet")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 16 == 0 for c in convs)
    assert all(c.in_channels % 16 == 0 for c in convs[1:])
    assert sum(p.numel() for p in model.parameters()) < 200_000  # small enough for a CPU epoch in about a minute
    with pytest.raises(ValueError, match="multiples of 16"):
        ResNet(widths=(16, 24, 64))


def test_vit_attention_uses_linear_projections():
    model = build_model("vit")
    report = nmsparse.sparsify(model, 2, 4)
    sparse = {e.name for e in report.sparse}
    assert {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.proj",
            "blocks.0.fc1", "blocks.0.fc2"} <= sparse
    assert "patch_embed" not in sparse and "head" not in sparse


def test_mlp_layers():
    report = nmsparse.sparsify(build_model("mlp"), 2, 4)
    assert [e.name for e in report.sparse] == ["net.3"]


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'; choose one of"):
        build_model("vgg")
    assert set(MODELS) == {"resnet", "resnet20", "mlp", "vit"}
