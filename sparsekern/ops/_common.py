"""Shared plumbing of the op layer: op definition (:func:`define`), input validation."""
import importlib
import math
import warnings
from types import SimpleNamespace

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .. import _ext

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # e.g. macOS: no Triton, CPU ops still work
    HAS_TRITON = False

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: The ``sparsekern`` op namespace. Schemas are defined here, from Python; the C++ library
#: (loaded by ``_ext`` first) registers the CPU kernels of the same ops with
#: ``TORCH_LIBRARY_IMPL(sparsekern, CPU, m)``.
LIB = torch.library.Library("sparsekern", "FRAGMENT")

#: op name -> ``SimpleNamespace(family, reference, cuda, cpp)``: its Python implementations and
#: whether the C++ library implements it on CPU (the tests call each implementation).
IMPLS = {}


def define(schema, family, *, reference, fake, cuda=None, cpp=False, backward=None, setup_context=None,
           float_outputs=True):
    """Define the op ``sparsekern::<schema>`` of ``family`` and register its implementations.

    ``reference`` at ``CompositeExplicitAutograd``: the kernel of every device without its own
    (CPU without the C++ library or with ``SPARSEKERN_NO_EXT=1``, CUDA without Triton, ...);
    ``cuda`` (the Triton launch) at ``CUDA`` when Triton imports; ``fake`` for meta / fake
    tensors (torch.compile, export). ``cpp``: the C++ library registers the CPU kernel (see
    :func:`check_cpp`). ``backward`` / ``setup_context``: ``torch.library.register_autograd``'s;
    without them backpropagating through the op raises (never a silent zero gradient), except
    for ops without ``float_outputs`` (bool / integer results, which never carry a gradient):
    their Autograd key falls through (no Python autograd kernel: ~7 µs less a call); ops whose
    Autograd kernel the C++ library registers (the spmm ops: ``autogradNotImplementedFallback``,
    raising on backward) get no Python one either.
    Returns the op's default overload.
    """
    name = schema[:schema.index("(")]
    LIB.define(schema)
    LIB.impl(name, reference, "CompositeExplicitAutograd")
    if cuda is not None and HAS_TRITON:
        LIB.impl(name, cuda, "CUDA")
    op = getattr(torch.ops.sparsekern, name).default
    torch.library.register_fake(op, fake, lib=LIB)
    if not float_outputs:
        LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
    elif backward is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{name}", "Autograd"):
        pass  # the C++ library's Autograd kernel raises on backward (no Python autograd kernel: ~7 µs less a call)
    else:
        if backward is None:
            def backward(ctx, *grads):
                raise RuntimeError(f"sparsekern::{name} has no autograd formula: it is not differentiable")
        torch.library.register_autograd(op, backward, setup_context=setup_context, lib=LIB)
    IMPLS[name] = SimpleNamespace(family=family, reference=reference, cuda=cuda, cpp=cpp)
    return op


def has_cpp(name):
    """Whether op ``name`` has a CPU kernel of its own (the C++ library's)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{name}", "CPU")


def check_cpp(family):
    """Warn (once) if the loaded C++ library lacks the CPU kernel of one of ``family``'s ops
    (a library built before the family existed): on CPU they run the reference."""
    missing = [n for n, i in IMPLS.items() if i.family == family and i.cpp and not has_cpp(n)]
    if _ext.LOADED and missing:
        warnings.warn(
            f"sparsekern: the C++ library has no {family} kernels ({', '.join(missing)}; built before "
            f"csrc/cpu/{family}.cpp was added?); {family} ops fall back to the eager reference on CPU. "
            "Rebuild with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=3)


def triton_module(family):
    """``sparsekern.triton.<family>`` (imported on first use: only CUDA tensors launch Triton)."""
    return importlib.import_module(f"sparsekern.triton.{family}")


def is_compiling():
    return torch.compiler.is_compiling()


def check_weight(w, name="w"):
    """Raise ``TypeError`` unless ``w`` is an fp32/fp16/bf16 tensor."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {w.dtype}")


def check_bool(x, name):
    """Raise ``TypeError`` unless ``x`` is a bool (a string such as ``"False"`` is truthy: never
    taken as a flag); returns it."""
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(x).__name__} {x!r}")
    return x


