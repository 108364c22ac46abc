"""Shared benchmark machinery: cases, inputs, providers, timing, peak memory, run metadata.

Used by ``python -m bench`` (``bench/__main__.py``) and the pytest-benchmark files
(``bench/bench_*.py``). Providers (docs/benchmarks.md): ``eager`` = ``sparsekern.reference.<op>``,
``compile`` = ``torch.compile(reference.<op>)``, ``sparsekern`` = ``sparsekern.<op>``.

Peak memory (:func:`peak_extra_bytes`) is the memory one forward+backward call needs on top of
its inputs (``w``, threshold, pre-made output gradient; ``w.grad`` cleared), output and
``w.grad`` included:

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before the call.
* CPU (no allocator statistics): the kernel's peak resident set. The process must run with
  :data:`CPU_MEMORY_ENV` (glibc serves every allocation >= 64 KiB with its own ``mmap`` and
  unmaps it on free, so resident memory follows live tensors instead of a heap that keeps freed
  pages). Before the call: ``malloc_trim(0)``, baseline ``VmRSS``, reset ``VmHWM`` by writing
  ``5`` to ``/proc/self/clear_refs``; after it: ``VmHWM − baseline``. Only pages that are
  written count (an untouched ``torch.empty`` is not resident); every op output is written in
  full. ``python -m bench`` runs these measurements in a subprocess with that environment and
  checks the method on known allocations (:func:`validate_memory`): a written 64 MiB tensor
  reads as 63.8-64.0 MiB, i.e. the resolution is ~0.2 MiB (the kernel batches RSS counter
  updates), which matters only at 64K elements.
"""
import ctypes
import datetime
import functools
import gc
import math
import os
import platform
import re
import statistics
import subprocess
import time

import torch

try:
    import pytest
except ImportError:  # GPU images may lack pytest: the benchmarks still run, only their pytest-benchmark tests need it
    pytest = None

