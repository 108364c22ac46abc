"""Ahead-of-time compile check of every Triton kernel: ``python -m sparsekern.triton.aot``.

No GPU is needed. The public launchers are driven over a sweep of inputs made of meta tensors
(no memory, nothing runs) inside ``_common.recording``; each recorded launch is bound with
Triton's own JIT binder, so a variant is exactly a binary the JIT would build at run time (dtypes,
constexprs, num_warps / num_stages, the divisibility-by-16 and == 1 hints of int and pointer
arguments; plain int values fold together). Every variant is compiled for sm80 and sm90 with
Triton's compiler, bundled ptxas included, and the check fails (exit 1), naming the kernel and
variant, on

* a compile error;
* more shared memory than a block of the target can have (sm80: 166912 B, sm90: 232448 B);
* a launch grid over CUDA's limits (x <= 2^31 - 1, y and z <= 65535);
* spilled registers (``ALLOWED_SPILLS`` lists the accepted ones, each with its byte limit and reason);
* a kernel that host code launches but the sweep never reached (coverage).

The sweep's user-chosen sizes are the domain below (N:M patterns, block shapes, ...). By default
it is a covering set: the axes that shape a kernel's tiles (dtype, modes, block sizes) are
crossed in full, the others (bias, transposed output, odd or 16-aligned sizes, ...) cycle through
their values alongside, so each value occurs; ``--full`` crosses every axis (much slower). Registers, spills and
shared memory are printed per kernel; ``--table FILE`` writes one row per variant and target.
Run with ``TRITON_INTERPRET`` unset (interpreted kernels cannot be compiled).
"""
import argparse
import ast
import collections
import concurrent.futures
import contextlib
import importlib
import importlib.util
import inspect
import io
import itertools
import multiprocessing
import os
import re
import sys
import tempfile
import time
import warnings

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import _common, bound, masks, select, spmm, threshold

MODULES = (threshold, bound, select, masks, spmm)
SMEM_LIMITS = {80: 166912, 90: 232448}  # opt-in shared memory per block (A100, H100), bytes
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)
REGS_PER_BLOCK = 65536

_TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2])  # (major, minor) compiling

#: (kernel name, predicate on the variant's constexprs) -> (most spill bytes accepted, stores or
#: loads, why). A larger spill still fails.
ALLOWED_SPILLS = {
    ("_gather_kernel", lambda c: c["ROWS"] == 8): (
        20, "ptxas spills 4-20 B in a few variants at 40-72 registers (far from its 255, not tile "
            "pressure; triton 3.6 also in 256 x 1 and 256 x 4 tiles); 8 warps (12-28 B) and a "
            "2048-element tile (4 B) spill too (triton 3.9)"),
    ("_nm_dot_kernel", lambda c: c["BO"] == 32): (
        20, "ptxas spills 4-20 B in a few N:M patterns at 64-128 registers on 8 warps (4 warps: 8-44 B; "
            "BLOCK_N 32 still 4 B, and expands the weight twice as often) (triton 3.9)"),
    ("_bsr_kernel", lambda c: c["PRECISION"] == "ieee" and _TRITON == (3, 8)): (
        40, "triton 3.8 (torch 2.14's pin) only: sm90 spills 4 B (24 x 40 blocks, 168 registers) and "
            "40 B (128 x 128 at BLOCK_N 16, 128 registers) in fp32 FMA dots that triton 3.6, 3.7 "
            "and 3.9 compile without spills"),
    ("_stream_select_kernel", lambda c: _TRITON == (3, 8)): (
        12, "triton 3.8 (torch 2.14's pin) only: sm90 spills 8 B stores / 12 B loads at 64 registers "
            "in the bf16 CK-score variant, which triton 3.6, 3.7 and 3.9 compile without spills"),
}

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FLOATS = (F32, F16, BF16)


# ----------------------------------------------------------------------------- the sweep


