"""What every Triton family shares: how a kernel is launched.

All launchers start a kernel as ``wrap(kernel)[grid](*args, **constexprs)``. ``wrap`` is
``torch.library.wrap_triton`` (so a launcher called inside a ``torch.library.triton_op`` traces
under ``torch.compile``), except for interpreted kernels (``TRITON_INTERPRET=1``), which launch
as they are: torch >= 2.13 does that itself, older torch rejects them (pytorch#152868).

``recording(callback)`` lets a tool see every launch instead of (or before) running it: the AOT
check (``sparsekern.triton.aot``) derives the kernel variants to compile from the launchers' own
choices this way.
"""
import contextlib

import torch
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