def has_values(t):
    """Whether ``t`` holds data that may be read back: False on meta and for fake tensors
    (torch.compile tracing, ``FakeTensorMode``), where only shapes exist."""
    return t.device.type != "meta" and not isinstance(t, FakeTensor) and not is_compiling()


def check_number(x, name, lo=-math.inf, hi=math.inf):
    """Raise unless ``x`` is a real number in ``[lo, hi]``; returns it as float."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    if not (lo <= x <= hi):  # also rejects NaN
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {x}")
    return float(x)


def as_threshold(t, w, name="t", nonnegative=True):
    """Validate a threshold for ``w`` and return it as a flat fp32 tensor on ``w``'s device.

    ``t``: a real number, or a float tensor with 1 element (per layer), ``K = w.shape[0]``
    elements shaped ``[K]`` / ``[K, 1, ..]`` (per output channel), or ``w``'s shape (per weight).
    Values must not be NaN (nor negative when ``nonnegative``); checked outside torch.compile
    by :func:`check_values` (no host sync off the CPU).
    """
    if isinstance(t, (bool, int, float)):
        check_number(t, name, lo=0.0 if nonnegative else -math.inf)
        return torch.full((1,), float(t), dtype=torch.float32, device=w.device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a number or a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != w.device:
        raise ValueError(f"{name} is on {t.device} but the weight is on {w.device}")
    k = w.shape[0] if w.dim() else 1
    per_channel = t.dim() >= 1 and t.shape[0] == k and t.numel() == k
    if not (t.numel() == 1 or per_channel or t.shape == w.shape):
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}; expected one value, one per output channel "
            f"([{k}] or [{k}, 1, ...]) or one per weight {tuple(w.shape)}")
    if not is_compiling():
        check_values(t, name, nonnegative)
    return t.float().reshape(-1)


def check_values(t, name, nonnegative):
    """Raise if ``t`` has a NaN (or, when ``nonnegative``, a negative) value.

    On CPU a ``ValueError``. Elsewhere reading a value would sync with the device (once per layer
    and forward), so one ``torch._assert_async`` checks on the device instead (a no-op on meta):
    on CUDA a bad value fails at a later synchronisation as a device-side assert, which leaves
    the CUDA context unusable.
    """
    if t.device.type == "cpu":
        if torch.isnan(t).any():
            raise ValueError(f"{name} contains NaN")
        if nonnegative and (t < 0).any():
            raise ValueError(f"{name} must be non-negative, got min {t.min().item()}")
    elif nonnegative:
        torch._assert_async((t >= 0).all(), f"{name} contains NaN or a negative value")
    else:
        torch._assert_async(~torch.isnan(t).any(), f"{name} contains NaN")


def check_tensors(tensors):
    """A non-empty list of float tensors on one device, detached."""
    if isinstance(tensors, torch.Tensor) or not hasattr(tensors, "__iter__"):
        raise TypeError(f"tensors must be a list or tuple of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError("tensors must not be empty")
    for i, t in enumerate(tensors):
        check_weight(t, f"tensors[{i}]")
        if t.device != tensors[0].device:
            raise ValueError(f"tensors[{i}] is on {t.device} but tensors[0] is on {tensors[0].device}")
    return [t.detach() for t in tensors]


def check_per_tensor(values, n, name, lo, hi):
    """``values``: one number (repeated n times) or n numbers (sequence or 1-D tensor) in [lo, hi]."""
    if isinstance(values, torch.Tensor):
        if values.dim() > 1:
            raise ValueError(f"{name} must be a number or 1-D, got shape {tuple(values.shape)}")
        values = values.tolist()
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries; expected {n} (one per tensor)")
    return [check_number(v, f"{name}[{i}]", lo, hi) for i, v in enumerate(values)]


def raise_on_nan(nan_index, check_nan, what):
    """Raise ``FloatingPointError(f"{what(i)}")`` when the kernel's NaN flag ``nan_index`` (0-d,
    ``-1`` = none) names tensor ``i``; nothing to read on meta / fake tensors (shapes only)."""
    if check_nan and has_values(nan_index):
        i = int(nan_index)
        if i >= 0:
            raise FloatingPointError(what(i))
