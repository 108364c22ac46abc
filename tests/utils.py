"""Shared test helpers: weights, thresholds, tolerances, kernel backends."""
import importlib
import os

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(), (1,), (7,), (769,), (5, 123, 123), (64, 32, 3, 3), (0,), (0, 3)]
# Triton tensors live on the GPU when there is one, else on the CPU under TRITON_INTERPRET=1.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) per storage dtype for results computed in fp32 and rounded to storage: two fp32
# results that differ in the last bits may round to neighbouring fp16/bf16 values (1 ulp:
# 2^-10 for fp16, 2^-7 for bf16, relative).
TOL = {
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-5, 2 ** -10),
    torch.bfloat16: (1e-5, 2 ** -7),
}


def kernel_backend(name, family="threshold"):
    """A family's kernel namespace ``name`` ("cpp", "triton", "reference") and its tensor device."""
    kernels = importlib.import_module(f"sparsekern.ops.{family}").KERNELS
    if name == "cpp":
        from sparsekern import _ext

        if not _ext.LOADED:
            if os.environ.get("SPARSEKERN_NO_EXT") == "1":
                pytest.skip("SPARSEKERN_NO_EXT=1: C++ kernels deliberately not loaded")
            raise AssertionError(f"C++ kernels failed to load: {_ext.ERROR}")
        assert kernels.has_c, f"the C++ library has no {family} kernels: rebuild it"
        return torch.ops.sparsekern_C, "cpu"
    if name == "triton":
        return importlib.import_module(f"sparsekern.triton.{family}"), TRITON_DEVICE
    return kernels.reference, "cpu"


def make_weight(shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def make_threshold(w, mode, q=0.5, ties=True):
    """A flat fp32 threshold at ≈ the q-quantile of |w|: "scalar", "channel" or "element".

    With ``ties``, scalar and per-channel thresholds are exact |w| values, so ties at t are
    exercised; without, they sit midway to the next larger |w| (for thresholds that a kernel
    recomputes through exp/sigmoid, whose last bit is implementation-defined).
    """
    a = w.detach().float().abs().cpu()
    k = w.shape[0] if w.dim() else 1
    if mode == "element":
        t = torch.rand(a.numel(), generator=torch.Generator().manual_seed(1)) * 2 * q
        return t.to(w.device)
    rows = a.reshape(1 if mode == "scalar" else k, -1) if a.numel() else torch.ones(1 if mode == "scalar" else k, 1)
    rows = rows.sort(1).values
    i = int(q * (rows.shape[1] - 1))
    t = rows[:, i]
    if not ties:
        above = torch.where(rows > t[:, None], rows, torch.inf).min(1).values
        t = torch.where(above.isinf(), t + 1, (t + above) / 2)
    return t.contiguous().to(w.device)


def synthetic_images(n, seed=0):
    """4 classes of 3×8×8 images: a fixed random template per class plus unit noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(4, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return templates[y] + torch.randn(n, 3, 8, 8, generator=g), y
