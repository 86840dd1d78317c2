"""The statistics of one layer's inputs that the pruning methods read: :class:`Gram` accumulates
``X^T X`` over feature rows (or, for methods that need no more, the feature norms and a bounded
sample of rows)."""

from __future__ import annotations

from typing import Any

import torch

# Feature rows kept for the report's errors where no Gram matrix is accumulated (Gram(full=False)).
SAMPLE_ROWS = 512


class Gram:
    """``H = sum f^T f`` over feature rows ``f`` (float64), with a ones column if ``bias``; and,
    when ``bin_size`` is given, one float32 ``H`` per consecutive run of ``bin_size`` samples.

    ``full=False`` (methods that read no more than the feature norms: Wanda, magnitude): no ``H``
    (None); instead ``norms``, the float64 squared norm of each of the ``d`` features (the diagonal
    of ``H`` without the ones column), and ``sample``, a deterministic strided sample of at most
    :data:`SAMPLE_ROWS` feature rows (float32, ones column included) for the report's errors: rows
    whose index in calibration order is a multiple of a stride that doubles whenever the sample
    would grow past the bound (every row while there are at most ``SAMPLE_ROWS``)."""

    def __init__(self, d: int, bias: bool, device: torch.device, bin_size: int | None = None,
                 full: bool = True) -> None:
        self.d, self.bias = d, bias
        self.da = d + int(bias)
        self.full = full
        self.H = torch.zeros(self.da, self.da, dtype=torch.float64, device=device) if full else None
        self.norms = None if full else torch.zeros(d, dtype=torch.float64, device=device)
        self.sample = None if full else torch.zeros(0, self.da, device=device)
        self.stride = 1
        self.rows = 0
        self.bin_size = bin_size
        self.bins: list[list[Any]] = []  # [H_b (float32), rows_b]

    def add(self, f: torch.Tensor, bin_index: int | None = None) -> None:
        if f.shape[0] == 0:
            return
        f = f.float()
        if not self.full:
            self.norms += f.double().square().sum(0)
            self._keep_sample(f)
            self.rows += f.shape[0]
            return
        if self.bias:
            f = torch.cat([f, f.new_ones(f.shape[0], 1)], 1)
        h = f.T @ f
        self.H.add_(h)  # in float64, without a float64 copy of h
        self.rows += f.shape[0]
        if self.bin_size is not None and bin_index is not None:
            while len(self.bins) <= bin_index:
                self.bins.append([torch.zeros_like(h), 0])
            self.bins[bin_index][0] += h
            self.bins[bin_index][1] += f.shape[0]

    def _keep_sample(self, f: torch.Tensor) -> None:
        first = (-self.rows) % self.stride  # the first row of f whose global index is a multiple of stride
        new = f[first::self.stride]
        while self.sample.shape[0] + new.shape[0] > SAMPLE_ROWS:
            # double the stride: of the kept rows (indices 0, s, 2s, ...) keep the even multiples
            self.sample = self.sample[::2]
            self.stride *= 2
            first = (-self.rows) % self.stride
            new = f[first::self.stride]
        if self.bias:
            new = torch.cat([new, new.new_ones(new.shape[0], 1)], 1)
        self.sample = torch.cat([self.sample, new])
