"""Distillation losses: pure tensor functions of a student's and a teacher's outputs.

* :func:`output_loss`: the final output. ``"cosine"`` (1 - cosine of embeddings; a ``(B, T, H)``
  hidden state is mean-pooled over the tokens ``attention_mask`` keeps, as sentence-transformers
  does), ``"mse"`` (mean squared error divided by the teacher's mean square, so the scale does not
  matter), ``"kl"`` (``KL(teacher || student)`` of the softmax at ``temperature``, times
  ``temperature**2``, Hinton et al. 2015).
* :func:`hidden_loss`: one block's hidden state, the normalised MSE above over the kept tokens.
* :func:`output_tensor` / :func:`resolve_kind`: what of a model's output is compared, and which
  loss ``"auto"`` means for it (``logits``: ``"kl"``; ``last_hidden_state`` or a 3-D tensor:
  ``"cosine"``; another tensor: ``"mse"``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

OUTPUT_LOSSES = ("auto", "cosine", "mse", "kl", "none")


def output_tensor(out: Any) -> tuple[torch.Tensor, str]:
    """``(tensor, what)`` of a model output: ``logits`` or ``last_hidden_state`` of a transformers
    output (or dict), the first element of a tuple, or the tensor itself. ``what`` names it."""
    if isinstance(out, torch.Tensor):
        return out, "tensor"
    get = out.get if isinstance(out, Mapping) else (lambda k: getattr(out, k, None))
    for key in ("logits", "last_hidden_state"):
        t = get(key)
        if isinstance(t, torch.Tensor):
            return t, key
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], "tensor"
    raise ValueError(f"cannot find the output to distil in a {type(out).__name__}: expected a tensor, a tuple "
                     "starting with one, or an output with 'logits' or 'last_hidden_state'")


def resolve_kind(kind: str, what: str, t: torch.Tensor) -> str:
    """The loss ``kind`` (one of :data:`OUTPUT_LOSSES`) means for an output ``what`` of shape ``t``."""
    if kind not in OUTPUT_LOSSES:
        raise ValueError(f"output_loss must be one of {OUTPUT_LOSSES}, got {kind!r}")
    if kind != "auto":
        return kind
    if what == "logits":
        return "kl"
    if what == "last_hidden_state" or t.dim() == 3:
        return "cosine"
    return "mse"


def _token_weights(t: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, T, 1)`` float weights of the kept tokens when ``t`` is ``(B, T, ...)`` and the mask fits."""
    if attention_mask is None or t.dim() < 3 or tuple(attention_mask.shape) != tuple(t.shape[:2]):
        return None
    return attention_mask.to(t.dtype).unsqueeze(-1)


def pooled(t: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H)``: a ``(B, T, H)`` tensor mean-pooled over the tokens ``attention_mask`` keeps
    (all tokens without one); a ``(B, ...)`` tensor flattened to ``(B, -1)``."""
    if t.dim() == 3:
        w = _token_weights(t, attention_mask)
        if w is None:
            return t.mean(1)
        return (t * w).sum(1) / w.sum(1).clamp_min(1e-9)
    return t.reshape(len(t), -1)


def normalised_mse(s: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean((s - t)^2) / mean(t^2)`` over the kept tokens (all entries without a fitting mask)."""
    if s.shape != t.shape:
        raise ValueError(f"student and teacher outputs differ in shape: {tuple(s.shape)} vs {tuple(t.shape)}")
    s, t = s.float(), t.float()
    w = _token_weights(t, attention_mask)
    if w is None:
        return (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
    w = w.reshape(*w.shape[:2], *([1] * (t.dim() - 2)))
    return ((s - t).pow(2) * w).sum() / (t.pow(2) * w).sum().clamp_min(1e-12)


def output_loss(kind: str, s: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor | None = None,
                temperature: float = 1.0) -> torch.Tensor:
    """The loss ``kind`` (``"cosine"``, ``"mse"``, ``"kl"``; see module doc) between the student's
    output ``s`` and the teacher's ``t`` (same shape), a scalar."""
    if s.shape != t.shape:
        raise ValueError(f"student and teacher outputs differ in shape: {tuple(s.shape)} vs {tuple(t.shape)}")
    if kind == "cosine":
        a, b = pooled(s.float(), attention_mask), pooled(t.float(), attention_mask)
        return (1 - F.cosine_similarity(a, b, dim=-1)).mean()
    if kind == "mse":
        return normalised_mse(s, t, attention_mask)
    if kind == "kl":
        logp = F.log_softmax(s.float() / temperature, dim=-1)
        q = F.log_softmax(t.float() / temperature, dim=-1)
        kl = F.kl_div(logp.reshape(-1, s.shape[-1]), q.reshape(-1, t.shape[-1]), log_target=True,
                      reduction="batchmean")
        return kl * temperature ** 2
    raise ValueError(f"output loss must be 'cosine', 'mse' or 'kl', got {kind!r}")


def hidden_loss(s: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One block's hidden-state loss: :func:`normalised_mse` over the kept tokens."""
    return normalised_mse(s, t, attention_mask)
