"""Shared test helpers: weights, thresholds, tolerances, kernel backends."""
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(), (1,), (7,), (769,), (5, 123, 123), (64, 32, 3, 3), (0,), (0, 3)]
# Triton tensors live on the GPU when there is one, else on the CPU under TRITON_INTERPRET=1.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) per storage dtype for results computed in fp32 and rounded to storage: two fp32
# results that differ in the last bits may round to neighbouring fp16/bf16 values (1 ulp:
# 2^-10 for fp16, 2^-7 for bf16, relative).
#
# On a GPU (issue 17 §9; sm90 PTX of every variant the AOT sweep compiles, Triton 3.9). Besides
# IEEE add/mul/div.rn/sqrt.rn, Triton emits: tl.exp/exp2 -> ex2.approx.ftz.f32 (2 ulp, subnormal
# results 0), tl.log2 -> libdevice log2f (1 ulp), `/` -> div.full.f32 (2 ulp), tl.sigmoid ->
# 1 / (1 + ex2) with div.full, and FP fusion (a·b + c -> one fma.rn: one rounding, never worse).
#   threshold  hard, masked grads, st3 sums/apply (div.rn), soft ACT 0: no approximation: exact
#              tests (atol = rtol = 0) hold; fp32 sums differ from the interpreter only in order
#              (TOL, soft's grad_t atol 1e-4·sqrt(n): O(log n) ulp).
#              soft ACT 1/2: g(s) within 2 + 0.7·|s| + 2 ulp (ex2, the rounding of s·log2 e, div.full;
#              <= 15 ulp for |s| <= 14, <= 5 ulp near g = 1/2, <= 3 ulp for g -> 1): |w| − g(s) is off
#              by <= 3e-7 < TOL fp32 atol; a mask flips only for |w| that close to g: the test cases'
#              closest |w| is 18 ulp from g ~ 1 (ties=False; bf16 w(769,) per channel), else >= 44.
#              power: test_threshold_kernels._power_rel_bound (ex2 + log2f + div.rn, derived there).
#   bound      σ: div.full in tile means / Chan weights / the mean of the partials, which enter M2
#              only at second order (or scaled by the between-tile term), sqrt.rn(div.rn(M2, n−1)):
#              the fp32 sums dominate as in the interpreter (test_bound rtol 4e-6). ASL grad_r: div.rn.
#   select     integer histograms, no float math but the lerp (FP fusion off for it): exact.
#   masks      integer / compare only: bitwise. spmm: fma.rn chains (ieee) or mma (fp16/bf16 inputs,
#              tf32 only when fp32_precision says so): O(K) fp32 roundings, as on the CPU.
TOL = {
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-5, 2 ** -10),
    torch.bfloat16: (1e-5, 2 ** -7),
}


def kernel_backend(name, family="threshold"):
    """One implementation of a family's ops and its tensor device: a namespace with the ops' names
    and schemas. ``"cpp"``: ``torch.ops.sparsekern`` on CPU tensors, whose CPU kernels must be the
    C++ library's; ``"triton"``: the ops' CUDA implementations (Triton launches), on the GPU or
    interpreted on the CPU; ``"reference"``: the ops' reference implementations."""
    from sparsekern.ops._common import IMPLS, has_cpp

    ops = {op: impl for op, impl in IMPLS.items() if impl.family == family}
    assert ops, f"no ops in family {family}"
    if name == "cpp":
        from sparsekern import _ext

        if not _ext.LOADED:
            if os.environ.get("SPARSEKERN_NO_EXT") == "1":
                pytest.skip("SPARSEKERN_NO_EXT=1: C++ kernels deliberately not loaded")
            raise AssertionError(f"C++ kernels failed to load: {_ext.ERROR}")
        missing = [op for op, impl in ops.items() if impl.cpp and not has_cpp(op)]
        assert not missing, f"the C++ library has no CPU kernel of {missing}: rebuild it"
        return torch.ops.sparsekern, "cpu"
    kind = "cuda" if name == "triton" else "reference"
    return SimpleNamespace(**{op: getattr(impl, kind) for op, impl in ops.items()}), \
        TRITON_DEVICE if name == "triton" else "cpu"


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


