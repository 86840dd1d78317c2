"""The AVX2 + FMA N:M kernel: the same packed layout as :mod:`nmsparse.kernels.cpu_nm`, no expand instruction.

N is the number of weights **kept** in every group of M consecutive weights along ``in`` (2:4 keeps 2).

AVX2 has no ``vexpandps``; LLVM lowers ``llvm.masked.expandload`` to scalar code there (3-20x slower
than dense). This kernel expands each 16-column chunk as two 8-column halves instead. For m in 2, 4, 8
every half holds exactly ``h = 8 * n / m`` stored values (its groups never straddle it), consecutive
in ``values``:

1. load the half's ``h`` values (exactly ``h``: never past the end of ``values``) into lanes
   ``0 .. h-1`` of a ymm register, zeros above (bf16: ``h`` 16-bit lanes, zero-extended and shifted
   into fp32 lanes);
2. one ``vpermps`` with an index vector looked up by the half's mask byte (``LUT[byte]``, 256 x 8
   int32 = 8 KiB, in L1): lane ``j`` takes value ``rank of bit j among the byte's set bits`` when bit
   ``j`` is set, else lane 7, which is one of the zeros (``h <= 7``).

That is the expanded half, bit for bit (NaN and inf included), then an FMA with the matching 8 entries
of ``x``. bf16 chunks of at most 8 values (2:4, 4:8, 1:4, ...: ``h <= 4``) take a shorter route: one
broadcast load of the chunk's values into both 128-bit lanes and one ``vpshufb`` per half, whose
control (:func:`bf16_lut`, 16 KiB) moves each kept value into the upper two bytes of its fp32 lane and
zeros everything else, so expanding and widening are one instruction. Blocks of 4 output rows x up
to 4 x rows, a prefetch 2 KiB ahead per row, and the driver (padding, threads) are those of the
AVX-512 kernel (:func:`nmsparse.kernels.cpu_nm.nm_matmul` with
``path="avx2"``). fp32 accumulation in 8 lanes: the sums differ from the AVX-512 kernel's by rounding.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

HALF = 8  # columns per mask byte / ymm register of fp32
CHUNK = 16
ROW_BLOCK = 4
PREFETCH_BYTES = 2048  # software prefetch distance along each row of values (fp32 2:4: 64 chunks)
SPLIT_TILE = 0  # tiles up to this many x rows keep separate accumulators per half (16 ymm: 0 avoids spills)

_I64 = ir.IntType(64)
_I32 = ir.IntType(32)
_I16 = ir.IntType(16)
_F32 = ir.FloatType()
_V8F = ir.VectorType(_F32, HALF)
_V8I32 = ir.VectorType(_I32, HALF)
_V32I8 = ir.VectorType(ir.IntType(8), 32)


def _make_lut() -> np.ndarray:
    """``LUT[b * 8 + j]``: the lane of the compacted values that expanded lane ``j`` of mask byte ``b``
    takes (the rank of bit ``j`` among ``b``'s set bits), 7 (a zero lane) where bit ``j`` is clear."""
    lut = np.full((256, HALF), HALF - 1, dtype=np.int32)
    for b in range(256):
        rank = 0
        for j in range(HALF):
            if b >> j & 1:
                lut[b, j] = rank
                rank += 1
    return lut.reshape(-1)


LUT = _make_lut()


def bf16_lut(h: int) -> np.ndarray:
    """``vpshufb`` controls for bf16 chunks of ``2h <= 8`` values (h per 8 columns), both halves:
    ``[half * 256 + byte][32 bytes]``. Output fp32 lane ``j`` of a half with mask ``byte`` takes the
    bf16 value ``half * h + rank`` into its upper two bytes (the fp32 of that bf16) when bit ``j`` is
    set; every other byte is 0x80 (zero). Each 128-bit lane of the source holds all 2h values."""
    ctl = np.full((2, 256, HALF, 4), 0x80, dtype=np.uint8)
    for half in range(2):
        for b in range(256):
            rank = 0
            for j in range(HALF):
                if b >> j & 1:
                    v = half * h + rank
                    ctl[half, b, j, 2], ctl[half, b, j, 3] = 2 * v, 2 * v + 1
                    rank += 1
    return ctl.reshape(-1)


_BF16_LUTS: dict[int, np.ndarray] = {}


def lut_for(n: int, m: int, bf16: bool) -> np.ndarray:
    """The table the kernel for n:m reads: :data:`LUT` (fp32, or bf16 with more than 4 values per 8
    columns) or :func:`bf16_lut` (bf16 chunks of at most 8 values: one ``vpshufb`` expands and widens)."""
    h = HALF * n // m
    if not bf16 or h > 4:
        return LUT
    if h not in _BF16_LUTS:
        _BF16_LUTS[h] = bf16_lut(h)
    return _BF16_LUTS[h]


def _data(context, builder, aty, arr):
    return context.make_array(aty)(context, builder, arr).data


def _half(builder, vd, lutd, index, byte, h: int, bf16: bool):
    """The 8 expanded fp32 lanes of a half chunk: its h values start at ``vd[index]``; ``byte`` (i32)."""
    zeros_then = ir.Constant(ir.VectorType(_I32, HALF), list(range(h)) + [h] * (HALF - h))
    p = builder.gep(vd, [index])
    if bf16:
        vt = ir.VectorType(_I16, h)
        v = builder.load(builder.bitcast(p, vt.as_pointer()), align=2)
        v = builder.shuffle_vector(v, ir.Constant(vt, None), zeros_then)
        wide = builder.shl(builder.zext(v, _V8I32), ir.Constant(_V8I32, [16] * HALF))
        v = builder.bitcast(wide, _V8F)
    else:
        vt = ir.VectorType(_F32, h)
        v = builder.load(builder.bitcast(p, vt.as_pointer()), align=4)
        v = builder.shuffle_vector(v, ir.Constant(vt, None), zeros_then)
    ip = builder.gep(lutd, [builder.mul(builder.zext(byte, _I64), ir.Constant(_I64, HALF))])
    idx = builder.load(builder.bitcast(ip, _V8I32.as_pointer()), align=4)
    perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8F, [_V8F, _V8I32]), "llvm.x86.avx2.permps")
    return builder.call(perm, [v, idx])


