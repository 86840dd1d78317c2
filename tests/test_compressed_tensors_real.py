"""Folders written by nmsparse decompress to our weights in the REAL compressed-tensors 0.14.0.1 reader
(transformers 4.57 ``from_pretrained`` + ``ModelCompressor``).

That reader needs ``transformers<5``, so it runs in its own interpreter: ``$NMSPARSE_CT_PYTHON``, else
``/work/ctenv/bin/python`` (built by the pip commands in fixtures/compressed_tensors/make_fixtures.py).
Where neither has compressed-tensors 0.14.0.1 (e.g. CI), the test skips.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from nmsparse import nm_mask  # noqa: E402
from nmsparse.integrations.compressed_tensors import save  # noqa: E402

SCRIPT = Path(__file__).parent / "fixtures" / "compressed_tensors" / "make_fixtures.py"
VERSION = "0.14.0.1"


def _reader() -> str | None:
    for exe in (os.environ.get("NMSPARSE_CT_PYTHON"), "/work/ctenv/bin/python"):
        if exe and Path(exe).is_file():
            r = subprocess.run([exe, "-c", "import compressed_tensors as c, transformers as t; "
                                           "print(c.__version__, t.__version__)"], capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.split()[0] == VERSION:
                return exe
    return None


READER = _reader()
pytestmark = pytest.mark.skipif(READER is None, reason=f"no interpreter with compressed-tensors {VERSION} "
                                                       "(set NMSPARSE_CT_PYTHON)")


@pytest.mark.slow  # two interpreters start (about 20 s each on 2 busy cores)
@pytest.mark.parametrize("dtype,shard", [(torch.bfloat16, None), (torch.float16, 20_000)])
def test_real_reader_loads_our_folder_exactly(tmp_path, dtype, shard):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for n, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and n != "lm_head":
                mod.weight.mul_(nm_mask(mod.weight, 2, 4, dim=1))
    kw = {"max_shard_bytes": shard} if shard else {}
    report = save(model, tmp_path / "ours", **kw)
    assert len(report.compressed) == 14
    # extra __metadata__ keys (ours: nmsparse_version; the checksum the house rule adds) must not bother it
    from safetensors import safe_open

    for f in (tmp_path / "ours").glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            meta, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
        assert meta["format"] == "pt" and "nmsparse_version" in meta
        save_file(tensors, str(f), metadata={**meta, "checksum": "sha256:" + "0" * 64})
    ref = tmp_path / "reference.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ref))
    r = subprocess.run([READER, str(SCRIPT), "verify", str(tmp_path / "ours"), str(ref)],
                       capture_output=True, text=True, timeout=300)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and result["ok"], (result, r.stderr[-2000:])
    assert result["sparsity_format"] == "sparse-24-bitmask" and result["tensors"] == len(model.state_dict())
