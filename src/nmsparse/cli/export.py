"""``nmsparse export``: write a trained/pruned model as a compressed N:M file, ONNX, or dense weights.

    nmsparse export --checkpoint runs/x/final.safetensors [--model resnet] --format nmsparse|onnx|dense \\
        [--dtype fp32|fp16|bf16] [--nm 2:4|auto] [--layout channels|flat] --out exported/
    nmsparse export --hf-model PATH_TO_HF_FOLDER --format nmsparse --dtype fp16 --out exported/
    nmsparse export --hf-model PATH_TO_HF_FOLDER --format compressed-tensors --dtype bf16 --out exported/
    nmsparse export ... --format onnx [--static] [--batch N] [--seq-len N]   (see nmsparse.cli.export_onnx)

Writes into ``--out``: ``model.nmsparse.safetensors`` (format ``nmsparse``, see docs/format.md),
``model.onnx`` (format ``onnx``) or ``model.safetensors`` (format ``dense``), ``config.json`` (the
checkpoint's training config, or the Hugging Face config) and ``export_report.json`` (per tensor:
dense bytes against stored bytes). Format ``compressed-tensors`` makes ``--out`` a Hugging Face folder in
compressed-tensors' ``sparse-24-bitmask`` format (docs/interop.md), plus ``export_report.json``. Prints the table of layers and sizes. Every check runs before
anything is written; the files are built in a temporary folder inside ``--out`` and moved into place at
the end (a killed export's folder is removed by the next one). A full disk, a read-only folder or a
missing permission is one line naming the file in ``--out`` and the cause, exit code 2, earlier files
in ``--out`` intact.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from nmsparse.cli.help import HelpFormatter
from nmsparse.cli import export_onnx as onnx_cli
from nmsparse.plumbing.errors import WriteError
from nmsparse.plumbing.writing import WRITE_ERRNOS, os_cause, staging_dir, write_error

FORMATS = ("nmsparse", "onnx", "dense", "compressed-tensors")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FILENAMES = {"nmsparse": "model.nmsparse.safetensors", "onnx": "model.onnx", "dense": "model.safetensors",
             "compressed-tensors": "model.safetensors"}
# image size and channels of the datasets 'nmsparse train' knows (to rebuild a registry model)
DATA_SHAPES = {"fashion-mnist": (28, 1, 10), "digits": (8, 1, 10)}


CHECKPOINT_HINT = "pass the final.safetensors written by 'nmsparse train' or 'nmsparse prune'"


class UserError(Exception):
    """A mistake in the command line or its inputs: one line on stderr, exit code 2."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a model as a compressed N:M file, ONNX or dense weights, with a size report",
        description="Export a model (final.safetensors of 'nmsparse train'/'nmsparse prune', or a Hugging Face "
                    "model folder) for deployment: 'nmsparse' stores every N:M layer weight as kept values plus "
                    "bit-packed positions (docs/format.md); 'onnx' a dense ONNX graph whose initializers keep the "
                    "zeros (dynamic batch and sequence axes unless --static); 'dense' plain safetensors; "
                    "'compressed-tensors' a Hugging Face folder in compressed-tensors' sparse-24-bitmask format "
                    "(docs/interop.md). Prints per-layer sizes and writes export_report.json.",
        formatter_class=HelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="final.safetensors written by 'nmsparse train' or 'nmsparse prune'")
    src.add_argument("--hf-model", help="folder of a Hugging Face transformers model (config.json + weights)")
    p.add_argument("--model", default=None, help="architecture of --checkpoint (default: the one it records)")
    p.add_argument("--format", default="nmsparse", help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--dtype", default="fp32", help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--nm", default=None,
                   help="N:M (N kept per group of M) or 'auto' (default: the checkpoint's, else detected)")
    p.add_argument("--layout", default=None, help="conv grouping, channels or flat (default: checkpoint's, else channels)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace files of an earlier export in --out")
    onnx_cli.add_arguments(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from nmsparse.plumbing.checksum import cli_notes

    try:
        with cli_notes("nmsparse export"):
            return _run(args)
    except UserError as e:
        print(f"nmsparse export: error: {e}", file=sys.stderr)
        return 2


def _parse_nm(text: str | None) -> tuple[int, int] | None:
    if text is None or text == "auto":
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"--nm must be 'auto' or N:M with whole numbers (N weights kept per group of M, e.g. 2:4), "
                        f"got {text!r}")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise UserError(f"--nm {text}: need 0 < N < M (N weights kept per group of M), e.g. 2:4")
    return n, m