#: Benchmarked ops, headline first. Value: does the threshold argument get a gradient
#: in forward+backward (learnable for STR-style soft thresholds, selected for the others)?
OPS = {
    "st3_threshold": False,
    "soft_threshold": True,
    "str_threshold": True,
    "power_threshold": False,
    "hard_threshold": False,
}
#: Weight shapes by size label (elements): realistic square Linear layers (4K: tests only).
SIZES = {"4K": (64, 64), "64K": (256, 256), "1M": (1024, 1024), "16M": (4096, 4096)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwd+bwd")
PROVIDERS = ("eager", "compile", "sparsekern")
#: Threshold = this quantile of |w| (per-layer scalar, ~90 % sparsity).
SPARSITY = 0.9
#: Environment that makes the CPU resident-set measurement track live allocations.
CPU_MEMORY_ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}
MEMORY_METHOD = {
    "cpu": "peak RSS growth (VmHWM reset via /proc/self/clear_refs, minus VmRSS after "
           "malloc_trim) during one call, in a subprocess with GLIBC_TUNABLES="
           "glibc.malloc.mmap_threshold=65536; median of 3 calls after warmup",
    "cuda": "torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus "
            "memory_allocated() before the call; median of 3 calls after warmup",
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parametrize(*args, **kwargs):
    """``pytest.mark.parametrize`` for the ``bench_*.py`` pytest-benchmark tests; without pytest
    a no-op, so those modules import (and ``python -m bench`` runs) where pytest is missing."""
    return pytest.mark.parametrize(*args, **kwargs) if pytest else (lambda fn: fn)


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def op_name(name):
    """``"st3"`` or ``"st3_threshold"`` -> ``"st3_threshold"``."""
    full = name if name in OPS else f"{name}_threshold"
    if full not in OPS:
        raise ValueError(f"unknown op {name!r}; choose from {', '.join(OPS)}")
    return full


# --- inputs and providers -----------------------------------------------------------------------

def make_inputs(op, shape, dtype, device, grad):
    """Seeded weight ``w`` (``randn/sqrt(fan_in)``), 0-d fp32 threshold at the 0.9 quantile of
    ``|w|`` (for STR, ``s = logit`` of it), and ``grad_out`` (only when ``grad``)."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(device=device, dtype=dtype)
    a = w.float().abs().flatten()
    t = a.kthvalue(max(1, round(SPARSITY * a.numel()))).values
    if op == "str_threshold":
        t = torch.logit(t)
    inputs = {"w": w.requires_grad_(grad), "t": t.requires_grad_(grad and OPS[op]), "grad": None}
    if grad:
        inputs["grad"] = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return inputs


@functools.cache
def _modules():
    """``(sparsekern, sparsekern.reference)``, imported on first use."""
    import sparsekern
    from sparsekern import reference

    return sparsekern, reference


def sparsekern_backend(device):
    """What ``sparsekern.<op>`` runs on ``device``: its kernels or the reference fallback."""
    _modules()
    from sparsekern import _ext
    from sparsekern.ops import _common

    if device == "cuda":
        return "Triton kernels" if _common.HAS_TRITON else "REFERENCE FALLBACK: no Triton"
    return "C++ kernels (sparsekern/_C)" if _ext.LOADED else f"REFERENCE FALLBACK: {_ext.ERROR}"


def provider_fn(op, provider):
    """The callable ``(w, t) -> out`` for ``provider``. ``compile`` resets dynamo and compiles a
    fresh static-shape graph (the compilation happens on the first call, i.e. in warmup)."""
    sk, reference = _modules()
    if provider == "eager":
        return getattr(reference, op)
    if provider == "compile":
        torch._dynamo.reset()
        return torch.compile(getattr(reference, op), dynamic=False)
    if provider == "sparsekern":
        return getattr(sk, op)
    raise ValueError(f"unknown provider {provider!r}")


def make_step(fn, inputs, mode):
    """One benchmark iteration. ``fwd``: ``fn(w, t)``. ``fwd+bwd``: clear grads, forward,
    ``out.backward(grad)``. Returns ``(step, clear)``; ``clear()`` drops the grads."""
    w, t, g = inputs["w"], inputs["t"], inputs["grad"]

    def clear():
        w.grad = None
        t.grad = None

    if mode == "fwd":
        return (lambda: fn(w, t)), clear

    def step():
        clear()
        fn(w, t).backward(g)

    return step, clear


# --- timing -------------------------------------------------------------------------------------

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(step, device):
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def time_steps(steps, device, budget_s=0.4, min_reps=5, max_reps=200, warmup=3):
    """Time several steps side by side: each gets ``warmup`` untimed calls (compilation
    happens here; a step that raises is reported as ``{"error": ...}``), then timed calls
    interleaved round-robin so that background load hits all of them alike, each step
    ``clamp(budget_s / its fastest warmup call after the first, min_reps, max_reps)`` times
    (``warmup=1``: estimated from that call; ``warmup=0``: no warmup, ``min_reps`` calls).
    CPU: perf_counter around each call; CUDA: a CUDA event pair around each call.
    Returns ``{name: stats}``, seconds: median, quartiles, min, max, first (compiling) call."""
    out, reps, times = {}, {}, {}
    for name, step in steps.items():
        try:
            warm = []
            for _ in range(warmup):
                t0 = time.perf_counter()
                step()
                _sync(device)
                warm.append(time.perf_counter() - t0)
        except Exception as e:  # a failing provider is reported, not fatal
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        out[name] = {"first_call_s": warm[0]} if warm else {}
        est = min(warm[1:] or warm) if warm else math.inf
        reps[name] = int(min(max_reps, max(min_reps, budget_s / max(est, 1e-9))))
        times[name] = []
    while any(len(times[n]) < reps[n] for n in times):
        for name in times:
            if len(times[name]) < reps[name]:
                times[name].append(_time_once(steps[name], device))
    for name, ts in times.items():
        q1, med, q3 = statistics.quantiles(ts, n=4, method="inclusive")
        out[name].update(median_s=med, q1_s=q1, q3_s=q3, min_s=min(ts), max_s=max(ts), reps=len(ts))
    return out


def time_step(step, device, **kwargs):
    """:func:`time_steps` for one step (same keyword arguments); raises if the step does."""
    res = time_steps({"step": step}, device, **kwargs)["step"]
    if "error" in res:
        raise RuntimeError(res["error"])
    return res


# --- peak memory --------------------------------------------------------------------------------

def _proc_status_bytes(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


@functools.cache
def _libc():
    return ctypes.CDLL("libc.so.6")


def peak_extra_bytes(step, clear, device, repeats=3):
    """Median over ``repeats`` calls of the peak memory of ``step()`` above its inputs (see the
    module docstring for the method; on CPU the process needs :data:`CPU_MEMORY_ENV`)."""
    peaks = []
    for _ in range(repeats):
        clear()
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
        else:
            _libc().malloc_trim(0)
            base = _proc_status_bytes("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            step()
            peaks.append(_proc_status_bytes("VmHWM") - base)
    clear()
    return int(statistics.median(peaks))


def validate_memory(device):
    """Measure known allocations with :func:`peak_extra_bytes`: a written 64 MiB and 1 MiB
    tensor (expected: their size) and an unwritten 64 MiB ``torch.empty`` (CPU: not resident)."""
    def alloc(n, write):
        x = torch.empty(n // 4, dtype=torch.float32, device=device)
        if write:
            x.fill_(1.0)
        _sync(device)

    checks = []
    for n, write in ((64 << 20, True), (1 << 20, True), (64 << 20, False)):
        checks.append({"tensor_bytes": n, "written": write,
                       "measured_bytes": peak_extra_bytes(lambda: alloc(n, write), lambda: None, device)})
    return checks


# --- metadata -----------------------------------------------------------------------------------

def cpu_snapshot():
    """``(wall s, machine busy CPU-s from /proc/stat, this process + waited children CPU-s)``."""
    with open("/proc/stat") as f:
        j = [int(x) for x in f.readline().split()[1:]]
    t = os.times()
    busy = (sum(j[:8]) - j[3] - j[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def other_load(start, end):
    """Average number of CPUs that other processes kept busy between two snapshots."""
    return ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0])


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        info = ""
    field = lambda key: (re.search(rf"^{key}\s*:\s*(.*)$", info, re.M) or [None, ""])[1].strip()
    name = field("model name") or platform.processor() or platform.machine()
    # a VM's model name can be as bare as "AMD EPYC" or "Intel Xeon Processor": the family /
    # model and the widest vector ISA (and AMX) tell Milan (AVX2) from Genoa (AVX-512), Ice Lake
    # from Sapphire Rapids and later (AMX) in the results
    flags = field("flags").split()
    isa = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"))
                if flag in flags), None)
    details = [f"family {field('cpu family')} model {field('model')}"] if field("model") else []
    details += [isa + (" + AMX" if isa == "AVX-512" and "amx_tile" in flags else "")] if isa else []
    return f"{name} ({', '.join(details)})" if details else name


def results_path(prefix, device_name, suffix=".md"):
    """Default output of a standalone benchmark: ``bench/results/<prefix>-<device slug><suffix>``."""
    return os.path.join(REPO, "bench", "results", f"{prefix}-{slug(device_name)}{suffix}")


def write_report(path, text):
    """Print ``text``, write it to ``path`` and say where."""
    print(text)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device):
    """Run metadata that every result row carries."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": _git("rev-parse", "HEAD") or "no commit",
        # uncommitted changes to the code (earlier results under bench/results do not count)
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".",
                               ":(exclude)bench/results")),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "sparsekern_backend": sparsekern_backend(device),
    }