def _t(*shape, dtype=F32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _cases(full, core, turn):
    """Dicts of axis values: every combination of the ``core`` axes, each ``turn`` axis cycling
    through its values alongside (so each value occurs); every combination of all axes if full."""
    if full:
        core = {**core, **turn}
        turn = {}
    combos = list(itertools.product(*core.values()))
    n = max([len(combos)] + [len(v) for v in turn.values()])
    for i in range(n):
        yield {**dict(zip(core, combos[i % len(combos)])), **{k: v[i % len(v)] for k, v in turn.items()}}


@contextlib.contextmanager
def _fp32_matmul(precision):
    """torch.backends.cuda.matmul.fp32_precision = precision within the block."""
    matmul = torch.backends.cuda.matmul
    previous, matmul.fp32_precision = matmul.fp32_precision, precision
    try:
        yield
    finally:
        matmul.fp32_precision = previous


# Weight shapes of the threshold / bound / select families: 16-aligned, odd, 1-D (inner == 1),
# and one of 2^31 elements (int64 offsets).
_W_SHAPES = ((64, 128), (7, 9), (10,), (65536, 32768))


def _sweep_threshold(full):
    for c in _cases(full, dict(dtype=FLOATS, mode=("scalar", "channel", "element")),
                    dict(act=(0, 1, 2), shape=_W_SHAPES)):
        w, act = _t(*c["shape"], dtype=c["dtype"]), c["act"]
        t = {"scalar": _t(1), "channel": _t(w.shape[0]), "element": _t(*w.shape)}[c["mode"]]
        label = f"{c['dtype']} w{tuple(w.shape)} t {c['mode']}"
        yield f"soft_fwd {label} act {act}", threshold.soft_fwd, (w, t, act)
        for t_grad in (False, True):
            yield f"soft_bwd {label} act {act} t_grad {t_grad}", threshold.soft_bwd, (w, w, t, act, t_grad)
        if c["mode"] != "element":
            yield f"st3_fwd {label}", threshold.st3_fwd, (w, t, True)
        yield f"power_fwd {label}", threshold.power_fwd, (w, t, 1.5)
        yield f"power_bwd {label}", threshold.power_bwd, (w, w, t, 0.5)
        yield f"hard_fwd {label}", threshold.hard_fwd, (w, t)
        yield f"hard_bwd {label}", threshold.hard_bwd, (w, w, t)
    for rows, cols in ((1, 100), (3, 5000), (100, 9), (2048, 9 * 64), (1000, 1000)):  # tilings
        w, t = _t(rows, cols), _t(rows)
        yield f"soft_bwd tiling {rows}x{cols}", threshold.soft_bwd, (w, w, t, 0, True)
        yield f"st3_fwd tiling {rows}x{cols}", threshold.st3_fwd, (w, t, True)


def _sweep_bound(full):
    for c in _cases(full, dict(dtype=FLOATS), dict(shape=_W_SHAPES + ((3, 64, 3, 3),))):
        w = _t(*c["shape"], dtype=c["dtype"])
        label = f"{c['dtype']} w{tuple(w.shape)}"
        yield f"gaussian_bounds {label}", bound.gaussian_bounds, ([w, _t(5, dtype=c["dtype"])], [2.0, 1.0])
        for groups in (1, w.shape[0]):
            r = _t(groups)
            yield f"asl_fwd {label} groups {groups}", bound.asl_fwd, (w, r)
            yield f"asl_bwd {label} groups {groups}", bound.asl_bwd, (w, w, r)


def _sweep_select(full):
    sizes = ((100,), (64, 128), (65536, 32768))
    for c in _cases(full, dict(dtype=FLOATS), dict(scaled=(False, True), shape=sizes, count=(1, 9))):
        ts = [_t(*c["shape"], dtype=c["dtype"])] * c["count"]
        scales = [2.0 if c["scaled"] else 1.0] * c["count"]
        label = f"{c['dtype']} {c['count']} x {c['shape']} scaled {c['scaled']}"
        for k0, k1, gamma, lerp in ((5, -1, 0.0, False), (5, 6, 0.25, True), (17, 18, 0.75, True)):
            yield (f"select_global {label} lerp {lerp} gamma {gamma}", select.select_global,
                   (ts, scales, k0, k1, gamma, lerp))
        yield f"select_each {label}", select.select_each, (ts, [1] * len(ts), [2] * len(ts),
                                                           [0.5] * len(ts), True)


def _sweep_masks(full):
    for c in _cases(full, dict(m=(2, 5, 16, 64, 128, 1000, 4096, 5000)),
                    dict(dtype=FLOATS, rows=(64, 7), inner=((), (3, 3)))):
        w = _t(c["rows"], c["m"] * 2, *c["inner"], dtype=c["dtype"])
        for n in sorted({0, 1, c["m"] // 2, c["m"]}):
            yield f"nm_mask {c['dtype']} w{tuple(w.shape)} {n}:{c['m']}", masks.nm_mask, (w, n, c["m"])
    # windows up to 65 x 65; CK groups (by_out: C per output, else K per input) up to 6000 and
    # 5000 (> 4096) kernels. (kc, by_out) is one axis, so every pair occurs.
    kc_dir = tuple(itertools.product(((64, 32), (7, 5), (1, 6000), (5000, 3)), (False, True)))
    for c in _cases(full, dict(rs=((1, 1), (2, 2), (3, 3), (5, 5), (7, 7), (8, 8), (9, 9), (11, 11), (65, 65))),
                    dict(dtype=FLOATS, kc_dir=kc_dir)):
        (kc, by_out), rs = c["kc_dir"], c["rs"]
        w = _t(*kc, *rs, dtype=c["dtype"])
        size = w.shape[1] if by_out else w.shape[0]
        for ck_keep in (max(size // 2, 1), size):
            yield (f"kernel_mask {c['dtype']} w{tuple(w.shape)} by_out {by_out} ck {ck_keep}",
                   masks.kernel_mask, (w, rs[0] * rs[1] // 2, ck_keep, by_out))
    for c in _cases(full, dict(block=(1, 2, 3, 4)), dict(dtype=FLOATS, shape=((64, 128), (7, 9)))):
        w = _t(*c["shape"], dtype=c["dtype"])
        yield f"block_mask {c['dtype']} w{c['shape']} block {c['block']}", masks.block_mask, (w, c["block"], 3)
    for c in _cases(full, dict(dtype=FLOATS), dict(shape=_W_SHAPES)):
        w = _t(*c["shape"], dtype=c["dtype"])
        yield f"masked_fwd {c['dtype']} w{c['shape']}", masks.masked_fwd, (w, _t(*c["shape"], dtype=torch.bool))


def _bias(kind, out, dtype):
    return {"none": _t(0, dtype=dtype), "same": _t(out, dtype=dtype), "fp32": _t(out)}[kind]


#: (n, m) of the N:M sweep: n = m/2 (nm_pattern picks n <= m/2: the longest slot loop) for every
#: MP up to 128 (the tl.dot path), 1:4, a padded m, and m = 256 (the gather path only).
NM_PATTERNS = ((1, 2), (1, 4), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 128), (3, 5), (2, 256),
               (128, 256))
#: (bo, bi) of the BSR sweep: tl.dot (both sides >= 16; every BO, BK = 16 and 32, one and several
#: BK slices, a padded block), the broadcast product (a side < 16).
BSR_DOT_BLOCKS = ((16, 16), (64, 64), (128, 128), (16, 128), (128, 16), (24, 40))
BSR_SMALL_BLOCKS = ((1, 1), (4, 4), (8, 8), (3, 5), (16, 1), (1, 32))
#: Columns (batch or pixels) of the matmuls: every BLOCK_N (1, 4, 8, 16, 32, 64), odd and aligned;
#: 100: the widest tile.
COLS = (1, 3, 8, 16, 20, 64, 100)
#: dtype and fp32 matmul precision ("16-bit": the turn axis ``half`` gives the dtype)
PRECISIONS = ((F32, "ieee"), (F32, "tf32"), ("16-bit", "ieee"))
_TURN = dict(bias=("none", "same", "fp32"), transpose_out=(False, True), aligned=(True, False),
             half=(F16, BF16))


def _spmm_cases(full, core, turn=_TURN):
    """The widest column tile (the most registers and shared memory) with every core
    combination, and every column count in turn."""
    yield from _cases(full, dict(core, cols=(100,)), turn)
    yield from _cases(full, core, dict(turn, cols=COLS))


def _sweep_spmm(full):
    for c in _spmm_cases(full, dict(precision=PRECISIONS, nm=NM_PATTERNS)):
        (dtype, precision), (n, m), cols = c["precision"], c["nm"], c["cols"]
        dtype = c["half"] if dtype == "16-bit" else dtype
        out, inp = (64, 4 * m) if c["aligned"] else (37, 3 * m)
        val, idx = _t(out, inp // m * n, dtype=dtype), _t(out, inp // m * n, dtype=torch.uint8)
        args = (val, idx, _bias(c["bias"], out, dtype), _t(inp, cols, dtype=dtype), n, m, out,
                c["transpose_out"])
        with _fp32_matmul(precision):  # (the launcher runs while the generator waits here)
            yield f"nm_mm {c}", spmm.nm_mm, args
    bsr = itertools.chain(_spmm_cases(full, dict(precision=PRECISIONS, block=BSR_DOT_BLOCKS)),
                          _spmm_cases(full, dict(precision=PRECISIONS[2:], block=BSR_SMALL_BLOCKS),
                                      dict(_TURN, half=FLOATS)))  # no tl.dot: fp32 in turn too
    for c in bsr:
        (dtype, precision), (bo, bi), cols = c["precision"], c["block"], c["cols"]
        dtype = c["half"] if dtype == "16-bit" else dtype
        out, inp = (64 * bo, 16 * bi) if c["aligned"] else (5 * bo + 1, 3 * bi + 2)
        br = -(-out // bo)
        args = (_t(br + 1, dtype=torch.int64), _t(3 * br, dtype=torch.int32), _t(3 * br, bo, bi, dtype=dtype),
                _bias(c["bias"], out, dtype), _t(inp, cols, dtype=dtype), out, c["transpose_out"])
        with _fp32_matmul(precision):
            yield f"bsr_mm {c}", spmm.bsr_mm, args
    for c in _cases(full, dict(cols=COLS), dict(_TURN, dtype=FLOATS)):
        cols, dtype = c["cols"], c["dtype"]
        out, inp, nnz = (64, 128, 512) if c["aligned"] else (37, 70, 301)
        csr = (_t(out + 1, dtype=torch.int64), _t(nnz, dtype=torch.int32), _t(nnz, dtype=dtype))
        bias = _bias(c["bias"], out, dtype)
        yield f"csr_mm {c}", spmm.csr_mm, (*csr, bias, _t(inp, cols, dtype=dtype), out, c["transpose_out"])
        h, wp, wv = (cols, 32, 16) if c["aligned"] else (cols, 13, 11)  # csr_conv: h rows of wv pixels
        x = _t(inp * (h + 2) * wp + 2, dtype=dtype)
        yield f"csr_conv {c}", spmm.csr_conv, (*csr, bias, x, h * wp, out, 0, wp, wv)
        nk, taps = 40, _t(9, dtype=torch.int32)
        yield f"ck_conv {c}", spmm.ck_conv, (csr[0], _t(nk, dtype=torch.int32), _t(nk, 9, dtype=dtype), taps,
                                             bias, x, h * wp, out, (h + 2) * wp, 0, wp, wv)
    # huge problems: grid limits and int64 offsets (5e6 columns; a 2048 x 2048 image; 2^31 outputs)
    for dtype, transpose_out in itertools.product(FLOATS, (False, True)):
        out, inp, nnz, cols = 512, 64, 4096, 5_000_000
        csr = (_t(out + 1, dtype=torch.int64), _t(nnz, dtype=torch.int32), _t(nnz, dtype=dtype))
        x = _t(inp, cols, dtype=dtype)
        yield f"csr_mm huge {dtype} {transpose_out}", spmm.csr_mm, (*csr, _t(0, dtype=dtype), x, out, transpose_out)
        val, idx = _t(out, inp // 4 * 2, dtype=dtype), _t(out, inp // 4 * 2, dtype=torch.uint8)
        for precision in ("ieee", "tf32"):
            with _fp32_matmul(precision):
                yield (f"nm_mm huge {dtype} {transpose_out} {precision}", spmm.nm_mm,
                       (val, idx, _t(0, dtype=dtype), x, 2, 4, out, transpose_out))
                for bo in (4, 16):
                    bsr = (_t(out // bo + 1, dtype=torch.int64), _t(64, dtype=torch.int32),
                           _t(64, bo, bo, dtype=dtype))
                    yield (f"bsr_mm huge {dtype} {transpose_out} {precision} {bo}x{bo}", spmm.bsr_mm,
                           (*bsr, _t(0, dtype=dtype), x, out, transpose_out))
        hw = 2048
        x = _t(inp * (hw + 2) * (hw + 2), dtype=dtype)
        yield (f"csr_conv {hw}x{hw} {dtype}", spmm.csr_conv,
               (*csr, _t(0, dtype=dtype), x, hw * (hw + 2), out, 0, hw + 2, hw))


SWEEPS = (_sweep_threshold, _sweep_bound, _sweep_select, _sweep_masks, _sweep_spmm)


# ----------------------------------------------------------------------------- recording


class Variant:
    """One binary: a kernel bound for a target, and the sweep cases that launch it."""

    def __init__(self, kernel, cap, signature, constexprs, attrs, options, case):
        self.kernel, self.cap, self.case, self.cases = kernel, cap, case, 1
        self.signature, self.constexprs, self.attrs, self.options = signature, constexprs, attrs, options
        self.result = None  # dict from _compile

    @property
    def name(self):
        return self.kernel.__name__

    def label(self):
        """Constexprs, element type of the first pointer, warps / stages, and one hint per runtime
        argument (D: divisible by 16, 1: == 1 (a constant), .: none)."""
        names = list(self.signature)
        consts = " ".join(f"{names[p[0]]}={v}" for p, v in self.constexprs.items()
                          if self.kernel.params[p[0]].is_constexpr)
        ptrs = [t[1:] for t in self.signature.values() if t.startswith("*")]
        ptr = next((t for t in ptrs if t[:2] in ("fp", "bf")), ptrs[0] if ptrs else "-")
        return (f"{consts} | {ptr} | warps={self.options['num_warps']} "
                f"stages={self.options['num_stages']} | hints {self.hints()}")

    def hints(self):
        return "".join("1" if (i,) in self.constexprs else
                       "D" if ["tt.divisibility", 16] in self.attrs.get((i,), []) else "."
                       for i, p in enumerate(self.kernel.params) if not p.is_constexpr)


class Recorder:
    """Binds every launch for each target and folds identical binaries; checks grids."""

    def __init__(self, caps):
        self.caps = caps
        self.variants = {}  # (kernel, cap, JIT cache key) -> Variant
        self.grid_problems = []
        self.launched = set()  # kernels
        self.case = None
        self._binders = {}

    def __call__(self, kernel, grid, args, kwargs):
        self.launched.add(kernel)
        problem = grid_problem(grid)
        if problem:
            self.grid_problems.append(f"{kernel.__name__}: {problem} in {self.case}")
        for cap in self.caps:
            if (kernel, cap) not in self._binders:
                backend = make_backend(GPUTarget("cuda", cap, 32))
                binder = create_function_from_signature(kernel.signature, kernel.params, backend)
                self._binders[kernel, cap] = backend, binder
            backend, binder = self._binders[kernel, cap]
            bound_args, spec, options = binder(*args, **kwargs)
            key = (kernel, cap, str(spec) + str(options))  # the JIT's compute_cache_key
            if key in self.variants:
                self.variants[key].cases += 1
                continue
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, spec, options)
            self.variants[key] = Variant(kernel, cap, signature, constexprs, attrs, options.__dict__, self.case)
        return False


def fold(variants):
    """The variants to compile: of those differing only in which runtime arguments are divisible
    by 16, the most and the least divisible (the widest and the narrowest vector accesses); an
    argument == 1 (a constant, e.g. a unit stride) keeps its variants apart."""
    groups = collections.defaultdict(list)
    for v in variants:
        consts = tuple((p, c) for p, c in v.constexprs.items() if v.kernel.params[p[0]].is_constexpr)
        groups[v.kernel, v.cap, consts, tuple(v.signature.values()), str(v.options)].append(v)
    picked = []
    for vs in groups.values():
        vs.sort(key=lambda v: v.hints().count("."))
        picked += vs[:1] + vs[-1:] if len(vs) > 1 else vs
    return picked


def grid_problem(grid):
    """Why a launch grid exceeds CUDA's limits, or None."""
    over = [f"{axis} = {g} > {lim}" for axis, g, lim in zip("xyz", grid, GRID_LIMITS) if g > lim]
    return f"grid {tuple(grid)}: " + ", ".join(over) if over else None


def record(sweeps, caps, full):
    rec = Recorder(caps)
    with _common.recording(rec):
        for sweep in sweeps:
            for rec.case, fn, args in sweep(full):
                fn(*args)
    return rec


def _kernels(module):
    """name -> @triton.jit function defined in module (compiled or interpreted)."""
    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, (JITFunction, InterpretedFunction)) and obj.fn.__module__ == module.__name__}


def host_launched(module):
    """The module's @triton.jit kernels that its host code refers to (so may launch)."""
    kernels = _kernels(module)
    names = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if not (isinstance(node, ast.FunctionDef) and node.name in kernels):
            names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    return {kernels[n] for n in names & set(kernels)}


def coverage_problems(modules, launched):
    """A line per kernel that host code of ``modules`` launches but ``launched`` lacks."""
    return [f"{m.__name__}.{k.__name__}: launched by host code, never by the sweep (extend it)"
            for m in modules for k in sorted(host_launched(m), key=lambda k: k.__name__) if k not in launched]


# ----------------------------------------------------------------------------- compiling


def _compile(job):
    """Compile one variant (in a worker): registers, spills, stack and shared memory, or error."""
    module, name, cap, signature, constexprs, attrs, options = job
    kernel = getattr(sys.modules[module], name)
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", cap, 32), options=options)
    except Exception as e:  # noqa: BLE001 - every compile failure is a finding
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return dict(error=f"{type(e).__name__}: " + " / ".join(lines[:8]))
    text = log.getvalue()

    def num(pattern):
        found = re.search(pattern, text)
        return int(found.group(1)) if found else None
    return dict(error=None, regs=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"),
                smem=compiled.metadata.shared, seconds=time.perf_counter() - t0)


def compile_all(variants, jobs):
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: every variant really compiles
        triton.knobs.cache.dir = cache
        work = [(v.kernel.fn.__module__, v.name, v.cap, v.signature, v.constexprs, v.attrs, v.options)
                for v in variants]
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            for v, result in zip(variants, pool.map(_compile, work)):
                v.result = result


def allowed_spill(v):
    """The reason a variant may spill (ALLOWED_SPILLS, within its byte limit), or None."""
    consts = {v.kernel.params[p[0]].name: val for p, val in v.constexprs.items()}
    spilled = max(v.result["spill_stores"] or 0, v.result["spill_loads"] or 0)
    return next((why for (name, pred), (limit, why) in ALLOWED_SPILLS.items()
                 if name == v.name and pred(consts) and spilled <= limit), None)


def problems(v):
    """What makes a compiled variant fail the check (empty: passes)."""
    r, where = v.result, f"{v.name} sm{v.cap} [{v.label()}] (case: {v.case})"
    if r["error"]:
        return [f"{where}: compile error: {r['error']}"]
    found = []
    if r["smem"] > SMEM_LIMITS[v.cap]:
        found.append(f"{where}: {r['smem']} B shared memory > {SMEM_LIMITS[v.cap]} B per block")
    if r["regs"] is None or r["spill_stores"] is None:
        found.append(f"{where}: no register / spill report from ptxas")
    else:
        if r["regs"] * 32 * v.options["num_warps"] > REGS_PER_BLOCK:
            found.append(f"{where}: {r['regs']} registers x {32 * v.options['num_warps']} threads > {REGS_PER_BLOCK}")
        if (r["spill_stores"] or r["spill_loads"]) and not allowed_spill(v):
            found.append(f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads "
                         f"({r['regs']} registers)")
    return found


# ----------------------------------------------------------------------------- report


def summary(variants):
    """Per kernel and target: variants, worst registers, spills and shared memory."""
    rows = collections.defaultdict(list)
    for v in variants:
        rows[v.name, v.cap].append(v)
    lines = [f"{'kernel':<24} {'sm':>3} {'variants':>8} {'max regs':>8} {'max spill B':>11} "
             f"{'max smem B':>10}  worst variant (by spill, then regs)"]
    for (name, cap), vs in sorted(rows.items()):
        ok = [v for v in vs if not v.result["error"] and v.result["regs"] is not None]
        if not ok:
            lines.append(f"{name:<24} {cap:>3} {len(vs):>8} {'-':>8} {'-':>11} {'-':>10}  (all failed)")
            continue
        worst = max(ok, key=lambda v: (v.result["spill_stores"], v.result["regs"]))
        lines.append(f"{name:<24} {cap:>3} {len(vs):>8} {max(v.result['regs'] for v in ok):>8} "
                     f"{max(v.result['spill_stores'] for v in ok):>11} {max(v.result['smem'] for v in ok):>10}  "
                     f"{worst.label()}")
    return "\n".join(lines)


def write_table(path, variants):
    with open(path, "w") as f:
        f.write("kernel\tsm\tregs\tspill_stores\tspill_loads\tstack\tsmem\tseconds\terror\tcases\tvariant\tfirst case\n")
        for v in sorted(variants, key=lambda v: (v.name, v.cap, v.label())):
            r = v.result
            cols = [r.get(k) for k in ("regs", "spill_stores", "spill_loads", "stack", "smem")]
            secs = f"{r['seconds']:.2f}" if "seconds" in r else ""
            f.write("\t".join(map(str, [v.name, v.cap, *cols, secs, r["error"] or "", v.cases, v.label(), v.case]))
                    + "\n")


def _load_extra(path):
    """A Python file with a ``sweep(full)`` generator of (case, launcher, args), as SWEEPS."""
    name = "_aot_extra_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sparsekern.triton.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="80,90", help="compute capabilities (default 80,90)")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--full", action="store_true", help="cross every sweep axis (slower)")
    p.add_argument("--table", metavar="FILE", help="write one row per variant and target (TSV)")
    p.add_argument("--kernels", metavar="NAMES", help="compile only these kernels (comma-separated)")
    p.add_argument("--extra", metavar="FILE", action="append", default=[],
                   help="also run sweep(full) of this Python file (its kernels launched through _common.wrap)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    caps = [int(c) for c in a.targets.split(",")]
    unknown = set(caps) - set(SMEM_LIMITS)
    if unknown:
        p.error(f"--targets: no shared-memory limit known for {sorted(unknown)} (known: {sorted(SMEM_LIMITS)})")
    if not isinstance(spmm._gather_kernel, JITFunction):
        p.error("TRITON_INTERPRET is set: interpreted kernels cannot be compiled; unset it")
    extra = [_load_extra(path) for path in a.extra]
    rec = record(SWEEPS + tuple(m.sweep for m in extra), caps, a.full)
    failures = rec.grid_problems + coverage_problems(MODULES + tuple(extra), rec.launched)
    binaries = list(rec.variants.values())
    variants = binaries if a.full else fold(binaries)
    if a.kernels:
        wanted = set(a.kernels.split(","))
        missing = wanted - {v.name for v in variants}
        if missing:
            p.error(f"--kernels: never launched by the sweep: {', '.join(sorted(missing))}")
        variants = [v for v in variants if v.name in wanted]
    print(f"{sum(v.cases for v in binaries) // len(caps)} launches, {len(binaries) // len(caps)} binaries "
          f"per target; compiling {len(variants)} variants with {a.jobs} processes, triton {triton.__version__}",
          flush=True)
    compile_all(variants, a.jobs)
    for v in variants:
        failures += problems(v)
    print(summary(variants))
    if a.table:
        write_table(a.table, variants)
        print(f"table: {a.table}")
    allowed = [v for v in variants if v.result["error"] is None and v.result["spill_stores"] and allowed_spill(v)]
    for v in allowed:
        print(f"allowed spill: {v.name} sm{v.cap} [{v.label()}]: {allowed_spill(v)}")
    print(f"\n{len(failures)} failure(s) in {time.perf_counter() - t0:.0f} s")
    for line in failures:
        print("FAIL", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
