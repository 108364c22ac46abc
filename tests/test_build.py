"""The build (setup.py + CMakeLists.txt): CPU sources only, whatever torch and CUDA toolkit the
machine has. The full build against a CUDA torch wheel runs in `make matrix-torch` (CI)."""
import os
import runpy
import subprocess
import sys

import pytest
import setuptools
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's globals, without running setup()."""
    mp = pytest.MonkeyPatch()
    mp.setattr(setuptools, "setup", lambda **kw: None)
    try:
        yield runpy.run_path(os.path.join(ROOT, "setup.py"))
    finally:
        mp.undo()


def _header(tmp_path, text):
    os.makedirs(tmp_path / "ATen", exist_ok=True)
    (tmp_path / "ATen" / "ATen.h").write_text(text)
    return [str(tmp_path / "missing"), str(tmp_path)]


def test_cxx_standard_follows_torch_headers(setup_py, tmp_path):
    pick = setup_py["_cxx_standard"]
    # torch 2.14's ATen.h stops any pre-C++20 compile with this guard
    assert pick(_header(tmp_path, "#if __cplusplus < 202002L\n#error C++20 or later compatible "
                                  "compiler is required to use ATen.\n#endif\n")) == 20
    assert pick(_header(tmp_path, "#if !defined(_MSC_VER) && __cplusplus < 201703L\n"
                                  "#error C++17 or later compatible compiler is required\n#endif\n")) == 17
    with pytest.raises(RuntimeError, match="ATen/ATen.h not found"):
        pick([str(tmp_path / "nowhere")])


def test_installed_torch_headers_agree(setup_py):
    from torch.utils.cpp_extension import include_paths

    with open(os.path.join(include_paths()[0], "ATen", "ATen.h")) as f:
        wants_20 = "C++20" in f.read()
    args = setup_py["_torch_build_args"](torch)
    assert f"-DSPARSEKERN_CXX_STANDARD={20 if wants_20 else 17}" in args


def test_configure_with_cuda_torch_and_broken_toolkit(setup_py, tmp_path, monkeypatch):
    """A CUDA build of torch on a machine whose CUDA toolkit is partial (an nvcc that fails, no
    libraries) configures: nothing in the build looks for CUDA (there are no CUDA sources)."""
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: partial toolkit' >&2\nexit 1\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    monkeypatch.setenv("CUDACXX", str(nvcc))
    monkeypatch.setenv("PATH", f"{toolkit / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    args = setup_py["_torch_build_args"](torch)
    assert not any("CUDA" in a for a in args), args
    cmake = setup_py["_find_tool"]("cmake")
    assert cmake is not None, "CMake is a build requirement"
    build = tmp_path / "build"
    run = subprocess.run([cmake, "-S", ROOT, "-B", str(build), f"-DSPARSEKERN_OUTPUT_DIR={build}"] + args,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    cache = (build / "CMakeCache.txt").read_text()
    assert "CMAKE_CUDA_COMPILER" not in cache
    assert "Torch_DIR" not in cache  # torch's CMake package (which probes CUDA) is not used


# --- the op surface: one namespace, C++ CPU kernels of the Python-defined ops -------------------

def _run(code, **env):
    """Run ``code`` in a fresh interpreter (the op registrations are per process); its stdout."""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests"), **env})
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_every_op_has_its_cpu_kernel_from_cpp():
    """With the library built, each op the C++ library implements has a CPU kernel of its own
    (TORCH_LIBRARY_IMPL(sparsekern, CPU)); the others (pack_mask, ...) run the reference; no op
    lives in another namespace (no ``sparsekern_C``)."""
    from sparsekern import _ext
    from sparsekern.ops._common import IMPLS, has_cpp

    if not _ext.LOADED:
        pytest.skip(f"C++ kernels not loaded: {_ext.ERROR}")
    cpp = {name for name, impl in IMPLS.items() if impl.cpp}
    assert {"hard_threshold", "csr_mm", "nm_mask", "window_mask", "gaussian_bounds",
            "global_magnitude_threshold"} <= cpp
    assert {name for name in IMPLS if has_cpp(name)} == cpp
    names = torch._C._dispatch_get_all_op_names()
    assert not [n for n in names if n.startswith("sparsekern_C::")]
    assert {n.split("::")[1].split(".")[0] for n in names if n.startswith("sparsekern::")} == set(IMPLS)


def test_no_ext_runs_the_reference_on_cpu():
    """``SPARSEKERN_NO_EXT=1``: no op has a CPU kernel, every one runs its reference
    implementation (CompositeExplicitAutograd), without a warning."""
    out = _run("""
import warnings
warnings.simplefilter("error")
import torch, sparsekern as sk
from sparsekern import reference as R
from sparsekern.ops._common import IMPLS, has_cpp
assert not sk._ext.LOADED and not [n for n in IMPLS if has_cpp(n)]
w = torch.randn(8, 4, 3, 3)
assert torch.equal(sk.hard_threshold(w, 0.5), R.hard_threshold_forward(w, torch.tensor([0.5])))
assert torch.equal(sk.window_mask(w, 0.5), R.window_mask(w, 0.5))
# no C++ Autograd kernel either: define()'s Python one raises on backward (never a silent None)
x = torch.randn(4, 2, requires_grad=True)
y = torch.ops.sparsekern.csr_mm(torch.tensor([0, 1, 1]), torch.tensor([3], dtype=torch.int32), torch.ones(1),
                                torch.empty(0), x, 2, False)
try:
    y.sum().backward()
except RuntimeError as e:
    assert "sparsekern::csr_mm has no autograd formula" in str(e), e
else:
    raise AssertionError("backward through csr_mm did not raise")
print("ok")
""", SPARSEKERN_NO_EXT="1")
    assert out.strip() == "ok"


def test_library_without_a_family_falls_back_with_one_warning():
    """A library built before a family existed (simulated: the masks ops report no CPU kernel)
    gives one RuntimeWarning naming that family, none for the others."""
    from sparsekern import _ext

    if not _ext.LOADED:
        pytest.skip(f"C++ kernels not loaded: {_ext.ERROR}")
    out = _run("""
import warnings
import torch
has = torch._C._dispatch_has_kernel_for_dispatch_key
masks = ("sparsekern::nm_mask", "sparsekern::window_mask", "sparsekern::ck_mask", "sparsekern::intra_mask",
         "sparsekern::block_mask", "sparsekern::masked_weight")
torch._C._dispatch_has_kernel_for_dispatch_key = lambda op, key: op not in masks and has(op, key)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import sparsekern
msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
print(len(msgs), sparsekern._ext.LOADED, "no masks kernels" in msgs[0] if msgs else None)
""")
    assert out.split() == ["1", "True", "True"], out


def test_cpp_kernel_signature_must_match_the_schema():
    """The C++ CPU kernels are registered before the Python schemas exist (``_ext`` loads the
    library first); a schema that does not match a kernel's C++ signature fails loudly at
    definition, naming the op and both signatures."""
    from sparsekern import _ext

    if not _ext.LOADED:
        pytest.skip(f"C++ kernels not loaded: {_ext.ERROR}")
    out = _run("""
import glob, torch
torch.ops.load_library(glob.glob("sparsekern/_C*.so")[0])
try:
    torch.library.Library("sparsekern", "FRAGMENT").define("hard_threshold(Tensor w, Tensor t) -> Tensor")
except RuntimeError as e:
    print(str(e).splitlines()[0], "|", "sparsekern::hard_threshold" in str(e))
""")
    assert "doesn't match the expected function schema. | True" in out, out