def _halves_shuffled(builder, vd, lutd, index, lo, hi, h: int):
    """Both expanded fp32 halves of a bf16 chunk of 2h <= 8 values at ``vd[index]``: one broadcast load
    of the chunk's values to both 128-bit lanes, one ``vpshufb`` per half (control ``lutd``, see
    :func:`bf16_lut`), which places each kept value in the upper half of its fp32 lane and zeros elsewhere."""
    vt = ir.VectorType(_I16, 2 * h)
    v = builder.load(builder.bitcast(builder.gep(vd, [index]), vt.as_pointer()), align=2)
    splat = [i if i < 2 * h else 2 * h for i in range(8)] * 2
    v = builder.shuffle_vector(v, ir.Constant(vt, None), ir.Constant(ir.VectorType(_I32, 16), splat))
    v8 = builder.bitcast(v, _V32I8)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32I8, [_V32I8, _V32I8]), "llvm.x86.avx2.pshuf.b")
    out = []
    for half, byte in ((0, lo), (1, hi)):
        row = builder.add(builder.zext(byte, _I64), ir.Constant(_I64, 256 * half))
        cp = builder.gep(lutd, [builder.mul(row, ir.Constant(_I64, 32))])
        ctl = builder.load(builder.bitcast(cp, _V32I8.as_pointer()), align=1)
        out.append(builder.bitcast(builder.call(fn, [v8, ctl]), _V8F))
    return out


def _check(arr, what, dtypes):
    if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.dtype not in dtypes:
        raise numba.core.errors.TypingError(f"{what} must be a 1-d array of {dtypes}, got {arr}")


