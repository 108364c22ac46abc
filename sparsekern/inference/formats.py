"""The sparse weight formats of the inference modules: built from a dense weight, and back.

Each format is the operand layout of one raw op of ``sparsekern.ops.spmm``:

* CSR over output rows (:func:`csr_from_dense`, ``csr_mm`` / ``csr_conv``): ``rowptr`` int64
  ``[out + 1]``, ``col`` int32 ``[nnz]`` (input feature), ``val`` fp32 ``[nnz]``;
* block CSR (:func:`bsr_from_dense`, ``bsr_mm``): ``val [nnzb, bo, bi]`` (edge blocks
  zero-padded), ``col`` int32 block columns, ``rowptr`` int64 ``[⌈out/bo⌉+1]``;
* N:M compressed along ``in`` (:func:`nm_from_dense`, ``nm_mm``): ``val [out, in·n/m]``, ``idx``
  uint8 (position in group ``j // n``);
* CK kernel skipping (:func:`ck_from_dense`, ``ck_conv``): per output channel its alive ``R×S``
  kernels (``chan`` int32) with their dense taps ``val [nk, R·S]``.

CSR, block CSR and CK are one structure, rows of alive entries (a nonzero, a block with a nonzero,
a kernel with a nonzero tap) with their values: :func:`_alive_rows` builds it,
:func:`_scatter_rows` undoes it. The ``*_to_dense`` functions serve the modules' ``weight_dense``;
the tests check them (and the kernels) against ``sparsekern.reference``.
"""
import torch


def _check_2d(w, fn):
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"{fn}: expected a 2-D weight tensor, got {getattr(w, 'shape', w)}")
    if w.dtype != torch.float32:
        raise ValueError(f"{fn}: weight must be float32, got {w.dtype}")
    return w.detach()


def _alive_rows(alive, values):
    """``(rowptr int64 [rows+1], col int32 [nnz], values[alive] [nnz, ...])`` of a bool
    ``alive [rows, cols]`` and ``values [rows, cols, ...]``: row-major, columns ascending."""
    nz = alive.nonzero()
    counts = torch.bincount(nz[:, 0], minlength=alive.shape[0])
    rowptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int64)
    return rowptr, nz[:, 1].to(torch.int32).contiguous(), values[nz[:, 0], nz[:, 1]].contiguous()


def _scatter_rows(rowptr, col, val, shape):
    """Inverse of :func:`_alive_rows`: zeros of ``shape = (rows, cols, ...)`` with ``val [nnz, ...]``
    at ``(row, col)``, the row of entry ``k`` given by ``rowptr``."""
    rows = torch.repeat_interleave(torch.arange(shape[0], device=val.device), rowptr.diff())
    w = val.new_zeros(shape)
    w[rows, col.long()] = val
    return w


def csr_from_dense(w):
    """CSR of a 2-D fp32 weight ``[out, in]``: ``(rowptr int64 [out+1], col int32 [nnz],
    val fp32 [nnz])``, exact zeros dropped, columns ascending within a row."""
    w = _check_2d(w, "csr_from_dense")
    return _alive_rows(w != 0, w)


def csr_to_dense(rowptr, col, val, shape):
    """Dense ``shape = [out, in]`` weight of a CSR weight (:func:`csr_from_dense`)."""
    return _scatter_rows(rowptr, col, val, tuple(shape))


def _blocks(w, block):
    """``w [out, in]`` zero-padded to whole blocks: ``[⌈out/bo⌉, ⌈in/bi⌉, bo, bi]``."""
    (bo, bi), (o, i) = block, w.shape
    w = torch.nn.functional.pad(w, (0, -i % bi, 0, -o % bo))
    return w.reshape(w.shape[0] // bo, bo, w.shape[1] // bi, bi).transpose(1, 2)


def _alive_blocks(b):
    return (b != 0).any(-1).any(-1)


def bsr_from_dense(w, block):
    """Block CSR of a 2-D fp32 weight ``[out, in]`` with ``block = (bo, bi)``: ``(rowptr int64
    [⌈out/bo⌉+1], col int32 [nnzb], val fp32 [nnzb, bo, bi])``; blocks with any nonzero are
    stored whole (edge blocks zero-padded), block columns ascending within a block row."""
    w = _check_2d(w, "bsr_from_dense")
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"bsr_from_dense: block must be two positive ints, got {block}")
    b = _blocks(w, tuple(int(v) for v in block))
    return _alive_rows(_alive_blocks(b), b)


