"""What the Triton families share: how a kernel is launched, and the row tiling of the
threshold and bound families.

All launchers start a kernel as ``wrap(kernel)[grid](*args, **constexprs)``. ``wrap`` is
``torch.library.wrap_triton`` (the launchers are the ops' CUDA kernels, opaque to
``torch.compile``), except for interpreted kernels (``TRITON_INTERPRET=1``), which launch
as they are: torch >= 2.13 does that itself, older torch rejects them (pytorch#152868).

``recording(callback)`` lets a tool see every launch instead of (or before) running it: the AOT
check (``sparsekern.triton.aot``) derives the kernel variants to compile from the launchers' own
choices this way.

**Row tiling** (reductions over the rows of a row-major ``[R, C]`` view, deterministic): host
side :func:`tiling` gives each program ``BLOCK_R`` rows and ``iters`` consecutive blocks of
``BLOCK_C`` columns (its split); in the kernel :func:`tile_rows` gives the program's rows and
first column, :func:`row_tile` the mask and offsets of its ``it``-th tile. Per-split partial
results ``[R, n_split]`` are merged by a second kernel over ``BLOCK_R`` rows each
(:func:`finish_rows`), :func:`sum_partials` adding a row's partials in a fixed order.
"""
import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

_recorder = None  # callback(kernel, grid, args, kwargs) -> bool (True: also run the kernel)


class _Recorded:
    """``kernel[grid](*args, **kwargs)`` that reports the launch to the recorder first."""

    def __init__(self, kernel, run):
        self.kernel, self._run = kernel, run

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            if _recorder(self.kernel, tuple(g), args, kwargs) and self._run is not None:
                return self._run[grid](*args, **kwargs)
            return None
        return launch


def wrap(kernel):
    """The launchable form of ``kernel`` (see the module docstring)."""
    run = kernel if isinstance(kernel, InterpretedFunction) else torch.library.wrap_triton(kernel)
    return run if _recorder is None else _Recorded(kernel, run)


@contextlib.contextmanager
def recording(callback):
    """Within the block, every launch calls ``callback(kernel, grid, args, kwargs)`` first; the
    kernel runs only if the callback returns True (so launchers can be driven with meta tensors)."""
    global _recorder
    previous, _recorder = _recorder, callback
    try:
        yield
    finally:
        _recorder = previous


# ----------------------------------------------------------------------------- row tiling

TILE = 2048  # elements per [BLOCK_R, BLOCK_C] tile of the row kernels
ROW_WARPS = 8  # warps of the row-tile kernels
_TARGET_PROGRAMS = 1024  # programs a row-reduction launch aims for (about one wave on an H100)


@triton.jit
def tile_rows(R, n_split, iters, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(rows, row_mask, split, first column) of this program in a grid of row_blocks * n_split
    programs over R rows (:func:`tiling`)."""
    pid = tl.program_id(0)
    rows = (pid // n_split).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = pid % n_split
    return rows, rows < R, split, split.to(tl.int64) * iters * BLOCK_C


@triton.jit
def row_tile(rows, row_mask, col0, it, C, BLOCK_C: tl.constexpr):
    """(mask, offsets) of tile ``it`` of a program's rows (:func:`tile_rows`) in the [R, C] view."""
    cols = col0 + it * BLOCK_C + tl.arange(0, BLOCK_C)
    return row_mask[:, None] & (cols < C)[None, :], rows[:, None] * C + cols[None, :]


@triton.jit
def sum_partials(part_ptr, rows, row_mask, n_split, SPLIT_P2: tl.constexpr):
    """Per row, the sum of its ``n_split`` partials in ``part [R, n_split]`` (one fixed order)."""
    s = tl.arange(0, SPLIT_P2)
    p = tl.load(part_ptr + rows[:, None] * n_split + s[None, :],
                mask=row_mask[:, None] & (s < n_split)[None, :], other=0.0)
    return tl.sum(p, axis=1)


def tiling(rows, cols):
    """Tile a row-major [rows, cols] view: programs own BLOCK_R rows and `iters` consecutive blocks
    of BLOCK_C columns (their split); returns (BLOCK_R, BLOCK_C, n_split, iters, grid).

    BLOCK_C is the power of two that pads the view least while keeping tiles full (e.g. 32 for the
    9·2^k columns of 3x3 convs, where the next power of two would leave 44 % of the lanes idle)."""
    rows_p2 = triton.next_power_of_2(rows)
    hi = min(triton.next_power_of_2(cols), TILE)
    lo = min(hi, max(32, TILE // rows_p2))

    def padded(bc):
        br = min(TILE // bc, rows_p2)
        return triton.cdiv(rows, br) * br * triton.cdiv(cols, bc) * bc

    candidates = (lo << i for i in range((hi // lo).bit_length()))  # powers of two lo..hi
    block_c = min(candidates, key=lambda bc: (padded(bc), -bc))
    block_r = min(TILE // block_c, rows_p2)
    row_blocks = triton.cdiv(rows, block_r)
    col_blocks = triton.cdiv(cols, block_c)
    iters = triton.cdiv(col_blocks, min(col_blocks, max(1, _TARGET_PROGRAMS // row_blocks)))
    n_split = triton.cdiv(col_blocks, iters)
    return block_r, block_c, n_split, iters, (row_blocks * n_split,)


def finish_rows(rows, n_split):
    """(BLOCK_R, SPLIT_P2, grid) of a kernel that merges ``n_split`` partials for each row."""
    split_p2 = triton.next_power_of_2(n_split)
    block_r = min(max(1, TILE // split_p2), triton.next_power_of_2(rows))
    return block_r, split_p2, (triton.cdiv(rows, block_r),)
