"""Triton kernels for the spmm family: sparse weight × dense activations (inference).

Five launchers with the names, signatures and preconditions of the C++ kernels (contract in
``csrc/cpu/spmm.cpp`` and ``sparsekern/ops/spmm.py``); ``x`` is ``[in, n]`` contiguous (``csr_conv``:
flat), the ``n`` columns (batch or pixels) are the vector dimension, ``bias`` is ``[out]`` or empty.
Values and ``x`` are fp32 (the contract; fp16/bf16 also work when both have that dtype), every
product is accumulated in fp32 and ``y`` has ``x``'s dtype. ``transpose_out`` returns ``[n, out]``
(Linear layout) instead of ``[out, n]``; a non-contiguous ``x`` is copied. Empty problems (n = 0,
out = 0, no stored values) launch nothing. ``tl.dot`` runs fp32 inputs in full fp32 unless
torch's fp32 matmul may use TF32 (``torch.backends.cuda.matmul.fp32_precision``, or the legacy
``allow_tf32``), 16-bit ones on tensor cores.

* ``csr_mm`` / ``csr_conv`` / ``nm_mm`` (n < 16, or fp32 without tf32): one gather kernel. A
  program owns ``ROWS`` output rows and ``BLOCK_N`` outputs of each; per row it walks the
  nonzeros ``BLOCK_K`` at a time and adds ``Σ val[k] · x[col[k], cols]`` (a ``[BLOCK_K, BLOCK_N]``
  gather of ``x``). CSR takes the row's range from ``rowptr``; N:M rows all hold ``in·n/m``
  values and ``col = (k // n)·m + idx[k]``; the conv reads ``x[off[k] + h·wp + c]`` for output
  ``(h, c)``, ``c < wv``.
* ``nm_mm`` with n ≥ 16 columns and tensor-core inputs (m ≤ 128): the compressed weight tile is
  expanded to dense in registers (reading 1 value + 1 index byte per kept weight) and multiplied
  with ``tl.dot``.
* ``ck_conv``: the alive kernels' dense taps expanded to per-value offsets (``chan·plane + taps``,
  int32), then ``csr_conv``.
* ``bsr_mm``: a program owns one block row and ``BLOCK_N`` columns and adds ``val[b] @ x[tile]``
  over the row's blocks: ``tl.dot`` when both block sides are ≥ 16 (``BK`` ≤ 32 inner columns of a
  block per dot), else a broadcast product (the small CPU block sizes).
"""
import torch
import triton
import triton.language as tl

from ._common import wrap as _wrap

_TILE = 4096  # elements of a [BLOCK_K, BLOCK_N] gather / broadcast-product tile
_MAX_BLOCK_N = 64
_ROWS = 8  # output rows per program of the gather kernel (Linear layout: 32-byte stores)
_MM, _NM, _CONV = 0, 1, 2  # gather-kernel formats (FMT)
_NM_DOT_ROWS, _NM_DOT_K, _NM_DOT_MAX_M = 32, 64, 128  # N:M tl.dot tile: rows, inputs; largest m
_NM_DOT_WARPS = 8  # the [BO, BK] weight expansion over 256 threads (4 warps: 128-200 registers, spills)
# bsr_mm tl.dot: a block's inner side is taken BK = 32 at a time (16 for fp32 FMA dots: ptxas
# spilled their 16 x 32 slices, and with triton 3.7 the 128 x 32 ones); 8 warps from a 64 x 64
# accumulator (32 fp32 a thread) or a 128 x 32 weight slice
_BSR_DOT_K, _BSR_FMA_K, _BSR_WIDE = 32, 16, 64 * 64


@triton.jit
def _blocks_of(n_rows, rows_per_block):
    """(row block, column block) of this program in a 1-D grid of row blocks × column blocks,
    row blocks fastest (a 2-D grid would cap the column blocks at CUDA's 65535 for grid y)."""
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(n_rows, rows_per_block)
    return pid % row_blocks, pid // row_blocks


