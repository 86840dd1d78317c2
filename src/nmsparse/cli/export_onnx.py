"""The ONNX part of ``nmsparse export``: its options (``--static``, ``--batch``, ``--seq-len``), and the
example inputs the export traces and onnxruntime checks (random, from a fixed seed, in the model's dtype).

A registry model (``--checkpoint``) gets one image batch ``(batch, channels, size, size)``, exported as
``input`` -> ``logits``. A Hugging Face text model gets ``input_ids`` (random token ids),
``attention_mask`` (ones) and, where its forward takes them, ``token_type_ids`` (zeros), each
``(batch, seq_len)``; a vision model ``pixel_values``. Axes are dynamic unless ``--static``.
"""

from __future__ import annotations

import argparse
import functools
import inspect

import torch
from torch import nn

DEFAULT_BATCH, DEFAULT_SEQ_LEN = 1, 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ONNX (--format onnx)")
    g.add_argument("--static", action="store_true",
                   help="fixed input shapes (those of --batch and --seq-len) instead of a dynamic batch axis "
                        "(and sequence axis for --hf-model text models)")
    g.add_argument("--batch", default=None,
                   help=f"batch size of the example input the export traces and checks (default {DEFAULT_BATCH}; "
                        "with --static the file's only batch size)")
    g.add_argument("--seq-len", default=None,
                   help=f"--hf-model text models: tokens per example sequence (default {DEFAULT_SEQ_LEN}; with "
                        "--static the file's only length)")


def _positive(flag: str, text: str | None, default: int) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{flag} must be a whole number >= 1, got {text!r}")
    return value


def check_options(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` (one line) for an ONNX option that is invalid or given without ``--format onnx``."""
    given = [f for f, v in (("--static", args.static), ("--batch", args.batch), ("--seq-len", args.seq_len))
             if v not in (None, False)]
    if args.format != "onnx" and given:
        raise ValueError(f"{given[0]} applies to --format onnx only")
    _positive("--batch", args.batch, DEFAULT_BATCH)
    _positive("--seq-len", args.seq_len, DEFAULT_SEQ_LEN)
    if args.seq_len is not None and not args.hf_model:
        raise ValueError("--seq-len applies to --hf-model text models only (a --checkpoint model takes images)")


def _hf_example(model: nn.Module, batch: int, seq_len: int, seq_len_given: bool,
                gen: torch.Generator) -> dict[str, torch.Tensor]:
    config = model.config
    main = getattr(model, "main_input_name", "input_ids")
    params = inspect.signature(model.forward).parameters
    if main == "pixel_values":
        if seq_len_given:
            raise ValueError(f"--seq-len applies to text models; {type(model).__name__} takes pixel_values")
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return {"pixel_values": torch.randn(batch, getattr(config, "num_channels", 3), *size, generator=gen)}
    if main != "input_ids":
        raise ValueError(f"--format onnx builds example inputs for text (input_ids) and vision (pixel_values) "
                         f"models; {type(model).__name__} takes {main!r}: export it from Python with "
                         "nmsparse.export.export_onnx and your own inputs")
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({limit})")
    ids = torch.randint(0, int(config.vocab_size), (batch, seq_len), generator=gen)
    feeds = {"input_ids": ids}
    if "attention_mask" in params:
        feeds["attention_mask"] = torch.ones_like(ids)
    if "token_type_ids" in params and getattr(config, "type_vocab_size", 0):
        feeds["token_type_ids"] = torch.zeros_like(ids)
    return feeds


def prepare(args: argparse.Namespace, model: nn.Module, example: tuple, export):
    """``(example_inputs, export)`` for ``--format onnx``: the loader's ``example`` (which gives the image
    shape of a registry model) replaced by seeded random inputs of ``--batch`` (and ``--seq-len``), and
    ``export`` (``export_onnx``) with the keyword inputs and ``dynamic=False`` bound where they apply."""
    batch = _positive("--batch", args.batch, DEFAULT_BATCH)
    seq_len = _positive("--seq-len", args.seq_len, DEFAULT_SEQ_LEN)
    gen = torch.Generator().manual_seed(0)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    options: dict = {"dynamic": False} if args.static else {}
    if args.hf_model:
        feeds = _hf_example(model, batch, seq_len, args.seq_len is not None, gen)
        options["example_kwargs"] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in feeds.items()}
        inputs: tuple = ()
    else:
        inputs = (torch.randn(batch, *example[0].shape[1:], generator=gen).to(dtype),)
    return inputs, functools.partial(export, **options) if options else export