def bsr_to_dense(rowptr, col, val, shape):
    """Dense ``shape = [out, in]`` weight of a block-CSR weight (:func:`bsr_from_dense`); the zero
    padding of edge blocks is cropped."""
    bo, bi = val.shape[1:]
    brows, bcols = -(-shape[0] // bo), -(-shape[1] // bi)
    w = _scatter_rows(rowptr, col, val, (brows, bcols, bo, bi))
    return w.transpose(1, 2).reshape(brows * bo, bcols * bi)[:shape[0], :shape[1]]


def block_fill(w, block):
    """Fraction of the stored values of :func:`bsr_from_dense` that are nonzero (1 when empty)."""
    nnzb = int(_alive_blocks(_blocks(w.detach(), block)).sum())
    return int((w != 0).sum()) / (nnzb * block[0] * block[1]) if nnzb else 1.0


#: N:M ratios tried by :func:`nm_pattern` (m values; n is the weight's largest group count).
NM_GROUPS = (4, 8, 16)


def nm_pattern(w):
    """The ``(n, m)`` with the fewest stored values ``n/m`` (``m`` in :data:`NM_GROUPS`,
    ``n <= m/2``) such that every group of ``m`` consecutive inputs of ``w [out, in]`` holds at
    most ``n`` nonzeros; None if there is none (not N:M)."""
    best = None
    for m in NM_GROUPS:
        if w.dim() != 2 or w.shape[1] % m or w.numel() == 0:
            continue
        n = max(1, int((w.detach() != 0).reshape(w.shape[0], -1, m).sum(-1).max()))
        if 2 * n <= m and (best is None or n / m < best[0] / best[1]):
            best = (n, m)
    return best


def nm_from_dense(w, n, m):
    """N:M compression of a 2-D fp32 weight ``[out, in]`` (``in % m == 0``, at most ``n``
    nonzeros in every group of ``m`` consecutive inputs): ``(val fp32 [out, in·n/m], idx uint8
    [out, in·n/m])``, positions ascending within a group; groups with fewer than ``n`` nonzeros
    are filled with zeros at unused positions. ValueError if ``w`` is not N:M."""
    w = _check_2d(w, "nm_from_dense")
    if not (1 <= n <= m <= 256) or w.shape[1] % m:
        raise ValueError(f"nm_from_dense: need 1 <= n <= m <= 256 and in_features ({w.shape[1]}) "
                         f"a multiple of m; got n={n}, m={m}")
    g = w.reshape(w.shape[0], -1, m)
    zero = (g == 0).to(torch.int8)
    if g.numel() and int((1 - zero).sum(-1).max()) > n:
        raise ValueError(f"nm_from_dense: the weight is not {n}:{m} (a group of {m} inputs has more "
                         f"than {n} nonzeros)")
    pos = zero.argsort(dim=-1, stable=True)[..., :n].sort(-1).values  # nonzeros first, then zeros
    val = g.gather(-1, pos).reshape(w.shape[0], -1).contiguous()
    return val, pos.reshape(w.shape[0], -1).to(torch.uint8).contiguous()


def nm_to_dense(val, idx, n, m, in_features):
    """Dense ``[out, in]`` weight of an N:M-compressed one (:func:`nm_from_dense`): stored value
    ``j`` of row ``r`` is ``W[r, (j // n)·m + idx[r, j]]``."""
    cols = torch.arange(val.shape[1], device=val.device) // n * m + idx.long()
    return val.new_zeros(val.shape[0], in_features).scatter_add_(1, cols, val)


def ck_from_dense(w):
    """Kernel-skipping (CK) form of a conv weight ``[out, C, R, S]`` (fp32): ``(rowptr int64
    [out+1], chan int32 [nk], val fp32 [nk, R·S])``: per output channel its alive kernels (any
    nonzero tap), input channels ascending, with their dense taps."""
    if not isinstance(w, torch.Tensor) or w.dim() != 4 or w.dtype != torch.float32:
        raise ValueError(f"ck_from_dense: expected a float32 [out, C, R, S] weight, got "
                         f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
    k = w.detach().reshape(w.shape[0], w.shape[1], -1)
    return _alive_rows((k != 0).any(-1), k)


def ck_to_dense(rowptr, chan, val, shape):
    """Dense ``shape = [out, C, R, S]`` weight of a CK weight (:func:`ck_from_dense`)."""
    return _scatter_rows(rowptr, chan, val.reshape(-1, *shape[2:]), tuple(shape))


#: Columns per mask word of the bitmap format (the kernel reads the mask 8 bytes at a time).
BITMAP_COLS = 64
#: Values of zero slack after a bitmap weight's nonzeros (the kernel loads 8 at a time).
BITMAP_SLACK = 8


def bitmap_from_dense(w):
    """Bitmap form of a 2-D bf16 / fp16 weight ``[out, in]`` (``bitmap_mm``): ``(rowptr int64
    [out+1], mask uint8 [out, G], val [nnz + 8])``: ``G = 8·⌈in/64⌉``, bit ``j`` of ``mask[r, g]``
    set iff ``w[r, 8g + j] != 0``; ``val`` the nonzeros row by row (columns ascending) in ``w``'s
    dtype, then :data:`BITMAP_SLACK` zeros. 1/8 byte per weight plus 2 per nonzero."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"bitmap_from_dense: expected a bfloat16 / float16 [out, in] weight, got "
                         f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
    w = w.detach()
    out, cols = w.shape
    padded = -(-cols // BITMAP_COLS) * BITMAP_COLS
    alive = torch.nn.functional.pad(w != 0, (0, padded - cols))
    bits = alive.reshape(out, padded // 8, 8).to(torch.uint8) << torch.arange(8, dtype=torch.uint8, device=w.device)
    mask = bits.sum(-1, dtype=torch.uint8).contiguous() if out else torch.zeros(0, padded // 8, dtype=torch.uint8)
    counts = alive.sum(1)
    rowptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int64)
    val = torch.cat([w[w != 0], w.new_zeros(BITMAP_SLACK)]).contiguous()
    return rowptr, mask, val


def bitmap_to_dense(rowptr, mask, val, shape):
    """Dense ``shape = [out, in]`` weight of a bitmap weight (:func:`bitmap_from_dense`)."""
    out, cols = shape
    bits = (mask[..., None] >> torch.arange(8, dtype=torch.uint8, device=mask.device)) & 1
    alive = bits.reshape(out, mask.shape[1] * 8).bool()
    w = val.new_zeros(out, alive.shape[1])
    w[alive] = val[:int(rowptr[-1])]
    return w[:, :cols]
