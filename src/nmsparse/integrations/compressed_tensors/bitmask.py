"""compressed-tensors' ``sparse-24-bitmask`` tensors, as pure tensor functions.

A 2:4 weight ``W`` of shape ``(rows, cols)`` (``cols`` = input features, a multiple of 4) is stored as
three tensors named after its module (``<module>.weight`` becomes):

* ``<module>.compressed``: ``(rows, cols // 2)``, W's dtype (bf16/fp16/fp32, or float8_e4m3fn for FP8
  weights): the kept entries of each row, in order;
* ``<module>.bitmask``: ``(rows, ceil(cols / 8))`` uint8: the keep-mask of each row packed 8 entries
  to a byte, least significant bit first (``numpy.packbits(..., bitorder="little")``), each row padded
  to whole bytes; exactly 2 bits are set in every group of 4 (a group with fewer than 2 non-zeros
  keeps some zeros);
* ``<module>.shape``: ``(2, 1)`` int64, the dense shape ``[[rows], [cols]]``.

This is the layout compressed-tensors 0.14 writes (``Sparse24BitMaskTensor``) and reads; the functions
here check every size and popcount, so a damaged tensor raises ``ValueError`` instead of a wrong weight.
"""

from __future__ import annotations

import torch

from nmsparse.integrations.compressed_tensors._kernels import decompress24_cpu
from nmsparse.masking.nm import nm_mask

SUFFIXES = ("compressed", "bitmask", "shape")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
FP8 = torch.float8_e4m3fn


def packed_cols(cols: int) -> int:
    """Bytes per row of the packed bitmask of a ``cols``-wide weight."""
    return (cols + 7) // 8


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """``(rows, cols)`` bool -> ``(rows, ceil(cols/8))`` uint8, little bit order, rows padded."""
    rows, cols = mask.shape
    pad = packed_cols(cols) * 8 - cols
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).reshape(rows, -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (bits * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_rows(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: ``(rows, ceil(cols/8))`` uint8 -> ``(rows, cols)`` bool."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :cols].bool()


def dense_shape(shape: torch.Tensor, name: str) -> tuple[int, int]:
    """The ``(rows, cols)`` a ``.shape`` tensor holds (``ValueError`` unless it is 2 positive integers)."""
    if shape.dtype.is_floating_point or shape.dtype == torch.bool or shape.numel() != 2:
        raise ValueError(f"{name}.shape must hold 2 integers (rows, cols), got {shape.dtype} "
                         f"{tuple(shape.shape)}")
    rows, cols = (int(v) for v in shape.flatten().tolist())
    if rows <= 0 or cols <= 0 or cols % 4:
        raise ValueError(f"{name}.shape is [{rows}, {cols}]: a 2:4 weight needs positive sizes and input "
                         "features (cols) that are a multiple of 4")
    return rows, cols


def check_parts(name: str, compressed_shape: tuple, compressed_dtype: torch.dtype, bitmask_shape: tuple,
                bitmask_dtype: torch.dtype, rows: int, cols: int) -> None:
    """Check the sizes and dtypes of a stored weight's tensors against its dense ``(rows, cols)``;
    ``ValueError`` naming the tensor otherwise (cheap: headers only, no data read)."""
    if compressed_dtype not in _FLOATS + (FP8,):
        raise ValueError(f"{name}.compressed has dtype {compressed_dtype}; sparse-24-bitmask stores float32, "
                         "float16, bfloat16 or float8_e4m3fn values")
    if tuple(compressed_shape) != (rows, cols // 2):
        raise ValueError(f"{name}.compressed has shape {tuple(compressed_shape)}, but {name}.shape says "
                         f"{[rows, cols]}, which needs {(rows, cols // 2)} (2 values kept per 4)")
    if bitmask_dtype != torch.uint8 or tuple(bitmask_shape) != (rows, packed_cols(cols)):
        raise ValueError(f"{name}.bitmask is {bitmask_dtype} {tuple(bitmask_shape)}, but {name}.shape "
                         f"{[rows, cols]} needs uint8 {(rows, packed_cols(cols))}")


# popcount of each group of 4 in a mask byte (low nibble first): (256, 2), for error messages
_POP = torch.tensor([[bin(v & 0xF).count("1"), bin(v >> 4).count("1")] for v in range(256)], dtype=torch.uint8)


def decompress24(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor, name: str) -> torch.Tensor:
    """Dense ``(rows, cols)`` weight (dtype of ``compressed``) from its three stored tensors, exactly as
    compressed-tensors 0.14 rebuilds it. Raises ``ValueError`` naming ``name`` when a size is wrong or
    a group of 4 has other than 2 bits set."""
    rows, cols = dense_shape(shape, name)
    check_parts(name, compressed.shape, compressed.dtype, bitmask.shape, bitmask.dtype, rows, cols)
    out, r, g = decompress24_cpu(compressed, bitmask, rows, cols)
    if r >= 0:
        counts = _POP[bitmask.long()].reshape(rows, -1)[:, : cols // 4]
        bad = int((counts != 2).sum())
        raise ValueError(f"{name}.bitmask sets {int(counts[r, g])} of the 4 bits of row {r}, group {g} "
                         f"(columns {4 * g}..{4 * g + 3}), and {bad} group(s) in all differ from "
                         "2: not a sparse-24-bitmask tensor, or a damaged one")
    return out


def compress24(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"compressed", "bitmask", "shape"}`` of a 2-D weight that is 2:4 along dim 1 (at most 2
    non-zeros in every 4 consecutive inputs). Every kept non-zero stays; a group with fewer than 2
    non-zeros keeps its lowest-index zeros. Raises ``ValueError`` when ``weight`` is not 2:4."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"sparse-24-bitmask needs a 2-D weight with a multiple of 4 input features, got "
                         f"{tuple(weight.shape)}")
    w = weight.detach().cpu().contiguous()
    if w.dtype not in _FLOATS:
        raise ValueError(f"sparse-24-bitmask stores float32, float16 or bfloat16 weights, got {w.dtype}")
    mask = nm_mask(w, 2, 4, dim=1)  # the 2 largest |w| of each group: every non-zero of a 2:4 weight
    if bool(((w != 0) & ~mask).any()):
        raise ValueError("the weight is not 2:4 along its input features (a group of 4 holds more than "
                         "2 non-zeros)")
    rows, cols = w.shape
    return {"compressed": w[mask].reshape(rows, cols // 2).clone(), "bitmask": pack_rows(mask),
            "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1)}