def _run(args: argparse.Namespace) -> int:
    from nmsparse.masking.layout import LAYOUTS

    if args.format not in FORMATS:
        raise UserError(f"unknown --format {args.format!r}; choose one of {', '.join(FORMATS)}")
    if args.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {args.dtype!r}; choose one of {', '.join(DTYPES)}")
    nm = _parse_nm(args.nm)
    try:
        onnx_cli.check_options(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.layout is not None and args.layout not in LAYOUTS:
        raise UserError(f"unknown --layout {args.layout!r}; choose one of {', '.join(LAYOUTS)}")
    onnx_export = None
    if args.format == "onnx":
        try:
            from nmsparse.export.onnx import export_onnx as onnx_export
        except ImportError as e:
            raise UserError(f"--format onnx needs nmsparse.export.onnx and the onnx packages ({e})") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    names = [FILENAMES[args.format], "config.json", "export_report.json"]
    if out.is_dir() and not args.overwrite and any((out / f).exists() for f in names):
        raise UserError(f"{out} already holds an export; pass --overwrite to replace it")
    if args.model is not None and args.hf_model is not None:
        raise UserError("--model names the architecture of --checkpoint; a --hf-model folder records its own")

    if args.format == "compressed-tensors":
        return _export_compressed_tensors(args, out)
    if args.hf_model:
        model, config, example, recorded = _load_hf(args.hf_model)
    else:
        model, config, example, recorded = _load_checkpoint(args.checkpoint, args.model)
    layout = args.layout or config.get("layout") or "channels"
    if layout not in LAYOUTS:
        raise UserError(f"the checkpoint records layout {layout!r}; pass --layout channels or flat")
    model = model.to(DTYPES[args.dtype]).eval()
    if nm is None and args.nm is None:
        nm = recorded
    from nmsparse.export.files import detect_nm, nm_layer_weights

    n, m = nm if nm is not None else detect_nm(model, layout)
    if args.format == "onnx":
        try:
            example, onnx_export = onnx_cli.prepare(args, model, example, onnx_export)
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.format == "nmsparse" and args.nm not in (None, "auto") and not nm_layer_weights(model, n, m, layout):
        dn, dm = detect_nm(model, layout)
        if nm_layer_weights(model, dn, dm, layout):  # another N:M would compress: this one only adds a header
            raise UserError(f"--nm {n}:{m} compresses no layer weight of this model (its layers are {dn}:{dm}): the "
                            f"file would be larger than the dense one; pass --nm {dn}:{dm} or --nm auto")

    created = not out.exists()
    try:
        tmp = staging_dir(out)  # inside --out: a killed export leaves nothing beside it (the next one cleans up)
    except WriteError as e:
        raise UserError(str(e)) from None
    try:
        report = _export(args.format, model, example, tmp / FILENAMES[args.format], n, m, layout, onnx_export)
        if hasattr(report, "path"):
            report.path = str(out / FILENAMES[args.format])
        source = {"checkpoint": args.checkpoint, "hf_model": args.hf_model}
        full = {"source": source, "format": args.format, "dtype": args.dtype, "nm": f"{n}:{m}", "layout": layout,
                "report": report.to_dict()}
        for name, value in (("config.json", json.dumps(config, indent=2, default=str) + "\n"),
                            ("export_report.json", json.dumps(full, indent=2) + "\n")):
            _write_text(tmp / name, value, out / name)
        written = sorted(p.name for p in tmp.iterdir())  # every file: an ONNX export may add model.onnx.data
        stale = out / (FILENAMES["onnx"] + ".data")
        try:
            if args.format == "onnx" and stale.name not in written and stale.exists():
                stale.unlink()
            for f in written:
                os.replace(tmp / f, out / f)
        except OSError as e:
            raise write_error(out / f, e) from e
    except WriteError as e:  # the user's path, never the staging folder's
        raise UserError(str(_user_path(e, tmp, out))) from None
    except OSError as e:
        raise UserError(str(write_error(out / FILENAMES[args.format], e))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            try:
                out.rmdir()  # only if empty: a failed export into a new folder leaves no folder
            except OSError:
                pass
    print(report.table())
    totals = report.totals() if args.format == "nmsparse" else {}
    if totals and totals["stored_bytes"] > totals["dense_bytes"]:
        print(f"nmsparse export: warning: at {n}:{m} the compressed tensors take {totals['stored_bytes']} bytes, "
              f"more than the {totals['dense_bytes']} of the dense model; --format dense or another --nm is smaller",
              file=sys.stderr)
    print(f"outputs in {out}")
    return 0


def _export_compressed_tensors(args: argparse.Namespace, out: Path) -> int:
    """--format compressed-tensors: the --hf-model folder as a sparse-24-bitmask folder (docs/interop.md)."""
    from nmsparse.integrations.compressed_tensors import save

    if not args.hf_model:
        raise UserError("--format compressed-tensors writes a Hugging Face folder: pass --hf-model")
    if args.dtype not in ("bf16", "fp16"):
        raise UserError("--format compressed-tensors stores bf16 or fp16 weights (what vLLM's 2:4 kernels take): "
                        "pass --dtype bf16 or --dtype fp16")
    if args.nm not in (None, "auto", "2:4") or args.layout not in (None, "channels"):
        raise UserError("--format compressed-tensors is 2:4 along the input features: leave out --nm and --layout")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace the files of an earlier export")
    model = _load_hf(args.hf_model)[0].to(DTYPES[args.dtype]).eval()
    try:
        report = save(model, out, overwrite=args.overwrite)
        full = {"source": {"hf_model": args.hf_model}, "format": args.format, "dtype": args.dtype, "nm": "2:4",
                "compressed": report.compressed, "dense": report.dense, "nbytes": report.nbytes,
                "dense_nbytes": report.dense_nbytes}
        _write_text(out / "export_report.json", json.dumps(full, indent=2) + "\n", out / "export_report.json")
    except ValueError as e:  # a WriteError too: one line naming the file and the cause
        raise UserError(str(e)) from None
    except OSError as e:  # a read-only or full disk, a path through a file
        raise UserError(f"cannot write --out {out}: {e.strerror or e}") from None
    for name, why in report.dense.items():
        print(f"{name}: dense ({why})")
    print(report.summary())
    return 0


def _write_text(path: Path, text: str, shown: Path) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise write_error(shown, e) from e


def _user_path(e: WriteError, tmp: Path, out: Path) -> WriteError:
    """``e`` with a path inside the staging folder ``tmp`` shown as the same name in ``out``."""
    p = Path(e.path)
    if p == tmp or tmp in p.parents:
        return WriteError(out / p.relative_to(tmp), e.cause, e.errno)
    return e


def _export(fmt, model, example, path: Path, n: int, m: int, layout: str, onnx_export):
    from nmsparse.export.files import dense_report, save_compressed

    if fmt == "nmsparse":
        return save_compressed(model, path, n, m, layout)
    if fmt == "dense":
        from nmsparse.plumbing.writing import save_safetensors

        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_safetensors(path, state, {"format": "dense"})  # with the checksum nmsparse's readers verify
        return dense_report(model, path, n, m, layout)
    try:
        return onnx_export(model, example, str(path), n=n, m=m, layout=layout)
    except Exception as e:  # noqa: BLE001 - torch.onnx raises many types; the temporary folder is removed
        cause = os_cause(e)
        if cause is not None and getattr(cause, "errno", None) in WRITE_ERRNOS:  # a full disk, read-only...
            raise write_error(path, cause) from None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"ONNX export failed: {first}") from None


def _load_checkpoint(path: str, model_name: str | None):
    from nmsparse.plumbing.errors import LoadError
    from nmsparse.plumbing.io import read_safetensors, state_dict_mismatch
    from nmsparse.training.models import build_model, model_names

    try:  # missing, a folder, a torch.save archive, damaged (checksum included): one line naming it
        tensors, meta = read_safetensors(path)
    except LoadError as e:
        raise UserError(str(e if e.hint else e.with_hint(CHECKPOINT_HINT))) from None
    config = _json_dict(meta.get("config"))
    name = model_name or config.get("model")
    if name is None:
        raise UserError("the checkpoint records no model; pass --model")
    if name not in model_names():
        raise UserError(f"unknown --model {name!r}; choose one of {', '.join(model_names())}")
    data = config.get("data") or "fashion-mnist"
    if data not in DATA_SHAPES:
        raise UserError(f"the checkpoint's dataset {data!r} is unknown; choose one of {', '.join(DATA_SHAPES)}")
    size, channels, classes = DATA_SHAPES[data]
    torch.manual_seed(0)
    model = build_model(name, image_size=size, in_channels=channels, num_classes=classes)
    why = state_dict_mismatch(model.state_dict(), tensors)  # names the keys, before the model is touched
    if why:
        recorded = f"; it records model {config['model']!r} on {config.get('data')!r}" if "model" in config else ""
        raise UserError(f"cannot load {path}: does not fit model {name!r} on {data!r} ({why}){recorded}; "
                        "pass the --model it was trained with")
    model.load_state_dict(tensors)
    recorded = _json_dict(meta.get("pruned")).get("nm") or config.get("nm")
    nm = None
    if isinstance(recorded, str) and recorded != "dense":
        try:
            nm = _parse_nm(recorded)
        except UserError:
            nm = None
    return model, {**config, "model": name, "data": data}, (torch.zeros(1, channels, size, size),), nm


def _json_dict(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _load_compressed_tensors(path: str, cls):
    """A compressed-tensors sparse-24-bitmask folder, decompressed by nmsparse (docs/interop.md)."""
    import warnings

    from nmsparse.integrations.compressed_tensors import load

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load(path, model_class=cls)
    except (ValueError, OSError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    for w in caught:  # the FP8 note, once, as a line of its own
        print(f"note: {w.message}", file=sys.stderr)
    ids = torch.ones(1, 8, dtype=torch.long)
    return model, model.config.to_dict(), (ids, torch.ones_like(ids)), None


def _load_hf(path: str):
    if not Path(path, "config.json").is_file():
        raise UserError(f"--hf-model {path!r} is not a Hugging Face model folder (no config.json)")
    try:
        import transformers
    except ImportError:
        raise UserError("--hf-model needs transformers (pip install 'nmsparse[hf]')") from None
    from nmsparse.plumbing.errors import LoadError
    from nmsparse.plumbing.io import read_safetensors

    for shard in sorted(Path(path).glob("*.safetensors")):  # shards nmsparse wrote (prune --hf-model) carry
        try:  # a checksum: verified here, since transformers' loader does not; others load as they are
            read_safetensors(shard, note=False)
        except LoadError as e:
            raise UserError(str(e)) from None
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else None
        cls = cls if cls is not None else transformers.AutoModel  # no recorded class: the base model
        qc = getattr(config, "quantization_config", None)
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if str(getattr(method, "value", method)) == "compressed-tensors":  # transformers no longer reads 2:4 ones
            return _load_compressed_tensors(path, cls)
        model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise UserError(f"cannot load --hf-model {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    lost = sorted(set(info.get("missing_keys", ())) | set(info.get("unexpected_keys", ())))
    if lost:
        raise UserError(f"--hf-model {path}: {cls.__name__} does not hold the folder's weights exactly "
                        f"(missing or unexpected: {lost[:3]}); export refused rather than drop or invent tensors")
    ids = torch.ones(1, 8, dtype=torch.long)
    return model, model.config.to_dict(), (ids, torch.ones_like(ids)), None
