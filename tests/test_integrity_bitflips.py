"""Bit-flip fuzzing of every file nmsparse writes (issue 19, D1): each single flipped bit is either
refused with one LoadError (FormatError for compressed files) or provably harmless (the loaded
tensors, metadata and values are bit-identical to the undamaged file's). Never a silent change.

Formats: a compressed export (``save_compressed``, read by ``load_compressed``), ``final.safetensors``
of ``nmsparse train`` (read by ``read_safetensors``, the reader of ``prune``/``export --checkpoint``),
and ``checkpoint.pt`` (read by ``checkpoint.load``, the reader of ``--resume``). Positions come from a
fixed seed; the trial counts are printed with ``-s``.
"""

from __future__ import annotations

import json
import os
import random
import struct
import warnings

import pytest
import torch

import nmsparse
from nmsparse.plumbing import checksum
from nmsparse.plumbing.errors import LoadError
from nmsparse.export import load_compressed, save_compressed
from nmsparse.plumbing.io import read_safetensors
from nmsparse.training import checkpoint as ckpt
from nmsparse.training.config import TrainConfig
from nmsparse.training.loop import train
from nmsparse.training.models import build_model

FLIPS = int(os.environ.get("NMSPARSE_BITFLIPS", "120"))  # per format and region, fixed seed


def same(a, b) -> bool:
    """Bit-identical nested values (tensors by dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def trial(raw: bytes, load, reference, positions, tmp_path, name: str) -> dict:
    """Flip one bit at each position (byte index, bit) of ``raw``, load, classify."""
    counts = {"refused": 0, "harmless": 0, "silent": 0}
    silent = []
    path = tmp_path / name
    for pos, bit in positions:
        data = bytearray(raw)
        data[pos] ^= 1 << bit
        path.write_bytes(bytes(data))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", checksum.UnverifiedFileWarning)
            try:
                got = load(path)
            except LoadError as e:
                assert "\n" not in str(e) and str(path) in str(e), str(e)
                counts["refused"] += 1
                continue
        if same(got, reference):
            counts["harmless"] += 1
        else:
            counts["silent"] += 1
            silent.append((pos, bit))
    counts["silent_at"] = silent[:5]
    return counts


def positions(rng: random.Random, start: int, end: int, k: int) -> list[tuple[int, int]]:
    return [(rng.randrange(start, end), rng.randrange(8)) for _ in range(k)]


def state_of(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _header_len(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


def _region(raw: bytes, suffix: str) -> tuple[int, int]:
    """Byte range of the first tensor whose name ends with ``suffix``."""
    hl = _header_len(raw)
    header = json.loads(raw[8:hl])
    name = next(k for k in header if k.endswith(suffix))
    a, b = header[name]["data_offsets"]
    return hl + a, hl + b


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    d = tmp_path_factory.mktemp("c")
    torch.manual_seed(0)
    model = build_model("resnet")
    nmsparse.sparsify(model, 2, 4)
    model = nmsparse.finalize(model)
    save_compressed(model, d / "m.safetensors", 2, 4)
    return (d / "m.safetensors").read_bytes(), state_of(model)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(data="digits", model="mlp", epochs=1, batch_size=64, lr=0.05, train_subset=128,
                      test_subset=50, threads=1, out=str(out))
    train(cfg, progress=False, log=None)
    return out


def _load_compressed(path):
    torch.manual_seed(1)
    model = build_model("resnet")
    load_compressed(path, model)
    return state_of(model)


@pytest.mark.slow
def test_compressed_bitflips(compressed, tmp_path):
    raw, ref = compressed
    rng = random.Random(19)
    hl = _header_len(raw)
    results = {
        "anywhere": trial(raw, _load_compressed, ref, positions(rng, 0, len(raw), FLIPS), tmp_path, "a"),
        "header": trial(raw, _load_compressed, ref, positions(rng, 0, hl, FLIPS // 2), tmp_path, "h"),
        "nm_index": trial(raw, _load_compressed, ref, positions(rng, *_region(raw, "::nm_index"), FLIPS // 2),
                          tmp_path, "i"),
        "nm_values": trial(raw, _load_compressed, ref, positions(rng, *_region(raw, "::nm_values"), FLIPS // 2),
                           tmp_path, "v"),
    }
    print("\ncompressed", results)
    assert all(r["silent"] == 0 for r in results.values()), results
    assert all(r["refused"] > 0 for r in results.values())


@pytest.mark.slow
def test_final_safetensors_bitflips(run, tmp_path):
    raw = (run / "final.safetensors").read_bytes()
    ref = read_safetensors(run / "final.safetensors")
    rng = random.Random(19)
    hl = _header_len(raw)
    results = {"anywhere": trial(raw, read_safetensors, ref, positions(rng, 0, len(raw), FLIPS), tmp_path, "a"),
               "header": trial(raw, read_safetensors, ref, positions(rng, 0, hl, FLIPS // 2), tmp_path, "h")}
    print("\nfinal.safetensors", results)
    assert all(r["silent"] == 0 for r in results.values()), results


@pytest.mark.slow
def test_checkpoint_bitflips(run, tmp_path):
    raw = (run / "checkpoint.pt").read_bytes()
    ref = ckpt.load(run / "checkpoint.pt")
    rng = random.Random(19)
    r = trial(raw, ckpt.load, ref, positions(rng, 0, len(raw), FLIPS), tmp_path, "c.pt")
    print("\ncheckpoint.pt", r)
    assert r["silent"] == 0, r
    assert r["refused"] > FLIPS // 2


def test_swapped_data_offsets_are_refused(compressed, tmp_path):
    """Two same-shape, same-dtype tensors whose byte ranges are swapped in the header: the safetensors
    parser accepts it, the per-tensor checksum does not."""
    raw, _ = compressed
    hl = _header_len(raw)
    header = json.loads(raw[8:hl])
    by_shape: dict = {}
    for k, v in header.items():
        if k != "__metadata__":
            by_shape.setdefault((v["dtype"], tuple(v["shape"])), []).append(k)
    a, b = next(names for names in by_shape.values() if len(names) >= 2)[:2]
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    bad = tmp_path / "swapped.safetensors"
    bad.write_bytes(struct.pack("<Q", len(text)) + text + raw[hl:])
    with pytest.raises(LoadError, match=rf"fails its checksum: tensor '({a}|{b})' differs from what was written"):
        _load_compressed(bad)
    with pytest.raises(LoadError, match="fails its checksum: tensor"):
        read_safetensors(bad)
