"""Shared plumbing of the op layer: op definition, device dispatch, input validation."""
import math
import torch

from .. import _ext

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # e.g. macOS: no Triton, CPU ops still work
    HAS_TRITON = False

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def define_op(name):
    """Register ``sparsekern::<name>`` from a Python body (schema inferred from annotations).

    With Triton the op is a ``torch.library.triton_op`` so torch.compile sees the Triton
    kernels it launches; the body doubles as the fake kernel, so it must only allocate and
    dispatch (no data-dependent Python).
    """
    def deco(fn):
        if HAS_TRITON:
            return torch.library.triton_op(f"sparsekern::{name}", fn, mutates_args=())
        op = torch.library.custom_op(f"sparsekern::{name}", fn, mutates_args=())
        op.register_fake(fn)
        return op

    return deco


def kernels(device, family, fallback):
    """Kernel namespace for a device: Triton on CUDA, C++ on CPU, else ``fallback``.

    All namespaces implement the same functions (see the family's op module).
    """
    if device.type == "cuda" and HAS_TRITON:
        import importlib

        return importlib.import_module(f"sparsekern.triton.{family}")
    if device.type == "cpu" and _ext.LOADED:
        return torch.ops.sparsekern_C
    return fallback


def register_c_fakes(fakes):
    """Fake kernels of the private C++ ops (needed when a CPU op body is traced)."""
    if not _ext.LOADED:
        return
    for name, fn in fakes.items():
        torch.library.register_fake(f"sparsekern_C::{name}")(fn)


def is_compiling():
    return torch.compiler.is_compiling()


def check_weight(w, name="w"):
    """Raise ``TypeError`` unless ``w`` is an fp32/fp16/bf16 tensor."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {w.dtype}")


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
    (and not for meta tensors, which have no values).
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
    if not is_compiling() and t.numel() and t.device.type != "meta":
        if torch.isnan(t).any():
            raise ValueError(f"{name} contains NaN")
        if nonnegative and (t < 0).any():
            raise ValueError(f"{name} must be non-negative, got min {t.min().item()}")
    return t.float().reshape(-1)
