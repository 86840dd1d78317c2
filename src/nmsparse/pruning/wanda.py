"""Wanda (Sun et al., 2023): score each weight by ``|w_ij| * ||x_j||_2``, the magnitude times the
norm of its input feature over the calibration inputs, and keep the N largest per group of M; no
weight update. ``||x_j||^2`` is the diagonal of the Gram matrix ``H = X^T X``; calibration accumulates
only these squared norms for Wanda (:class:`nmsparse.calibration.gram.Gram` with ``full=False``)."""

from __future__ import annotations

import torch


def wanda_score(w: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """``|w| * ||x||`` for ``w`` of shape ``(out, D)`` and ``sq_norms`` of shape ``(D,)``, the squared
    norms of the D input features (e.g. the diagonal of ``X^T X``)."""
    norms = sq_norms.clamp_min(0).sqrt().to(w.dtype)
    return w.abs() * norms.unsqueeze(0)
