"""The model's graph for the channel-space walk: ``torch.fx.symbolic_trace`` where it works,
``torch.export`` (non-strict, :mod:`nmsparse.permute.export_graph`) where it does not.

Hugging Face models are traced with ``transformers.utils.fx`` where the installed transformers has
it (4.x); transformers 5 has none and ``torch.fx.symbolic_trace`` fails on their control flow, so
they go through ``torch.export``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from nmsparse.permute.graph import Analysis, TraceError, Walker


def trace(model: nn.Module, example_inputs: Any) -> tuple[fx.GraphModule, tuple]:
    """``torch.fx`` graph of ``model`` and positional example inputs for its placeholders.

    Hugging Face models are traced with ``transformers.utils.fx.symbolic_trace`` from a mapping of
    keyword inputs; other models with ``torch.fx.symbolic_trace``. Raises :class:`TraceError`."""
    try:
        if _is_hf(model):
            if not isinstance(example_inputs, Mapping):
                raise TraceError("a Hugging Face model needs example_inputs as a mapping of keyword inputs "
                                 "(a tokenizer's output)")
            try:
                from transformers.utils.fx import symbolic_trace as hf_trace
            except ImportError:
                import transformers

                raise TraceError(f"transformers {transformers.__version__} has no transformers.utils.fx") from None
            gm = hf_trace(model, input_names=list(example_inputs))
            args = tuple(example_inputs[p.target] for p in gm.graph.nodes if p.op == "placeholder")
            return gm, args
        gm = fx.symbolic_trace(model)
    except TraceError:
        raise
    except Exception as e:  # noqa: BLE001 - any tracer failure means: not traceable
        raise TraceError(_first_line(e)) from e
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    if isinstance(example_inputs, Mapping):
        args = tuple(example_inputs[p.target] if p.target in example_inputs else _default(p) for p in placeholders)
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs) + tuple(_default(p) for p in placeholders[len(example_inputs):])
    else:
        args = (example_inputs,) + tuple(_default(p) for p in placeholders[1:])
    return gm, args


def analyse(model: nn.Module, example_inputs: Any) -> Analysis:
    """Channel spaces of ``model`` (see :mod:`nmsparse.permute.graph`): from its ``torch.fx`` graph,
    or, when ``torch.fx`` cannot trace it (or its traced graph does not run), from its
    ``torch.export`` graph; ``Analysis.tracer`` says which. Raises :class:`TraceError` naming both
    failures when neither works."""
    try:
        gm = _fx_graph(model, example_inputs)
    except TraceError as fx_error:
        from nmsparse.permute.export_graph import export_graph

        try:
            graph = export_graph(model, example_inputs)
        except Exception as e:  # noqa: BLE001 - any export failure means: not exportable
            raise TraceError(f"torch.fx: {fx_error}; torch.export: {_first_line(e)}") from e
        an = Walker(graph, model).run()
        an.tracer = "torch.export"
        return an
    return Walker(gm.graph, gm).run()


def _fx_graph(model: nn.Module, example_inputs: Any) -> fx.GraphModule:
    from torch.fx.passes.shape_prop import ShapeProp

    gm, args = trace(model, example_inputs)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as e:  # noqa: BLE001
        raise TraceError(f"the traced graph does not run on example_inputs: {_first_line(e)}") from e
    return gm


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _default(p: fx.Node) -> Any:
    if p.args:
        return p.args[0]
    raise TraceError(f"example_inputs give no value for the model's input {p.target!r}")


def _is_hf(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)
