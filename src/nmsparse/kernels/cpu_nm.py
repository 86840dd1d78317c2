"""N:M weights packed for the CPU kernel, and the compiled (numba) kernels that use them.

N is the number of weights **kept** in every group of M consecutive weights along ``in`` (2:4 keeps 2).

Layout ("bitmask-16"), for a weight ``W`` of shape ``(out, in)``, ``in`` a multiple of ``m``, and
``m`` one of 2, 4, 8, 16 (a divisor of 16, so that no group straddles two 16-column chunks):

* ``values``: ``(out, in * n // m)``, contiguous, the weight's dtype (``float32`` or ``bfloat16``).
  Row ``r`` holds, group after group, exactly ``n`` entries per group in increasing column order:
  the group's non-zeros (NaN and inf count as non-zero) and, when a group has fewer than ``n``
  non-zeros, zeros at the lowest unused positions ("padding").
* ``masks``: ``(out, ceil(in / 16))``, ``int16`` (read as 16 raw bits). Bit ``i`` (``1 << i``) of
  ``masks[r, c]`` is set when column ``16 * c + i`` holds one of row ``r``'s stored values (kept or
  padding), so every group has exactly ``n`` bits set, and bits of columns ``>= in`` are 0.
  Chunk ``c`` of row ``r`` therefore owns ``values[r, c * 16 * n // m : ...]``, in bit order.
* ``-0.0`` counts as zero (``finalize`` leaves ``-0.0`` at pruned positions of negative weights):
  unpacking gives ``+0.0`` there. Everything else comes back bit for bit.

This is the same information as "values + ``ceil(log2 m)``-bit positions" (the sparse tensor-core
layout; ``nmsparse.compress``): a converter sets bit ``(g * m + pos) % 16`` of chunk
``(g * m + pos) // 16`` for each stored position ``pos`` of group ``g``. Index bytes per row are
``in / 8``: for 2:4 that equals 2 bits per kept value (the tensor-core figure), for 4:8 it is 2 bits
(positions would take 3), for 1:4 and 2:8 it is 4 bits (positions: 2 and 3). A 4096x4096 2:4 weight
reads 32 MiB of fp32 values + 2 MiB of masks = 53.1% of the dense 64 MiB (bf16: 16 + 2 = 56.3%).

The kernel (``nm_matmul``) works on blocks of 4 output rows x up to 4 input rows: for each 16-column
chunk it loads the x rows' 16 entries once, expands each weight row's chunk straight from ``values``
into a 16-lane vector under its 16-bit mask (one ``vexpandps``, LLVM's ``llvm.masked.expandload``;
on CPUs without AVX-512 LLVM lowers it to scalar code, so :mod:`nmsparse.kernels.cpu_select` never
picks this kernel there: the AVX2 kernel of :mod:`nmsparse.kernels.cpu_nm_avx2` or dense run instead), and
multiplies (FMA) every pair into its own accumulator; each weight row's values are prefetched 32
chunks ahead. The weight is never decompressed in memory. ``bfloat16`` values are expanded as 16-bit
lanes and widened to fp32 in registers (a shift), so bf16 reads half the value bytes of fp32;
accumulation is always fp32.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from nmsparse.plumbing import numba_pool as _numba_pool
from nmsparse.kernels import cpu_nm_avx2, cpu_select, pack_kernel

CHUNK = 16  # columns per mask word
KERNEL_M = (2, 4, 8, 16)  # group sizes whose groups never straddle a 16-column chunk
KERNEL_DTYPES = (torch.float32, torch.bfloat16)

_I64 = ir.IntType(64)
_I32 = ir.IntType(32)
_I16 = ir.IntType(16)
_F32 = ir.FloatType()
_VF = ir.VectorType(_F32, CHUNK)
_VI16 = ir.VectorType(_I16, CHUNK)
_VI32 = ir.VectorType(_I32, CHUNK)
_VM = ir.VectorType(ir.IntType(1), CHUNK)
def _data(context, builder, aty, arr):
    return context.make_array(aty)(context, builder, arr).data


def _expand_fp32(builder, vptr, mask_i16, bf16: bool):
    mod = builder.module
    mvec = builder.bitcast(mask_i16, _VM)
    if bf16:
        fn = cgutils.get_or_insert_function(mod, ir.FunctionType(_VI16, [vptr.type, _VM, _VI16]),
                                            "llvm.masked.expandload.v16i16")
        lanes = builder.call(fn, [vptr, mvec, ir.Constant(_VI16, None)])
        wide = builder.shl(builder.zext(lanes, _VI32), ir.Constant(_VI32, [16] * CHUNK))
        return builder.bitcast(wide, _VF)
    fn = cgutils.get_or_insert_function(mod, ir.FunctionType(_VF, [vptr.type, _VM, _VF]),
                                        "llvm.masked.expandload.v16f32")
    return builder.call(fn, [vptr, mvec, ir.Constant(_VF, None)])


def _check_array(arr, what, dtypes):
    if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.dtype not in dtypes:
        raise numba.core.errors.TypingError(f"{what} must be a 1-d array of {dtypes}, got {arr}")


PREFETCH_CHUNKS = 32  # software prefetch distance along a row of values, in 16-column chunks
ROW_BLOCK = 4  # output rows per block: their chunks stream side by side and share each load of x


def _make_dot_block(rows: int, tile: int):
    """An intrinsic computing a ``rows`` x ``tile`` block of the product.

    ``_dot_block(vals, voff, vstride, masks, moff, nchunks, per, x, xoff, xstride, out, ooff, ostride)``
    sets, for i < rows and j < tile, ``out[ooff + j*ostride + i]`` to the dot product of packed row
    ``i`` (values from ``voff + i*vstride``, masks from ``moff + i*nchunks``) with the x row at
    ``xoff + j*xstride``. Per 16-column chunk: ``tile`` loads of x, ``rows`` mask loads and expansions
    (each shared by the ``tile`` x rows), ``rows * tile`` FMAs into independent accumulators, and a
    prefetch of each row's values ``PREFETCH_CHUNKS`` chunks ahead (the rows are separate streams
    from L3 or DRAM; the prefetch keeps enough lines in flight for the batch-1 case to run at memory
    speed)."""

    @intrinsic
    def _dot_block(typingctx, vals, voff, vstride, masks, moff, nchunks, per, x, xoff, xstride, out, ooff,
                   ostride):  # pragma: no cover - compiled
        _check_array(vals, "values", (types.float32, types.int16))
        _check_array(masks, "masks", (types.int16,))
        _check_array(x, "x", (types.float32,))
        _check_array(out, "out", (types.float32,))
        bf16 = vals.dtype == types.int16
        sig = types.void(vals, types.intp, types.intp, masks, types.intp, types.intp, types.intp, x, types.intp,
                         types.intp, out, types.intp, types.intp)

        def codegen(context, builder, s, args):
            vd = _data(context, builder, s.args[0], args[0])
            md = _data(context, builder, s.args[3], args[3])
            xd = _data(context, builder, s.args[7], args[7])
            od = _data(context, builder, s.args[10], args[10])
            voff, vstride, moff, nch, per, xoff, xstride, ooff, ostride = (args[i] for i in (1, 2, 4, 5, 6, 8, 9, 11, 12))
            mod = builder.module
            ffma = cgutils.get_or_insert_function(mod, ir.FunctionType(_VF, [_VF, _VF, _VF]), "llvm.fma.v16f32")
            pfetch = cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), [vd.type, _I32, _I32, _I32]),
                                                    "llvm.prefetch.p0")
            fred = cgutils.get_or_insert_function(mod, ir.FunctionType(_F32, [_F32, _VF]), "llvm.vector.reduce.fadd.v16f32")
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(_VF, None)) for _ in range(tile)] for _ in range(rows)]
            ahead = builder.mul(per, ir.Constant(_I64, PREFETCH_CHUNKS))
            with cgutils.for_range(builder, nch) as loop:
                c = loop.index
                col = builder.add(xoff, builder.mul(c, ir.Constant(_I64, CHUNK)))
                xs = []
                for j in range(tile):
                    xp = builder.gep(xd, [builder.add(col, builder.mul(xstride, ir.Constant(_I64, j)))])
                    xs.append(builder.load(builder.bitcast(xp, _VF.as_pointer()), align=4))
                for i in range(rows):
                    ci = ir.Constant(_I64, i)
                    vo = builder.add(builder.add(voff, builder.mul(vstride, ci)), builder.mul(c, per))
                    # a prefetch never faults, so running past the end of the values is harmless
                    builder.call(pfetch, [builder.gep(vd, [builder.add(vo, ahead)]), ir.Constant(_I32, 0),
                                          ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
                    mk = builder.load(builder.gep(md, [builder.add(builder.add(moff, builder.mul(nch, ci)), c)]))
                    w = _expand_fp32(builder, builder.gep(vd, [vo]), mk, bf16)
                    for j in range(tile):
                        builder.store(builder.call(ffma, [w, xs[j], builder.load(accs[i][j])]), accs[i][j])
            for j in range(tile):
                oj = builder.add(ooff, builder.mul(ostride, ir.Constant(_I64, j)))
                for i in range(rows):  # a shuffle tree per accumulator (reassociated), not 16 serial adds
                    r = builder.call(fred, [ir.Constant(_F32, -0.0), builder.load(accs[i][j])], fastmath=("reassoc",))
                    builder.store(r, builder.gep(od, [builder.add(oj, ir.Constant(_I64, i))]))
            return context.get_dummy_value()

        return sig, codegen

    return _dot_block


_block_4x4 = _make_dot_block(ROW_BLOCK, 4)
_block_4x3 = _make_dot_block(ROW_BLOCK, 3)
_block_4x2 = _make_dot_block(ROW_BLOCK, 2)
_block_4x1 = _make_dot_block(ROW_BLOCK, 1)


@intrinsic
def _expand_row(typingctx, vals, voff, masks, moff, out, ooff, nchunks, per):  # pragma: no cover - compiled
    """Write the dense row: out[ooff + 16c:][:16] = expand(vals[voff + c*per:], masks[moff + c])."""
    _check_array(vals, "values", (types.float32, types.int16))
    _check_array(masks, "masks", (types.int16,))
    _check_array(out, "out", (vals.dtype,))
    bf16 = vals.dtype == types.int16
    sig = types.void(vals, types.intp, masks, types.intp, out, types.intp, types.intp, types.intp)
    vt = _VI16 if bf16 else _VF
    name = "llvm.masked.expandload.v16i16" if bf16 else "llvm.masked.expandload.v16f32"

    def codegen(context, builder, s, args):
        vd = _data(context, builder, s.args[0], args[0])
        md = _data(context, builder, s.args[2], args[2])
        od = _data(context, builder, s.args[4], args[4])
        voff, moff, ooff, nch, per = args[1], args[3], args[5], args[6], args[7]
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vd.type, _VM, vt]), name)
        with cgutils.for_range(builder, nch) as loop:
            c = loop.index
            mk = builder.bitcast(builder.load(builder.gep(md, [builder.add(moff, c)])), _VM)
            w = builder.call(fn, [builder.gep(vd, [builder.add(voff, builder.mul(c, per))]), mk, ir.Constant(vt, None)])
            op = builder.gep(od, [builder.add(ooff, builder.mul(c, ir.Constant(_I64, CHUNK)))])
            builder.store(w, builder.bitcast(op, vt.as_pointer()), align=2)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _matmul_block(vals, masks, x, out, batch, rows, per, nchunks, i):  # pragma: no cover - compiled
    """Block ``i`` of ROW_BLOCK output rows (the last block is moved back to end at ``rows``, recomputing
    a few rows of the one before it: the same bits either way; needs ``rows >= ROW_BLOCK``), for every x
    row: x rows in tiles of 4, the last ``batch % 4`` in one tile of 1, 2 or 3."""
    r = min(i * ROW_BLOCK, rows - ROW_BLOCK)
    k = vals.size // rows
    xs = nchunks * CHUNK
    tiled = batch - batch % 4
    rest = batch - tiled
    for b in range(0, tiled, 4):
        _block_4x4(vals, r * k, k, masks, r * nchunks, nchunks, per, x, b * xs, xs, out, b * rows + r, rows)
    if rest == 3:
        _block_4x3(vals, r * k, k, masks, r * nchunks, nchunks, per, x, tiled * xs, xs, out, tiled * rows + r, rows)
    elif rest == 2:
        _block_4x2(vals, r * k, k, masks, r * nchunks, nchunks, per, x, tiled * xs, xs, out, tiled * rows + r, rows)
    elif rest == 1:
        _block_4x1(vals, r * k, k, masks, r * nchunks, nchunks, per, x, tiled * xs, xs, out, tiled * rows + r, rows)


@numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _matmul_kernel(vals, masks, x, out, batch, rows, per, nchunks):  # pragma: no cover - compiled
    """out[b * rows + r] = row r of the packed weight . x[b, :], for b < batch, r < rows (>= ROW_BLOCK),
    parallel over blocks of ROW_BLOCK output rows."""
    for i in numba.prange(-(-rows // ROW_BLOCK)):
        _matmul_block(vals, masks, x, out, batch, rows, per, nchunks, i)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _matmul_serial(vals, masks, x, out, batch, rows, per, nchunks):  # pragma: no cover - compiled
    """``_matmul_kernel`` on the calling thread only (small products: no thread-pool round trip)."""
    for i in range(-(-rows // ROW_BLOCK)):
        _matmul_block(vals, masks, x, out, batch, rows, per, nchunks, i)


@numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def _unpack_kernel(vals, masks, out, rows, per, nchunks):  # pragma: no cover - compiled
    k = vals.size // max(rows, 1)
    for r in numba.prange(rows):
        _expand_row(vals, r * k, masks, r * nchunks, out, r * nchunks * CHUNK, nchunks, per)


def _flat_np(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous().view(-1)
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def padded_in(in_features: int) -> int:
    """``in`` rounded up to whole 16-column chunks (the kernel's x row stride)."""
    return -(-in_features // CHUNK) * CHUNK


def check_kernel_nm(n: int, m: int) -> None:
    """ValueError unless the CPU kernel handles n:m (m in 2, 4, 8, 16; 0 < n < m)."""
    if m not in KERNEL_M:
        raise ValueError(f"the CPU N:M kernel supports m in {KERNEL_M} (a divisor of 16), got m={m}")
    if not 0 < n < m:
        raise ValueError(f"need 0 < n < m (n = weights kept per group of m), got n={n}, m={m}")


def nonzero_counts(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros per group of m along ``in`` of a 2-d weight (NaN counts; -0.0 does not): ``(out, in/m)``."""
    return (weight != 0).view(weight.shape[0], -1, m).sum(-1)


def pack(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a 2-d N:M weight ``(out, in)`` (groups of m along ``in``, float32 or bfloat16) into
    ``(values, masks)`` (see the module docstring), in one compiled pass. ValueError (naming the first
    offending row and group) when a group holds more than n non-zeros."""
    out_f, in_f = weight.shape
    w = weight.detach().contiguous()
    values = torch.empty(out_f, in_f * n // m, dtype=w.dtype)
    masks = torch.empty(out_f, padded_in(in_f) // CHUNK, dtype=torch.int16)
    bad = np.zeros(out_f, dtype=np.int64)
    if w.numel():
        absmask, ity = (0x7FFF, np.int16) if w.dtype == torch.bfloat16 else (0x7FFF_FFFF, np.int32)
        _numba_pool.run(pack_kernel.pack_rows, _flat_np(w).view(ity), in_f, n, m, absmask,
                        _flat_np(values).view(ity), _flat_np(masks).view(np.uint16), bad)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        g, count = divmod(int(bad[r]) - 1, m + 1)
        raise ValueError(f"weight {tuple(weight.shape)} is not {n}:{m} along in: row {r}, group {g} (columns "
                         f"{g * m}..{g * m + m - 1}) has {count} non-zeros")
    return values, masks


def unpack(values: torch.Tensor, masks: torch.Tensor, n: int, m: int, in_features: int,
           padded: bool = False, expand: bool | None = None) -> torch.Tensor:
    """The dense ``(out, in)`` weight of a packed one (``(out, padded_in(in))`` with ``padded=True``:
    zero columns past ``in``), in ``values``' dtype.

    ``expand``: use the ``expandload`` kernel (fast with AVX-512, scalar elsewhere) or plain loops
    that every CPU compiles well; default: ``expandload`` only where the CPU has the AVX-512 kernel."""
    rows, nchunks = masks.shape
    out = torch.empty(rows, nchunks * CHUNK, dtype=values.dtype)
    if expand is None:
        expand = not cpu_select.missing("avx512", values.dtype, cpu_select.host_cpu())
    if out.numel():
        kernel = _unpack_kernel if expand else cpu_nm_avx2.unpack_portable
        _numba_pool.run(kernel, _flat_np(values), _flat_np(masks), _flat_np(out), rows, CHUNK * n // m, nchunks)
    return out if padded or out.shape[1] == in_features else out[:, :in_features].contiguous()


SERIAL_WORK = 1 << 16  # batch * rows * chunks up to which the product runs on the calling thread


def nm_matmul(x: torch.Tensor, values: torch.Tensor, masks: torch.Tensor, n: int, m: int,
              in_features: int, arrays: tuple[np.ndarray, np.ndarray] | None = None,
              path: str = "avx512") -> torch.Tensor:
    """``x @ W.T`` for a 2-d fp32 ``x`` ``(batch, in)`` and a packed weight, as fp32 ``(batch, out)``.

    ``path``: ``"avx512"`` (this module's ``expandload`` kernel) or ``"avx2"``
    (:mod:`nmsparse.kernels.cpu_nm_avx2`, m in 2, 4, 8); :mod:`nmsparse.kernels.cpu_select` says
    which one the CPU runs natively (the caller's job: this function runs what it is told).

    ``arrays``: ``(values, masks)`` already flattened to numpy by :func:`packed_arrays` (a layer called
    many times keeps them, saving two conversions per call). Products of at most ``SERIAL_WORK``
    chunk-rows (``batch * out * ceil(in/16)``; 64Ki is about 0.1 ms of work) run on the calling thread,
    larger ones on numba's pool with torch's thread count."""
    batch = x.shape[0]
    rows, nchunks = masks.shape
    out_np = np.empty(batch * rows, dtype=np.float32)
    out = torch.from_numpy(out_np.reshape(batch, rows))  # a base tensor (not a view) sharing out_np's memory
    if batch == 0 or rows == 0:
        return out
    if rows < ROW_BLOCK:  # the kernel works on whole blocks of rows: pad with empty rows
        pv = torch.zeros(ROW_BLOCK, values.shape[1], dtype=values.dtype)
        pm = torch.zeros(ROW_BLOCK, nchunks, dtype=torch.int16)
        pv[:rows], pm[:rows] = values, masks
        return nm_matmul(x, pv, pm, n, m, in_features, path=path)[:, :rows].clone()
    pin = nchunks * CHUNK
    if pin != in_features:
        xp = torch.zeros(batch, pin, dtype=torch.float32)
        xp[:, :in_features] = x
    else:
        xp = x.contiguous()
    vn, mn = arrays if arrays is not None else packed_arrays(values, masks)
    args = (vn, mn, xp.view(-1).numpy(), out_np, batch, rows, CHUNK * n // m, nchunks)
    if path == "avx2":
        serial, parallel = cpu_nm_avx2.drivers(n, m)
        args = args + (cpu_nm_avx2.lut_for(n, m, values.dtype == torch.bfloat16),)
    elif path == "avx512":
        serial, parallel = _matmul_serial, _matmul_kernel
    else:
        raise ValueError(f"nm_matmul: path must be 'avx512' or 'avx2', got {path!r}")
    if batch * rows * nchunks <= SERIAL_WORK or torch.get_num_threads() == 1:
        serial(*args)
    else:
        _numba_pool.run(parallel, *args)
    return out


def packed_arrays(values: torch.Tensor, masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The flat numpy views the kernels read (bf16 values as int16 bits). They share memory with the
    tensors when those are contiguous, so they stay valid while the tensors' storage does."""
    return _flat_np(values), _flat_np(masks)
