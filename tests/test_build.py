"""The build (setup.py + CMakeLists.txt): CPU sources only, whatever torch and CUDA toolkit the
machine has. The full build against a CUDA torch wheel runs in `make matrix-torch` (CI)."""
import os
import runpy
import subprocess

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