@triton.jit
def _columns(col_block, n_cols, BLOCK_N: tl.constexpr, INT64: tl.constexpr):
    """(columns, in range) of column block ``col_block`` (int64 when the output needs it)."""
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    if INT64:
        cols = cols.to(tl.int64)
    return cols, cols < n_cols


@triton.jit
def _store_rows(y_ptr, acc, bias_ptr, rows, r_ok, cols, c_ok, stride_yo, stride_yn, HAS_BIAS: tl.constexpr):
    """y[rows, cols] = acc (+ bias[rows]), in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rows[:, None] * stride_yo + cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _gather_kernel(rowptr_ptr, col_ptr, val_ptr, bias_ptr, x_ptr, y_ptr,
                   n_rows, n_in, n_out, ldx, row_len, nm_n, nm_m, wp, wv, stride_yo, stride_yq,
                   FMT: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, INT64: tl.constexpr):
    """y[o, q] = bias[o] + Σ_k val[k]·x[addr(k, q)] over row o's nonzeros, q < n_out.

    FMT 0 (CSR): k in rowptr[o]..rowptr[o+1], addr = col[k]·ldx + q.
    FMT 1 (N:M): k in o·row_len..(o+1)·row_len, addr = ((k - o·row_len) // nm_n·nm_m + idx[k])·ldx + q
    (col_ptr holds idx; inputs ≥ n_in read as 0).
    FMT 2 (conv): CSR rows, addr = off[k] + (q // wv)·wp + q % wv (col_ptr holds off).
    """
    row_block, col_block = _blocks_of(n_rows, ROWS)
    row0 = row_block.to(tl.int64) * ROWS
    q, q_ok = _columns(col_block, n_out, BLOCK_N, INT64)
    if FMT == 2:
        xq = ((q // wv) * wp + q % wv).to(tl.int64)
    else:
        xq = q.to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    r_idx = tl.arange(0, ROWS)
    out = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for r in range(ROWS):
        row = row0 + r
        if FMT == 1:
            start = tl.where(row < n_rows, row * row_len, 0)
            end = tl.where(row < n_rows, start + row_len, 0)
        else:
            start = tl.load(rowptr_ptr + row, mask=row < n_rows, other=0)
            end = tl.load(rowptr_ptr + row + 1, mask=row < n_rows, other=0)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(start, end, BLOCK_K):
            k = k0 + kk
            k_ok = k < end
            v = tl.load(val_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            c = tl.load(col_ptr + k, mask=k_ok, other=0).to(tl.int64)
            if FMT == 0:
                base = c * ldx
            elif FMT == 1:
                c = ((k - start) // nm_n) * nm_m + c
                k_ok = k_ok & (c < n_in)
                base = c * ldx
            else:
                base = c
            xt = tl.load(x_ptr + base[:, None] + xq[None, :], mask=k_ok[:, None] & q_ok[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(v[:, None] * xt, axis=0)
        out = tl.where(r_idx[:, None] == r, acc[None, :], out)
    rows = row0 + r_idx
    _store_rows(y_ptr, out, bias_ptr, rows, rows < n_rows, q, q_ok, stride_yo, stride_yq, HAS_BIAS)


@triton.jit
def _bsr_kernel(rowptr_ptr, col_ptr, val_ptr, bias_ptr, x_ptr, y_ptr, n_rows, n_in, n, bo, bi,
                stride_yo, stride_yn,
                HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                BO: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, BLOCK_N: tl.constexpr,
                INT64: tl.constexpr):
    """y[br·bo + i, cols] = bias + Σ_b val[b, i, :] @ x[col[b]·bi : col[b]·bi + bi, cols], each
    block's inner side BK at a time (BI = BK: the whole block at once)."""
    br, col_block = _blocks_of(n_rows, bo)
    cols, c_ok = _columns(col_block, n, BLOCK_N, INT64)
    oi = tl.arange(0, BO)
    kk = tl.arange(0, BK)
    start = tl.load(rowptr_ptr + br)
    end = tl.load(rowptr_ptr + br + 1)
    acc = tl.zeros([BO, BLOCK_N], dtype=tl.float32)
    for b in range(start, end):
        x0 = tl.load(col_ptr + b).to(tl.int64) * bi
        for k0 in range(0, BI, BK):
            ii = k0 + kk
            i_ok = ii < bi
            w = tl.load(val_ptr + b * bo * bi + oi[:, None] * bi + ii[None, :],
                        mask=(oi < bo)[:, None] & i_ok[None, :], other=0.0)
            xin = x0 + ii
            xt = tl.load(x_ptr + xin[:, None] * n + cols[None, :],
                         mask=(i_ok & (xin < n_in))[:, None] & c_ok[None, :], other=0.0)
            if USE_DOT:
                acc = tl.dot(w, xt, acc, input_precision=PRECISION)
            else:
                acc += tl.sum(w.to(tl.float32)[:, :, None] * xt.to(tl.float32)[None, :, :], axis=1)
    rows = br.to(tl.int64) * bo + oi
    _store_rows(y_ptr, acc, bias_ptr, rows, (oi < bo) & (rows < n_rows), cols, c_ok, stride_yo, stride_yn,
                HAS_BIAS)


@triton.jit
def _nm_dot_kernel(val_ptr, idx_ptr, bias_ptr, x_ptr, y_ptr, n_rows, n_in, n_cols, row_len, n_groups,
                   nm_m, stride_yo, stride_yn,
                   HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, NM_N: tl.constexpr,
                   MP: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr, BLOCK_N: tl.constexpr,
                   INT64: tl.constexpr):
    """N:M with tl.dot: expand a [BO, BK] tile of the weight (G = BK / MP groups of MP ≥ m
    positions) in registers from the NM_N values and indices stored per group, each slot loaded
    once as a [BO, G] tile, then dot it with x[inputs, cols]."""
    G: tl.constexpr = BK // MP
    row_block, col_block = _blocks_of(n_rows, BO)
    rows = row_block.to(tl.int64) * BO + tl.arange(0, BO)
    r_ok = rows < n_rows
    cols, c_ok = _columns(col_block, n_cols, BLOCK_N, INT64)
    p = tl.arange(0, MP)
    kk = tl.arange(0, BK)
    acc = tl.zeros([BO, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, n_groups, G):
        g = g0 + tl.arange(0, G)
        ok = r_ok[:, None] & (g < n_groups)[None, :]
        first = rows[:, None] * row_len + (g * NM_N)[None, :]  # slot 0 of each [BO, G] group
        w = tl.zeros([BO, G, MP], dtype=val_ptr.dtype.element_ty)
        for s in range(NM_N):  # slot s of each group: add its value at its position
            v = tl.load(val_ptr + first + s, mask=ok, other=0.0)
            ix = tl.load(idx_ptr + first + s, mask=ok, other=0).to(tl.int32)
            w += tl.where(ix[:, :, None] == p[None, None, :], v[:, :, None], 0.0)
        gk = g0 + kk // MP
        xin = gk.to(tl.int64) * nm_m + kk % MP
        x_ok = (gk < n_groups) & (kk % MP < nm_m) & (xin < n_in)
        xt = tl.load(x_ptr + xin[:, None] * n_cols + cols[None, :], mask=x_ok[:, None] & c_ok[None, :],
                     other=0.0)
        acc = tl.dot(tl.reshape(w, [BO, BK]), xt, acc, input_precision=PRECISION)
    _store_rows(y_ptr, acc, bias_ptr, rows, r_ok, cols, c_ok, stride_yo, stride_yn, HAS_BIAS)


# ----------------------------------------------------------------------------- host helpers


def _output(x, out_features, n, transpose_out):
    """(y, stride over rows, stride over columns) of a [out, n] or [n, out] result."""
    if transpose_out:
        y = x.new_empty((n, out_features))
        return y, 1, out_features
    y = x.new_empty((out_features, n))
    return y, n, 1


def _fill_bias(y, bias, transpose_out):
    """The result of a weight without nonzeros: bias (or 0) broadcast, no kernel launch."""
    if bias.numel():
        y.copy_((bias[None, :] if transpose_out else bias[:, None]).expand_as(y))
    else:
        y.zero_()
    return y


def _prologue(x, val, bias, out_features, transpose_out):
    """(contiguous x, y, its strides, done) of a matmul launcher; done: y is already the result
    (empty, or a weight without stored values: the bias broadcast), nothing to launch."""
    x = x.contiguous()
    y, *strides = _output(x, out_features, x.shape[1], transpose_out)
    if y.numel() == 0:
        return x, y, strides, True
    if val.numel() == 0:
        return x, _fill_bias(y, bias, transpose_out), strides, True
    return x, y, strides, False


def _tf32():
    """Whether torch's fp32 CUDA matmul may use TF32, set through either API: the legacy
    ``allow_tf32`` (reading it raises once the new API set "tf32") shows in ``fp32_precision``
    too, which also inherits ``torch.backends.fp32_precision``."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


def _dot_precision(dtype):
    """input_precision of tl.dot: fp32 as torch's matmul would run it (tf32 only when
    :func:`_tf32`); None (tensor cores) for 16-bit inputs."""
    if dtype != torch.float32:
        return None
    return "tf32" if _tf32() else "ieee"


def _grid(n_rows, rows_per_block, n_cols, block_n):
    """The 1-D grid of ``_blocks_of``: every row block × column block."""
    return (triton.cdiv(n_rows, rows_per_block) * triton.cdiv(n_cols, block_n),)


def _int64(y):
    """INT64 of a kernel writing y: output offsets reach 2^31 (int32 would wrap)."""
    return y.numel() >= 2**31


def _gather_blocks(n_out):
    """(BLOCK_K, BLOCK_N) of the gather kernel for n_out outputs per row."""
    block_n = min(triton.next_power_of_2(n_out), _MAX_BLOCK_N)
    return max(16, min(_TILE // block_n, 256)), block_n


def _gather(fmt, rowptr, col, val, bias, x, y, n_rows, n_out, strides, ldx=0, row_len=0,
            nm=(1, 1), conv=(1, 1)):
    block_k, block_n = _gather_blocks(n_out)
    _wrap(_gather_kernel)[_grid(n_rows, _ROWS, n_out, block_n)](
        rowptr, col, val, bias, x, y, n_rows, x.shape[0], n_out, ldx, row_len, nm[0], nm[1],
        conv[0], conv[1], strides[0], strides[1],
        FMT=fmt, HAS_BIAS=bias.numel() > 0, ROWS=_ROWS, BLOCK_K=block_k, BLOCK_N=block_n,
        INT64=_int64(y))
    return y


# ----------------------------------------------------------------------------- launchers


def csr_mm(rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, bias: torch.Tensor,
           x: torch.Tensor, out_features: int, transpose_out: bool) -> torch.Tensor:
    """W·x + bias[:, None] for W in CSR (rowptr int64 [out+1], col int32 [nnz], val [nnz]),
    x [in, n] -> [out, n], or [n, out] when transpose_out."""
    x, y, strides, done = _prologue(x, val, bias, out_features, transpose_out)
    if done:
        return y
    n = x.shape[1]
    return _gather(_MM, rowptr, col, val, bias, x, y, out_features, n, strides, ldx=n)


def csr_conv(rowptr: torch.Tensor, off: torch.Tensor, val: torch.Tensor, bias: torch.Tensor,
             x: torch.Tensor, n: int, out_features: int, slab: int, wp: int, wv: int) -> torch.Tensor:
    """z[o, j] = bias[o] + Σ val[k]·x[off[k] + j] over row o (j < n, x flat, off int32), returned
    as y[o, h, c] = z[o, h·wp + c], c < wv: [out, n // wp, wv]. slab (a CPU cache hint) is unused."""
    y = x.new_empty((out_features, n // wp, wv))
    if y.numel() == 0:
        return y
    if val.numel() == 0:
        return _fill_bias(y.view(out_features, -1), bias, False).view_as(y)
    q = y.numel() // out_features
    return _gather(_CONV, rowptr, off, val, bias, x, y, out_features, q, (q, 1), conv=(wp, wv))


def ck_conv(rowptr: torch.Tensor, chan: torch.Tensor, val: torch.Tensor, taps: torch.Tensor,
            bias: torch.Tensor, x: torch.Tensor, n: int, out_features: int, plane: int, slab: int,
            wp: int, wv: int) -> torch.Tensor:
    """csr_conv of a kernel-skipping weight: row o's kernel i (input channel chan[i], dense taps
    val [nk, R·S]) reads x[chan[i]·plane + taps[t] + j]: [out, n // wp, wv]."""
    off = (chan.long()[:, None] * plane + taps.long()[None, :]).reshape(-1).to(torch.int32)
    return csr_conv(rowptr * taps.numel(), off, val.reshape(-1), bias, x, n, out_features, slab, wp, wv)


def bsr_mm(rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, bias: torch.Tensor,
           x: torch.Tensor, out_features: int, transpose_out: bool) -> torch.Tensor:
    """W·x + bias[:, None] for W in block-sparse rows: rowptr int64 [ceil(out/bo)+1], col int32
    [nnzb] (block column), val [nnzb, bo, bi] (edge blocks zero-padded); x [in, n] -> [out, n]
    or [n, out]."""
    x, y, strides, done = _prologue(x, val, bias, out_features, transpose_out)
    if done:
        return y
    n = x.shape[1]
    bo, bi = val.shape[1], val.shape[2]
    bo_p, bi_p = triton.next_power_of_2(bo), triton.next_power_of_2(bi)
    use_dot = bo >= 16 and bi >= 16  # tl.dot needs every side >= 16 (batch 1: 15 idle columns)
    precision = _dot_precision(val.dtype) if use_dot else None
    if use_dot:
        block_n = min(max(triton.next_power_of_2(n), 16), _MAX_BLOCK_N)
        block_k = min(bi_p, _BSR_FMA_K if precision == "ieee" else _BSR_DOT_K)
    else:  # broadcast product [BO, BI, BLOCK_N]: keep it near _TILE elements
        block_n = min(triton.next_power_of_2(n), max(1, _TILE // (bo_p * bi_p)), _MAX_BLOCK_N)
        block_k = bi_p
    _wrap(_bsr_kernel)[_grid(out_features, bo, n, block_n)](
        rowptr, col, val, bias, x, y, out_features, x.shape[0], n, bo, bi, *strides,
        HAS_BIAS=bias.numel() > 0, USE_DOT=use_dot, PRECISION=precision, BO=bo_p, BI=bi_p, BK=block_k,
        BLOCK_N=block_n, INT64=_int64(y), num_warps=8 if bo_p * max(block_n, block_k) >= _BSR_WIDE else 4)
    return y


def nm_mm(val: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, n: int, m: int,
          out_features: int, transpose_out: bool) -> torch.Tensor:
    """W·x + bias[:, None] for W in N:M compressed form: val [out, in·n/m], idx uint8 [out, in·n/m]
    (position 0..m-1 in its group; the j-th value of a row is in group j // n); x [in, n_cols]
    -> [out, n_cols] or [n_cols, out]."""
    x, y, strides, done = _prologue(x, val, bias, out_features, transpose_out)
    if done:
        return y
    cols = x.shape[1]
    row_len = val.shape[1]
    mp = triton.next_power_of_2(m)
    tensor_cores = val.dtype != torch.float32 or _tf32()
    if cols >= 16 and mp <= _NM_DOT_MAX_M and tensor_cores:
        block_n = min(triton.next_power_of_2(cols), _MAX_BLOCK_N)
        _wrap(_nm_dot_kernel)[_grid(out_features, _NM_DOT_ROWS, cols, block_n)](
            val, idx, bias, x, y, out_features, x.shape[0], cols, row_len, row_len // n, m, *strides,
            HAS_BIAS=bias.numel() > 0, PRECISION=_dot_precision(val.dtype), NM_N=n, MP=mp,
            BO=_NM_DOT_ROWS, BK=max(mp, _NM_DOT_K), BLOCK_N=block_n, INT64=_int64(y),
            num_warps=_NM_DOT_WARPS)
        return y
    return _gather(_NM, val, idx, val, bias, x, y, out_features, cols, strides, ldx=cols,
                   row_len=row_len, nm=(n, m))
