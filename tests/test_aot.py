"""The AOT compile check (``sparsekern/triton/aot.py``): the full check (marked ``aot``: slow, run
alone with ``-m aot``), that it fails and names the kernel on a compile error, on too much shared
memory and on a launch grid over CUDA's limits, its variant folding, and its kernel coverage.

The check compiles with Triton's own compiler, so it runs in a subprocess without
``TRITON_INTERPRET`` (which conftest sets for the interpreter tests)."""
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from sparsekern.triton import _common, aot, masks, spmm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Kernels the check must reject: a compile error; 11 pipeline stages of two [64, 64] fp16 tiles
# (> sm80's 166912 B, < sm90's 232448 B); a launch with grid y over 65535.
BAD_KERNELS = '''
import torch
import triton
import triton.language as tl

from sparsekern.triton._common import wrap


@triton.jit
def _broken_kernel(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), undefined_name)  # noqa: F821


@triton.jit
def _smem_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k in range(0, K, BLOCK):
        a = tl.load(a_ptr + r[:, None] * K + k + r[None, :])
        b = tl.load(b_ptr + (k + r[:, None]) * BLOCK + r[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + r[:, None] * BLOCK + r[None, :], acc)


@triton.jit
def _wide_kernel(x_ptr):
    tl.store(x_ptr + tl.program_id(1), 1.0)


def sweep(full):
    x = torch.empty(70000, device="meta")
    a = torch.empty(64, 4096, device="meta", dtype=torch.float16)
    yield "broken", lambda: wrap(_broken_kernel)[(1,)](x, BLOCK=16), ()
    yield "smem", lambda: wrap(_smem_kernel)[(1,)](a, a, x, 4096, BLOCK=64, num_stages=12), ()
    yield "wide", lambda: wrap(_wide_kernel)[(1, 70000)](x), ()
'''


