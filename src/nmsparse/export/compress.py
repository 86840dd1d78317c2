"""Compressed N:M tensors: the kept values plus bit-packed positions (pure tensor functions).

N is the number of values **kept** in every group of M consecutive entries along ``dim``.

Memory layout of :class:`NMCompressed` (also in ``docs/format.md``). Let ``x = w.movedim(dim, -1)``
(the grouped axis last, other axes in their original order), ``G = x.numel() // m`` the number of
groups, numbered in row-major order of ``x`` (group ``g`` covers ``x.reshape(-1)[g*m:(g+1)*m]``):

* ``values``: dtype ``w.dtype``, shape ``x.shape[:-1] + (x.shape[-1] * n // m,)``, contiguous; the
  ``n`` kept entries of group ``g`` are ``values.reshape(-1)[g*n:(g+1)*n]``, in increasing position.
* ``index``: ``torch.uint8``, 1-D, ``ceil(G * n * b / 8)`` bytes, ``b = ceil(log2(m))`` bits per kept
  value (2 for 2:4, 3 for 4:8). Kept value ``k = g*n + j`` has its position ``p`` (``0 <= p < m``)
  inside its group at bits ``k*b .. k*b + b - 1`` of the index read as ONE little-endian bit stream:
  bit ``i`` of the stream is bit ``i % 8`` (least significant first) of byte ``i // 8``; a position's
  least significant bit comes first; a position may straddle two bytes. The unused high bits of the
  last byte are zero. Positions inside a group are strictly increasing.

For a 2-D Linear weight ``(rows, K)`` with ``dim=1``: ``values`` is ``(rows, K*n/m)`` and row ``r``'s
positions start at bit ``r * (K*n/m) * b`` of ``index`` (not necessarily on a byte boundary).

A group with fewer than ``n`` non-zeros is padded with its lowest-position zero entries (kept with
their sign), so every group stores exactly ``n`` values. Non-zero means ``!= 0``: NaN counts, -0.0
does not. :func:`decompress` writes +0.0 at every position not stored.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from nmsparse.masking.nm import _BITS
from nmsparse.masking.pattern import NMPattern, check_nm

try:  # numba is a hard dependency; the guard keeps the torch path usable where it cannot load.
    from nmsparse.export import _kernels
except ImportError:  # pragma: no cover - exercised only on broken installs
    _kernels = None

# Above this many elements a CPU tensor goes to the numba kernel; below it the torch path is as fast.
KERNEL_MIN_NUMEL = 1 << 14

DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
               torch.bfloat16: "bfloat16"}


def index_bits(m: int) -> int:
    """Bits per stored position for groups of ``m``: ``ceil(log2(m))`` (2 for m=4, 3 for m=8)."""
    return (int(m) - 1).bit_length()


def index_nbytes(groups: int, n: int, m: int) -> int:
    """Bytes of the packed index of ``groups`` groups (each ``n`` positions of ``index_bits(m)`` bits)."""
    return (groups * n * index_bits(m) + 7) // 8


@dataclasses.dataclass(frozen=True)
class NMCompressed:
    """An N:M tensor stored as its kept values and their bit-packed positions.

    Fields: ``n`` (kept per group), ``m`` (group size), ``dim`` (non-negative, the grouped axis of the
    dense tensor), ``shape`` (dense shape), ``dtype``, and:

    * ``values``: ``dtype``, C-contiguous, shape ``moved[:-1] + (moved[-1]*n//m,)`` where ``moved`` is
      ``shape`` with ``dim`` moved last. Groups are numbered row-major over ``moved``; group ``g``'s n
      kept values are ``values.reshape(-1)[g*n:(g+1)*n]`` in increasing position.
    * ``index``: ``torch.uint8``, 1-D, exactly ``ceil(G*n*b/8)`` bytes (``G`` groups,
      ``b = ceil(log2(m))``). One little-endian bit stream: kept value ``k = g*n + j`` has its
      position (``0 <= p < m``) at stream bits ``k*b .. k*b+b-1``, least significant bit first;
      stream bit ``i`` is bit ``i % 8`` (value ``1 << (i % 8)``) of byte ``i // 8``. Positions may
      straddle bytes; no per-row padding; the unused high bits of the last byte are zero.

    2-D Linear weight ``(rows, K)``, ``dim=1``: ``values`` is ``(rows, K*n/m)``; row ``r``'s first
    position is at stream bit ``r*(K*n/m)*b``. :meth:`positions` unpacks to int64 like ``values``.
    """

    values: torch.Tensor
    index: torch.Tensor
    n: int
    m: int
    dim: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def bits(self) -> int:
        """Bits per stored position."""
        return index_bits(self.m)

    @property
    def groups(self) -> int:
        return math.prod(self.shape) // self.m

    @property
    def nbytes(self) -> int:
        """Bytes of ``values`` plus ``index``."""
        return self.values.numel() * self.values.element_size() + self.index.numel()

    @property
    def dense_nbytes(self) -> int:
        return math.prod(self.shape) * self.values.element_size()

    def positions(self) -> torch.Tensor:
        """Unpacked positions, ``int64`` of shape ``values.shape`` (each in ``[0, m)``)."""
        return unpack_positions(self.index, self.groups * self.n, self.m).view(self.values.shape)

    def validate(self) -> None:
        """Check that the fields fit together (shapes, dtypes, index length and padding bits).

        Raises ``ValueError`` naming what differs. Positions are checked by :func:`decompress`."""
        check_nm(self.n, self.m)
        if self.dtype not in _BITS:
            raise ValueError(f"dtype must be one of {list(DTYPE_NAMES.values())}, got {self.dtype}")
        shape = tuple(self.shape)
        if not shape or any((not isinstance(s, int)) or s < 0 for s in shape):
            raise ValueError(f"shape must be a non-empty tuple of non-negative ints, got {self.shape!r}")
        if not (isinstance(self.dim, int) and 0 <= self.dim < len(shape)):
            raise ValueError(f"dim {self.dim!r} is out of range for shape {shape}")
        if shape[self.dim] % self.m:
            raise ValueError(f"size {shape[self.dim]} along dim {self.dim} is not a multiple of m={self.m}")
        want = values_shape(shape, self.dim, self.n, self.m)
        if not isinstance(self.values, torch.Tensor) or self.values.dtype != self.dtype:
            got = getattr(self.values, "dtype", type(self.values).__name__)
            raise ValueError(f"values must be a {self.dtype} tensor, got {got}")
        if tuple(self.values.shape) != want:
            raise ValueError(f"values have shape {tuple(self.values.shape)}, expected {want} for dense shape "
                             f"{shape}, dim {self.dim}, {self.n}:{self.m}")
        if not isinstance(self.index, torch.Tensor) or self.index.dtype != torch.uint8 or self.index.dim() != 1:
            got = (f"{self.index.dtype} of shape {tuple(self.index.shape)}" if isinstance(self.index, torch.Tensor)
                   else type(self.index).__name__)
            raise ValueError(f"index must be a 1-D torch.uint8 tensor, got {got}")
        nbytes = index_nbytes(self.groups, self.n, self.m)
        if self.index.numel() != nbytes:
            raise ValueError(f"index has {self.index.numel()} bytes, expected {nbytes} "
                             f"({self.groups} groups x {self.n} positions x {self.bits} bits)")
        used = (self.groups * self.n * self.bits) % 8
        if used and int(self.index[-1]) >> used:
            raise ValueError(f"the unused high bits of the index's last byte must be zero, got byte "
                             f"{int(self.index[-1]):#04x}")

    def to(self, device: torch.device | str) -> "NMCompressed":
        return dataclasses.replace(self, values=self.values.to(device), index=self.index.to(device))


def values_shape(shape: tuple[int, ...], dim: int, n: int, m: int) -> tuple[int, ...]:
    """Shape of the ``values`` of a dense ``shape`` compressed N:M along ``dim`` (grouped axis last)."""
    moved = [s for i, s in enumerate(shape) if i != dim] + [shape[dim]]
    return tuple(moved[:-1]) + (moved[-1] * n // m,)


def _group_where(shape: tuple[int, ...], dim: int, m: int, g: int) -> str:
    """``w[i, j, a:b, ...]`` naming group ``g`` (row-major over the dim-moved-last view)."""
    moved = [s for i, s in enumerate(shape) if i != dim] + [shape[dim]]
    coords = []
    rest = g * m
    for s in reversed(moved):
        coords.append(rest % s)
        rest //= s
    coords.reverse()
    last = coords.pop()
    parts = [str(c) for c in coords]
    parts.insert(dim, f"{last}:{last + m}")
    return f"w[{', '.join(parts)}]"


def _check_input(w: object, n: int, m: int, dim: int) -> int:
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"compress needs a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _BITS:
        raise ValueError(f"compress needs a floating-point tensor (float16, bfloat16, float32, float64), "
                         f"got dtype {w.dtype}")
    if w.dim() == 0:
        raise ValueError("compress needs a tensor with at least one dimension, got a scalar")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -w.dim() <= dim < w.dim():
        raise ValueError(f"dim={dim!r} is out of range for a tensor of shape {tuple(w.shape)}")
    dim %= w.dim()
    if w.shape[dim] % m:
        raise ValueError(f"size {w.shape[dim]} along dim {dim} of a tensor of shape {tuple(w.shape)} is not a "
                         f"multiple of m={m}")
    return dim


def compress(w: torch.Tensor, n: int | NMPattern, m: int | None = None, dim: int = -1) -> NMCompressed:
    """Compress ``w`` (any float dtype, device, number of dimensions), N:M along ``dim`` (N kept per M).

    Every group of ``m`` consecutive entries along ``dim`` must hold at most ``n`` non-zeros (NaN is
    non-zero, -0.0 is not); otherwise ``ValueError`` names the first such group. Groups with fewer
    are padded with their lowest-position zeros. See :class:`NMCompressed` for the layout. ``n`` may be an
    :class:`~nmsparse.NMPattern` (``m`` left out).
    """
    n, m = check_nm(n, m)
    dim = _check_input(w, n, m, dim)
    x = w.detach().movedim(dim, -1).contiguous()
    vshape = values_shape(tuple(w.shape), dim, n, m)
    groups = x.numel() // m
    int_dtype, abs_bits, _ = _BITS[x.dtype]
    if x.device.type == "cpu" and _kernels is not None and x.numel() >= KERNEL_MIN_NUMEL:
        values = torch.empty(vshape, dtype=x.dtype)
        index = torch.empty(index_nbytes(groups, n, m), dtype=torch.uint8)
        bad = _kernels.compress_cpu(x.view(int_dtype).reshape(-1), values.view(int_dtype).view(-1), index,
                                    n, m, index_bits(m), abs_bits)
    else:
        values, index, bad = _compress_torch(x.view(-1, m), n, m)
        values = values.view(vshape) if bad < 0 else values
    if bad >= 0:
        g = x.view(-1, m)[bad]
        raise ValueError(f"{_group_where(tuple(w.shape), dim, m, bad)} (group {bad} along dim {dim}) has "
                         f"{int((g != 0).sum())} non-zeros, more than n={n} of m={m}; the tensor is not {n}:{m} "
                         f"along dim {dim}")
    return NMCompressed(values, index, n, m, dim, tuple(w.shape), w.dtype)


def _compress_torch(x: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Vectorised compression of groups ``x`` (G, m): values (G*n,), packed index, first bad group or -1."""
    nz = x != 0
    counts = nz.sum(-1)
    over = (counts > n).nonzero()
    if over.numel():
        return x.new_empty(0), x.new_empty(0, dtype=torch.uint8), int(over[0, 0])
    zero = ~nz
    keep = nz | (zero & (zero.cumsum(-1) <= (n - counts).unsqueeze(-1)))
    pos = keep.nonzero()[:, 1].view(-1, n)  # row-major: positions ascending within each group
    int_dtype = _BITS[x.dtype][0]  # move bit patterns, not floats: NaN payloads must survive
    values = x.view(int_dtype).gather(1, pos).reshape(-1).view(x.dtype)
    return values, pack_positions(pos.reshape(-1), m), -1


def pack_positions(pos: torch.Tensor, m: int) -> torch.Tensor:
    """Pack integer positions (1-D, each in ``[0, m)``) into the LSB-first bit stream (torch ops)."""
    b = index_bits(m)
    shifts = torch.arange(b, device=pos.device)
    bits = ((pos.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(-1).to(torch.uint8)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=pos.device)
    return (bits.view(-1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_positions(index: torch.Tensor, count: int, m: int) -> torch.Tensor:
    """The first ``count`` positions (``int64``) of a packed index (torch ops, any device)."""
    b = index_bits(m)
    shifts = torch.arange(8, device=index.device, dtype=torch.uint8)
    bits = ((index.unsqueeze(-1) >> shifts) & 1).reshape(-1)[: count * b].view(count, b).to(torch.int64)
    return (bits << torch.arange(b, device=index.device)).sum(-1)


def decompress(c: NMCompressed) -> torch.Tensor:
    """The dense tensor of ``c`` (shape ``c.shape``, dtype ``c.dtype``, on ``c.values``' device).

    Stored values come back bit for bit (NaN, inf, -0.0 included); every other position is +0.0.
    Raises ``ValueError`` if the fields do not fit together or a stored position is out of range
    or not strictly increasing inside its group (naming the first such group)."""
    if not isinstance(c, NMCompressed):
        raise ValueError(f"decompress needs an NMCompressed, got {type(c).__name__}")
    c.validate()
    n, m, dim = c.n, c.m, c.dim
    moved = values_shape(c.shape, dim, m, m)
    groups = c.groups
    if c.index.device != c.values.device:
        raise ValueError(f"values are on {c.values.device} but index is on {c.index.device}")
    int_dtype = _BITS[c.dtype][0]
    vals = c.values.contiguous()
    if vals.device.type == "cpu" and _kernels is not None and groups * m >= KERNEL_MIN_NUMEL:
        out = torch.empty(moved, dtype=c.dtype)
        bad = _kernels.decompress_cpu(vals.view(int_dtype).view(-1), c.index.contiguous(),
                                      out.view(int_dtype).view(-1), n, m, index_bits(m))
    else:
        out, bad = _decompress_torch(vals.view(int_dtype).view(groups, n), c.index, n, m)
        out = out.view(c.dtype).view(moved) if bad < 0 else out
    if bad >= 0:
        pos = unpack_positions(c.index, groups * n, m).view(groups, n)[bad].tolist()
        raise ValueError(f"corrupt index: group {bad} ({_group_where(c.shape, dim, m, bad)}) stores positions "
                         f"{pos}; positions must be strictly increasing and below m={m}")
    return out.movedim(-1, dim)


def _decompress_torch(vals: torch.Tensor, index: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, int]:
    groups = vals.shape[0]
    pos = unpack_positions(index, groups * n, m).view(groups, n)
    ok = pos < m
    if n > 1:
        ok &= torch.cat([torch.ones_like(pos[:, :1], dtype=torch.bool), pos[:, 1:] > pos[:, :-1]], 1)
    bad = (~ok.all(-1)).nonzero()
    if bad.numel():
        return vals.new_empty(0), int(bad[0, 0])
    out = vals.new_zeros(groups, m)
    out.scatter_(1, pos, vals)
    return out, -1