def magnitudes(tensors, scales=None):
    """The fp32 magnitudes ``|w|·c`` of all tensors, concatenated (numpy fp32)."""
    parts = []
    for i, t in enumerate(tensors):
        a = np.abs(t.detach().float().cpu().numpy().ravel())
        if scales is not None:
            a = a * np.float32(scales[i])
        parts.append(a)
    return np.concatenate(parts)


def f32(x):
    """A Python float rounded to the nearest fp32 (ties to even)."""
    return float(np.float64(x).astype(np.float32))


def expected_quantile(tensors, q, scales=None, method="linear"):
    """SPEC §9's quantile (numpy >= 2.4's ``np.quantile`` for a Python-float ``q``) of the fp32
    magnitudes, without NaN; a Python float.

    From the sorted magnitudes ``x`` and the fp64 virtual index ``v = (n−1)·q``: ``lower`` /
    ``higher`` / ``nearest`` give ``x[floor(v)]`` / ``x[ceil(v)]`` / ``x[round(v)]`` (half to even).
    ``linear`` takes ``a, b = x[k], x[k+1]`` with ``γ = v − k``, ``k = floor(v)`` (for ``v ≥ n−1``:
    ``a = b = x[n−1]`` and ``γ = v + 1``, numpy's ``v − (−1)``), then ``a + (b−a)·γ`` if ``γ < 0.5``
    else ``b − (b−a)·(1−γ)``, each operation rounded to fp32 and the weight (``γ`` or ``1−γ`` in
    fp64) rounded to fp32 first. The steps run in fp64 on fp32 values: a product of two fp32
    values is exact there, and rounding a sum / difference to fp64 then fp32 equals rounding it to
    fp32 once (53 ≥ 2·24 + 2 bits), so each step is the correctly rounded fp32 operation.
    """
    x = np.sort(magnitudes(tensors, scales)).tolist()
    n = len(x)
    v = (n - 1) * q
    if method != "linear":
        return x[{"lower": math.floor, "higher": math.ceil, "nearest": round}[method](v)]
    if v >= n - 1:
        a = b = x[-1]
        gamma = v + 1
    else:
        k = math.floor(v)
        a, b, gamma = x[k], x[k + 1], v - k
    d = f32(b - a)  # inf − inf is NaN
    if gamma < 0.5:
        return f32(a + f32(d * f32(gamma)))
    return f32(b - f32(d * f32(1.0 - gamma)))


# --- multi-process tests (tests/test_distributed*.py) -------------------------------------------

def spawn_ranks(script, world, timeout_s, results_name, weights_only=True):
    """Run ``python script RANK PORT OUTDIR`` for each of ``world`` ranks (gloo on 127.0.0.1, one
    OMP thread each), wait at most ``timeout_s`` in all, and load what rank 0 saved as
    ``OUTDIR/results_name``. A rank that fails or a timeout fails the test with every rank's log
    tail (the ranks still running are killed)."""
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if "GLOO_SOCKET_IFNAME" not in env and hasattr(socket, "if_nameindex") and \
            "lo" in [n for _, n in socket.if_nameindex()]:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # do not depend on the hostname resolving to a reachable address
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as outdir:
        logs = [open(os.path.join(outdir, f"rank{r}.log"), "w+") for r in range(world)]
        procs = [subprocess.Popen([sys.executable, os.path.abspath(script), str(r), str(port), outdir],
                                  cwd=root, env=env, stdout=logs[r], stderr=subprocess.STDOUT)
                 for r in range(world)]
        deadline = time.monotonic() + timeout_s
        timed_out = False
        try:
            for p in procs:
                try:
                    p.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    break
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        text = []
        for r, f in enumerate(logs):
            f.seek(0)
            text.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n{f.read()[-4000:]}")
            f.close()
        if timed_out or any(p.returncode != 0 for p in procs):
            pytest.fail(("timed out after %d s, ranks killed\n" % timeout_s if timed_out else
                         "a rank failed\n") + "\n".join(text))
        return torch.load(os.path.join(outdir, results_name), weights_only=weights_only)


def rank_case(results, key):
    """``results[key]`` (``{"ranks": [per-rank dict], ...}``); fails the test with every rank's
    error and the reference's (computed on rank 0), if any."""
    res = results[key]
    errors = [f"rank {r}:\n{g['error']}" for r, g in enumerate(res["ranks"]) if "error" in g]
    if "error" in res:
        errors.append(f"reference on rank 0:\n{res['error']}")
    if errors:
        pytest.fail(f"{key}: " + "\n".join(errors))
    return res