def run_check(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "sparsekern.triton.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)


@pytest.mark.aot
def test_every_kernel_variant_compiles_within_limits(tmp_path):
    table = tmp_path / "table.tsv"
    r = run_check("--table", str(table))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "\n0 failure(s)" in r.stdout
    rows = table.read_text().splitlines()[1:]
    assert {row.split("\t")[0] for row in rows} >= {"_gather_kernel", "_bsr_kernel", "_nm_dot_kernel"}
    assert {row.split("\t")[1] for row in rows} == {"80", "90"}


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "bad_kernels.py"
    path.write_text(BAD_KERNELS)
    return run_check("--extra", str(path), "--kernels", "_broken_kernel,_smem_kernel,_wide_kernel")


def failures(run, kernel):
    return [ln for ln in run.stdout.splitlines() if ln.startswith(f"FAIL {kernel}")]


def test_compile_error_fails_and_names_the_kernel(bad_run):
    assert bad_run.returncode == 1, bad_run.stdout + bad_run.stderr
    lines = failures(bad_run, "_broken_kernel")
    assert len(lines) == 2 and all("compile error" in ln and "undefined_name" in ln for ln in lines), lines
    assert {ln.split()[2] for ln in lines} == {"sm80", "sm90"}
    assert all("BLOCK=16" in ln and "(case: broken)" in ln for ln in lines)  # the variant


def test_shared_memory_over_the_target_limit_fails(bad_run):
    lines = failures(bad_run, "_smem_kernel")
    assert len(lines) == 1 and lines[0].startswith("FAIL _smem_kernel sm80 "), lines  # sm90 has room
    assert "B per block" in lines[0] and "166912" in lines[0]


def test_grid_over_cuda_limits_fails(bad_run):
    assert failures(bad_run, "_wide_kernel") == [
        "FAIL _wide_kernel: grid (1, 70000): y = 70000 > 65535 in wide"]


def test_grid_problem():
    assert aot.grid_problem((2**31 - 1, 65535, 65535)) is None
    assert aot.grid_problem((2**31,)) == "grid (2147483648,): x = 2147483648 > 2147483647"
    assert aot.grid_problem((1, 1, 65536)) == "grid (1, 1, 65536): z = 65536 > 65535"


def _fold_me(x_ptr, n, m, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < m)


def test_recording_folds_shapes_not_binaries():
    """Launches differing in plain int values share a variant; dtype, constexprs, num_warps and
    the JIT's int hints (divisible by 16, == 1) do not. fold keeps the most and the least
    divisible of the variants that differ only in divisibility."""
    kernel = JITFunction(_fold_me)  # compiled, not interpreted (conftest sets TRITON_INTERPRET)
    rec = aot.Recorder([90])
    x16, x32 = torch.empty(64, device="meta", dtype=torch.float16), torch.empty(64, device="meta")
    launches = [(x32, 32, 32, 16, 4), (x32, 48, 64, 16, 4),  # both divisible by 16: one variant
                (x32, 33, 32, 16, 4), (x32, 33, 33, 16, 4), (x32, 1, 32, 16, 4),
                (x16, 32, 32, 16, 4), (x32, 32, 32, 32, 4), (x32, 32, 32, 16, 8)]
    for x, n, m, block, warps in launches:
        rec(kernel, (1,), (x, n, m), dict(BLOCK=block, num_warps=warps))
    assert len(rec.variants) == 7
    assert sorted(v.cases for v in rec.variants.values()) == [1, 1, 1, 1, 1, 1, 2]
    hints = sorted(v.hints() for v in aot.fold(rec.variants.values()))
    assert hints == ["D..", "D1D", "DDD", "DDD", "DDD", "DDD"]  # D.D folded away


def test_every_launched_kernel_is_swept():
    rec = aot.record(aot.SWEEPS, [], False)  # no target: record only
    assert aot.coverage_problems(aot.MODULES, rec.launched) == []
    assert not rec.grid_problems, rec.grid_problems[:5]
    launched = {k.__name__ for k in aot.host_launched(spmm)}
    assert launched == {"_gather_kernel", "_bsr_kernel", "_nm_dot_kernel"}  # not the _blocks_of helper


def test_masks_sweep_reaches_large_windows_and_ck_groups():
    """kernel_mask is swept with 9 x 9, 11 x 11 and 65 x 65 windows, and with CK groups of more
    than 4096 kernels in both directions (by_out: C per output; else K per input)."""
    cases = [args for _, fn, args in aot._sweep_masks(False) if fn is masks.kernel_mask]
    assert {tuple(w.shape[2:]) for w, *_ in cases} >= {(9, 9), (11, 11), (65, 65)}
    ck_groups = {(by_out, w.shape[1] if by_out else w.shape[0]) for w, _, ck_keep, by_out in cases
                 if ck_keep < (w.shape[1] if by_out else w.shape[0])}
    assert {by_out for by_out, size in ck_groups if size > 4096} == {False, True}, ck_groups


def test_allowed_spills_have_a_byte_limit():
    kernel = types.SimpleNamespace(__name__="_nm_dot_kernel", params=[types.SimpleNamespace(name="BO")])
    v = aot.Variant(kernel, 90, {}, {(0,): 32}, {}, {}, "case")
    v.result = dict(spill_stores=20, spill_loads=16)
    assert "ptxas" in aot.allowed_spill(v)
    v.result = dict(spill_stores=8, spill_loads=24)
    assert aot.allowed_spill(v) is None
    v.constexprs = {(0,): 64}  # a tile the entry does not name
    v.result = dict(spill_stores=4, spill_loads=4)
    assert aot.allowed_spill(v) is None


def test_a_kernel_the_sweep_misses_is_reported(tmp_path):
    path = tmp_path / "unswept.py"
    path.write_text(textwrap.dedent('''
        import triton
        import triton.language as tl
        from sparsekern.triton._common import wrap

        @triton.jit
        def _helper(x):
            return x

        @triton.jit
        def _unswept_kernel(x_ptr):
            tl.store(x_ptr, _helper(1.0))

        def launcher(x):
            wrap(_unswept_kernel)[(1,)](x)

        def sweep(full):
            return iter(())
    '''))
    module = aot._load_extra(str(path))
    assert aot.coverage_problems([module], set()) == [
        f"{module.__name__}._unswept_kernel: launched by host code, never by the sweep (extend it)"]
