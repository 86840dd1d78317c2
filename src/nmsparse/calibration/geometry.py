"""A layer's weight and inputs as the 2-D least-squares problem the pruning methods solve.

Every method works on ``W2`` of shape ``(out, D)`` whose N:M groups are ``M`` *consecutive* columns,
and on the layer's inputs ``X`` as rows of ``D`` features in the same column order, so that the layer
computes ``X @ W2.T (+ b)``:

* ``nn.Linear``: ``W2`` is the weight, ``X`` its input flattened to ``(rows, in)``.
* ``transformers``' ``Conv1D`` (weight stored ``(in, out)``): ``W2`` is ``weight.T``, ``X`` as for Linear.
* ``nn.MultiheadAttention.in_proj_weight`` ``(3E, E)``: three problems, the query, key and value
  projections (rows ``[0, E)``, ``[E, 2E)``, ``[2E, 3E)``, biases from ``in_proj_bias``), each with its
  own input (the layer's ``query``, ``key`` and ``value``; the same tensor for self-attention).
* Convolutions: ``X`` is the unfolded input (im2col): one row per output position, columns
  ``(in_channel, kernel position)`` in the order of ``weight.reshape(out, -1)``. For
  ``layout="flat"`` that is already the grouped order; for ``layout="channels"`` (groups along input
  channels at each kernel position) the columns are permuted to kernel-position-major order, which
  makes each group of M channels at one kernel position consecutive. Grouped convolutions become one
  problem per convolution group (its own output rows and its own input channels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nmsparse.masking.layout import target_kind


class LayerGeometry:
    """Maps a layer's tensor ``module.<name>`` to per-problem ``(out_g, D)`` matrices and its inputs
    to feature rows. ``problems`` is the number of independent problems (convolution groups, or the
    query/key/value blocks of ``in_proj_weight``); ``inputs`` the number of layer inputs they read
    (3 for ``in_proj_weight``: problem ``g`` reads input ``g``; else 1)."""

    def __init__(self, module: nn.Module, layout: str, name: str = "weight") -> None:
        self.module = module
        self.layout = layout
        self.name = name
        self.kind = target_kind(module, name)
        if self.kind is None:
            raise ValueError(f"{type(module).__name__}.{name} is not a tensor nmsparse can prune")
        w = getattr(module, name)
        self.is_conv = self.kind == "conv"
        self.transposed = self.kind == "transposed"
        self.inputs = 3 if self.kind == "in_proj" else 1
        self.problems = module.groups if self.is_conv else self.inputs
        self.out = w.shape[1] if self.transposed else w.shape[0]
        self.out_g = self.out // self.problems
        self.cin_g = w.shape[0] if self.transposed else w.shape[1]  # input channels (features) per problem
        self.k = math.prod(w.shape[2:]) if self.is_conv else 1
        self.d = self.cin_g * self.k  # features per problem
        self.bias_name = "in_proj_bias" if self.kind == "in_proj" else "bias"
        self.has_bias = getattr(module, self.bias_name, None) is not None
        if self.is_conv and layout == "channels" and self.k > 1:
            # grouped column j = kpos * cin_g + c  <-  flat column c * k + kpos
            self.perm = torch.arange(self.d).view(self.cin_g, self.k).t().reshape(-1)
            self.inv = torch.argsort(self.perm)
        else:
            self.perm = self.inv = None

    # -- weights --------------------------------------------------------------------------------
    def weight2d(self, weight: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The weight as one ``(out_g, D)`` matrix per problem, groups consecutive (copies)."""
        w = (getattr(self.module, self.name) if weight is None else weight).detach()
        w = w.t() if self.transposed else w.reshape(self.out, -1)
        out = []
        for g in range(self.problems):
            wg = w[g * self.out_g:(g + 1) * self.out_g]
            out.append((wg[:, self.perm] if self.perm is not None else wg).clone())
        return out

    def bias2d(self) -> list[torch.Tensor | None]:
        b = getattr(self.module, self.bias_name).detach() if self.has_bias else None
        return [None if b is None else b[g * self.out_g:(g + 1) * self.out_g].clone() for g in range(self.problems)]

    def assemble(self, mats: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`weight2d`: per-problem matrices back to the module's weight shape."""
        parts = [(w[:, self.inv] if self.inv is not None else w) for w in mats]
        full = torch.cat(parts, 0)
        if self.transposed:
            return full.t().contiguous()
        return full.reshape(getattr(self.module, self.name).shape)

    # -- inputs ---------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Layer input -> ``(rows, problems * D)`` feature rows in the weight's flat column order."""
        if not self.is_conv:
            return x.reshape(-1, x.shape[-1])
        return im2col(self.module, x)

    def problem_features(self, f: torch.Tensor, g: int) -> torch.Tensor:
        """Columns of problem ``g`` from :meth:`features` output (of input ``g`` when
        ``inputs > 1``), in grouped order."""
        fg = f[:, g * self.d:(g + 1) * self.d] if self.problems > 1 and self.inputs == 1 else f
        return fg[:, self.perm] if self.perm is not None else fg


def im2col(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unfold the input of a Conv1d/2d/3d: ``(rows = batch * output positions, in * prod(kernel))``,
    columns in the order of ``conv.weight.reshape(out, -1)`` (channel-major, then kernel position),
    so that ``im2col(conv, x) @ conv.weight.reshape(out, -1).T + bias`` is the convolution's output.
    Handles stride, padding (including ``"same"`` and non-zero padding modes) and dilation."""
    nd = len(conv.kernel_size)
    if x.dim() == nd + 1:  # unbatched input
        x = x.unsqueeze(0)
    pad = conv._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    ks, st, dl = conv.kernel_size, conv.stride, conv.dilation
    for i in range(nd):
        span = dl[i] * (ks[i] - 1) + 1
        x = x.unfold(2 + i, span, st[i])  # appends a window dim at the end
        if dl[i] > 1:
            x = x[..., :: dl[i]]
    # x: (B, C, L1..Lnd, k1..knd) -> (B, L1..Lnd, C, k1..knd)
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    x = x.permute(*perm)
    c = x.shape[1 + nd]
    return x.reshape(-1, c * math.prod(ks))
