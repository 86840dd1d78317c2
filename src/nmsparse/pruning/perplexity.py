"""Perplexity of a causal language model on a text, the measure the LLM pruning literature reports.

The token ids are cut into non-overlapping windows of ``seqlen`` tokens (the remainder dropped), as
SparseGPT and Wanda evaluate WikiText-2; each window is scored on its own, and the perplexity is
``exp(total negative log-likelihood / predicted tokens)`` with ``seqlen - 1`` predicted tokens per
window. A model in memory is run as it is; a ``save_pretrained`` folder is streamed block by block
(:mod:`nmsparse.calibration.streaming`), the hidden states of all windows kept on disk with one batch in memory
at a time (:mod:`nmsparse.calibration.spill`), so a model larger than memory can be scored too.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import torch
from torch import nn

from nmsparse.calibration.spill import HiddenSpill
from nmsparse.calibration.streaming import BlockStream, block_output


def windows(token_ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows ``(k, seqlen)`` of a 1-D tensor of token ids (remainder dropped)."""
    if token_ids.dim() != 1:
        raise ValueError(f"token ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    k = token_ids.numel() // seqlen
    if k == 0:
        raise ValueError(f"the text has {token_ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return token_ids[: k * seqlen].view(k, seqlen)


@torch.no_grad()
def perplexity(
    model: nn.Module | str | os.PathLike,
    token_ids: torch.Tensor,
    *,
    seqlen: int = 512,
    batch_size: int = 8,
    model_class: Any = None,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Perplexity of ``model`` (a causal LM in memory, or the folder of one, streamed) on ``token_ids``
    (1-D). Returns ``{"perplexity", "nll", "tokens", "windows"}`` (``nll``: mean per predicted token).
    ``model_class`` (default ``AutoModelForCausalLM``) and ``dtype`` apply to a folder."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    w = windows(token_ids, seqlen)
    batches = [w[i:i + batch_size] for i in range(0, len(w), batch_size)]
    total = 0.0
    if isinstance(model, nn.Module):
        was = model.training
        model.eval()
        try:
            for b in batches:
                total += float(model(input_ids=b, labels=b).loss) * b.shape[0] * (seqlen - 1)
        finally:
            model.train(was)
    else:
        if model_class is None:
            from transformers import AutoModelForCausalLM

            model_class = AutoModelForCausalLM
        stream = BlockStream(model, model_class, dtype)
        with HiddenSpill(tempfile.gettempdir()) as spill:  # one batch's hidden states in memory at a time
            for kw in stream.iter_block_inputs(batches):
                spill.append(kw)
            for i in range(stream.num_blocks):
                block = stream.load_block(i)
                spill.advance(lambda kw: block_output(block(**kw)))
                del block
            for j, b in enumerate(batches):
                out = stream.run_tail({"input_ids": b, "labels": b}, spill.load(j)["hidden_states"])
                total += float(out.loss) * b.shape[0] * (seqlen - 1)
    count = len(w) * (seqlen - 1)
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "windows": len(w)}