@intrinsic
def _avx2_block(typingctx, tile, h, vals, voff, vstride, masks, moff, nchunks, per, x, xoff, xstride, out, ooff,
                ostride, lut):  # pragma: no cover - compiled
    """A ROW_BLOCK x ``tile`` block of the product (``tile``, ``h``: compile-time constants; ``h`` stored
    values per 8 columns). Same contract as the AVX-512 kernel's ``_dot_block``, plus ``lut`` (:data:`LUT`)."""
    if not isinstance(tile, types.IntegerLiteral) or not isinstance(h, types.IntegerLiteral):
        return None
    rows, tile_n, hv = ROW_BLOCK, tile.literal_value, h.literal_value
    if not (1 <= tile_n <= 4 and 1 <= hv < HALF):
        raise numba.core.errors.TypingError(f"tile {tile_n} / h {hv} out of range")
    _check(vals, "values", (types.float32, types.int16))
    _check(masks, "masks", (types.int16,))
    _check(x, "x", (types.float32,))
    _check(out, "out", (types.float32,))
    bf16 = vals.dtype == types.int16
    shuffled = bf16 and hv <= 4  # the vpshufb form (bf16_lut); else vpermps (LUT)
    _check(lut, "lut", (types.uint8,) if shuffled else (types.int32,))
    sig = types.void(tile, h, vals, types.intp, types.intp, masks, types.intp, types.intp, types.intp, x, types.intp,
                     types.intp, out, types.intp, types.intp, lut)
    split = tile_n <= SPLIT_TILE  # separate accumulators for the two halves: shorter FMA chains when few x rows

    def codegen(context, builder, s, args):
        vd = _data(context, builder, s.args[2], args[2])
        md = _data(context, builder, s.args[5], args[5])
        xd = _data(context, builder, s.args[9], args[9])
        od = _data(context, builder, s.args[12], args[12])
        ld = _data(context, builder, s.args[15], args[15])
        voff, vstride, moff, nch, per, xoff, xstride, ooff, ostride = (args[i] for i in (3, 4, 6, 7, 8, 10, 11, 13, 14))
        mod = builder.module
        ffma = cgutils.get_or_insert_function(mod, ir.FunctionType(_V8F, [_V8F, _V8F, _V8F]), "llvm.fma.v8f32")
        pfetch = cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), [vd.type, _I32, _I32, _I32]),
                                                "llvm.prefetch.p0")
        fred = cgutils.get_or_insert_function(mod, ir.FunctionType(_F32, [_F32, _V8F]), "llvm.vector.reduce.fadd.v8f32")
        nacc = 2 if split else 1
        accs = [[[cgutils.alloca_once_value(builder, ir.Constant(_V8F, None)) for _ in range(nacc)]
                 for _ in range(tile_n)] for _ in range(rows)]
        ahead = ir.Constant(_I64, PREFETCH_BYTES // (2 if bf16 else 4))  # elements: the same distance in bytes
        hconst = ir.Constant(_I64, hv)
        with cgutils.for_range(builder, nch) as loop:
            c = loop.index
            col = builder.add(xoff, builder.mul(c, ir.Constant(_I64, CHUNK)))
            xs = []
            for j in range(tile_n):
                base = builder.add(col, builder.mul(xstride, ir.Constant(_I64, j)))
                pair = []
                for k in range(2):
                    xp = builder.gep(xd, [builder.add(base, ir.Constant(_I64, k * HALF))])
                    pair.append(builder.load(builder.bitcast(xp, _V8F.as_pointer()), align=4))
                xs.append(pair)
            for i in range(rows):
                ci = ir.Constant(_I64, i)
                vo = builder.add(builder.add(voff, builder.mul(vstride, ci)), builder.mul(c, per))
                if PREFETCH_BYTES:
                    builder.call(pfetch, [builder.gep(vd, [builder.add(vo, ahead)]), ir.Constant(_I32, 0),
                                          ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
                mk = builder.load(builder.gep(md, [builder.add(builder.add(moff, builder.mul(nch, ci)), c)]))
                mk = builder.zext(mk, _I32)
                lo = builder.and_(mk, ir.Constant(_I32, 0xFF))
                hi = builder.lshr(mk, ir.Constant(_I32, HALF))
                if shuffled:
                    ws = _halves_shuffled(builder, vd, ld, vo, lo, hi, hv)
                else:
                    ws = (_half(builder, vd, ld, vo, lo, hv, bf16),
                          _half(builder, vd, ld, builder.add(vo, hconst), hi, hv, bf16))
                for j in range(tile_n):
                    for k in range(2):
                        a = accs[i][j][k if split else 0]
                        builder.store(builder.call(ffma, [ws[k], xs[j][k], builder.load(a)]), a)
        for j in range(tile_n):
            oj = builder.add(ooff, builder.mul(ostride, ir.Constant(_I64, j)))
            for i in range(rows):
                acc = builder.load(accs[i][j][0])
                if split:
                    acc = builder.fadd(acc, builder.load(accs[i][j][1]))
                r = builder.call(fred, [ir.Constant(_F32, -0.0), acc], fastmath=("reassoc",))
                builder.store(r, builder.gep(od, [builder.add(oj, ir.Constant(_I64, i))]))
        return context.get_dummy_value()

    return sig, codegen


def _driver(h: int):
    """The numba functions for ``h`` values per 8 columns: (serial, parallel) with the AVX-512 kernel's
    arguments plus the LUT. ``h`` is a closure constant: a literal for the intrinsic, part of the cache key."""

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def block(vals, masks, x, out, batch, rows, per, nchunks, i, lut):  # pragma: no cover - compiled
        r = min(i * ROW_BLOCK, rows - ROW_BLOCK)
        k = vals.size // rows
        xs = nchunks * CHUNK
        tiled = batch - batch % 4
        rest = batch - tiled
        for b in range(0, tiled, 4):
            _avx2_block(4, h, vals, r * k, k, masks, r * nchunks, nchunks, per, x, b * xs, xs, out, b * rows + r, rows,
                        lut)
        if rest == 3:
            _avx2_block(3, h, vals, r * k, k, masks, r * nchunks, nchunks, per, x, tiled * xs, xs, out, tiled * rows + r,
                        rows, lut)
        elif rest == 2:
            _avx2_block(2, h, vals, r * k, k, masks, r * nchunks, nchunks, per, x, tiled * xs, xs, out, tiled * rows + r,
                        rows, lut)
        elif rest == 1:
            _avx2_block(1, h, vals, r * k, k, masks, r * nchunks, nchunks, per, x, tiled * xs, xs, out, tiled * rows + r,
                        rows, lut)

    @numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
    def parallel(vals, masks, x, out, batch, rows, per, nchunks, lut):  # pragma: no cover - compiled
        for i in numba.prange(-(-rows // ROW_BLOCK)):
            block(vals, masks, x, out, batch, rows, per, nchunks, i, lut)

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def serial(vals, masks, x, out, batch, rows, per, nchunks, lut):  # pragma: no cover - compiled
        for i in range(-(-rows // ROW_BLOCK)):
            block(vals, masks, x, out, batch, rows, per, nchunks, i, lut)

    return serial, parallel


_DRIVERS: dict[int, tuple] = {}


def drivers(n: int, m: int) -> tuple:
    """(serial, parallel) kernels for n:m (m in 2, 4, 8), built on first use."""
    h = HALF * n // m
    if m not in (2, 4, 8) or not 0 < n < m:
        raise ValueError(f"the AVX2 N:M kernel takes m in (2, 4, 8) and 0 < n < m, got {n}:{m}")
    if h not in _DRIVERS:
        _DRIVERS[h] = _driver(h)
    return _DRIVERS[h]


@numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def unpack_portable(vals, masks, out, rows, per, nchunks):  # pragma: no cover - compiled
    """``cpu_nm.unpack``'s kernel without ``expandload``: plain loops that every CPU compiles well (the
    dense fallback's one-time decompression on CPUs without AVX-512)."""
    k = vals.size // max(rows, 1)
    for r in numba.prange(rows):
        for c in range(nchunks):
            p = r * k + c * per
            word = np.int32(masks[r * nchunks + c]) & 0xFFFF
            base = (r * nchunks + c) * CHUNK
            for j in range(CHUNK):
                if word >> j & 1:
                    out[base + j] = vals[p]
                    p += 1
                else:
                    out[base + j] = 0
