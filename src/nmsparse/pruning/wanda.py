"""Wanda (Sun et al., 2023): score each weight by ``|w_ij| * ||x_j||_2``, the magnitude times the
norm of its input feature over the calibration inputs, and keep the N largest per group of M; no
weight update. ``||x_j||^2`` is the diagonal of the Gram matrix ``H = X^T X``."""

from __future__ import annotations

import torch


def wanda_score(w: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``|w| * ||x||`` for ``w`` of shape ``(out, D)`` and ``H`` whose first D diagonal entries are the
    squared feature norms."""
    d = w.shape[1]
    norms = H.diagonal()[:d].clamp_min(0).sqrt().to(w.dtype)
    return w.abs() * norms.unsqueeze(0)
