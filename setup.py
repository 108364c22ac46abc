"""Build of sparsekern: setuptools drives CMake (CMakeLists.txt holds the only list of sources).

    pip install --no-build-isolation .        # or -e . (what `make test` does)

torch must already be installed (it is imported here, at build time, but is deliberately not a
build requirement: build isolation would download a multi-GB CUDA torch). The C++ kernels are
one shared library, ``sparsekern/_C*.so``, that registers the CPU kernels of ``torch.ops.sparsekern.*`` and is
loaded with ``torch.ops.load_library`` (see ``sparsekern/_ext.py``); ``sparsekern/_build_info.py``
records the torch it was built against. There are only CPU sources (the CUDA kernels are
Triton, compiled at run time), so a CUDA build of torch needs no CUDA toolkit here, and a toolkit
that is present is never used. Environment variables:

    SPARSEKERN_NO_EXT=1       skip the C++ build (Python-only mode, reference kernels)
    MAX_JOBS=N                parallel compile jobs
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_tool(name):
    """Path of `name` on PATH, else from its pip package (`pip install cmake` / `ninja`)."""
    path = shutil.which(name)
    if path:
        return path
    try:
        mod = __import__(name)
        for attr in ("CMAKE_BIN_DIR", "BIN_DIR"):
            cand = os.path.join(getattr(mod, attr, ""), name)
            if os.path.isfile(cand):
                return cand
    except ImportError:
        pass
    return None


def _torch_openmp_library(torch_lib_dir):
    """The libgomp shipped inside the torch wheel (torch/lib or auditwheel's torch.libs)."""
    site = os.path.dirname(os.path.dirname(torch_lib_dir))
    for pattern in (os.path.join(torch_lib_dir, "libgomp*.so*"),
                    os.path.join(site, "torch.libs", "libgomp*.so*")):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def _cxx_standard(include_dirs):
    """17, or 20 where torch's headers demand it (torch >= 2.14: ATen.h stops pre-C++20 builds)."""
    for d in include_dirs:
        header = os.path.join(d, "ATen", "ATen.h")
        if os.path.isfile(header):
            with open(header) as f:
                return 20 if "C++20" in f.read() else 17
    raise RuntimeError(f"sparsekern: ATen/ATen.h not found in torch's include paths {include_dirs}")


def _torch_build_args(torch):
    """CMake arguments that describe torch: headers, libraries, ABI flag, C++ standard."""
    from torch.utils.cpp_extension import include_paths

    includes = include_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [f"-DSPARSEKERN_TORCH_INCLUDE_DIRS={';'.join(includes)}",
            f"-DSPARSEKERN_TORCH_LIB_DIR={os.path.join(os.path.dirname(torch.__file__), 'lib')}",
            f"-DSPARSEKERN_TORCH_CXX_FLAGS=-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-DSPARSEKERN_CXX_STANDARD={_cxx_standard(includes)}"]


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])  # the sources are listed in CMakeLists.txt


class CMakeBuild(build_ext):
    """Builds the library with CMake; also writes sparsekern/_build_info.py next to it."""

    def _build_info(self):
        """(path in the build dir, path in the source tree) of _build_info.py."""
        package_dir = self.get_finalized_command("build_py").get_package_dir("sparsekern")
        return (os.path.join(self.build_lib, "sparsekern", "_build_info.py"),
                os.path.join(package_dir, "_build_info.py"))

    # setuptools builds into build_lib and, for --inplace / editable installs, copies the
    # library into the source tree: _build_info.py goes along with it
    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        regular, inplace = self._build_info()
        if os.path.exists(regular):
            self.copy_file(regular, inplace, level=self.verbose)

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        if self.inplace and self.extensions:
            regular, inplace = self._build_info()
            mapping[regular] = inplace
        return mapping

    def get_outputs(self):
        outputs = super().get_outputs()
        if not self.inplace and self.extensions:
            outputs.append(self._build_info()[0])
        return outputs

    def build_extension(self, ext):
        import torch

        cmake = _find_tool("cmake")
        if cmake is None:
            raise RuntimeError(
                "sparsekern: CMake >= 3.18 is needed to build the C++ kernels and was not found "
                "(install it: `apt install cmake` or `pip install cmake`), or set "
                "SPARSEKERN_NO_EXT=1 for the Python-only mode.")
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        # a persistent CMake tree in ./build (per Python and torch) keeps rebuilds incremental:
        # pip gives every build a fresh build_temp
        tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
        build_dir = os.path.join(ROOT, "build", "cmake-" + tag.replace("+", "_"))
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if os.path.exists(cache):  # a tree configured for another checkout (moved repo): start over
            with open(cache) as f:
                if f"CMAKE_HOME_DIRECTORY:INTERNAL={ROOT}\n" not in f.read():
                    shutil.rmtree(build_dir)
        try:
            os.makedirs(build_dir, exist_ok=True)
        except OSError:  # read-only source tree
            build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
            os.makedirs(build_dir, exist_ok=True)
        out_dir = os.path.join(build_dir, "out")
        config = "Debug" if self.debug else "Release"
        args = [f"-DCMAKE_BUILD_TYPE={config}", f"-DSPARSEKERN_OUTPUT_DIR={out_dir}"]
        args += _torch_build_args(torch)
        gomp = _torch_openmp_library(torch_lib) if sys.platform.startswith("linux") else None
        args.append(f"-DSPARSEKERN_OPENMP_LIBRARY={gomp or ''}")
        if not os.path.exists(cache):  # the generator of a configured tree is fixed
            ninja = _find_tool("ninja")
            if ninja:
                args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]

        jobs = os.environ.get("MAX_JOBS") or str(self.parallel or os.cpu_count() or 1)
        subprocess.check_call([cmake, "-S", ROOT, "-B", build_dir] + args)
        subprocess.check_call([cmake, "--build", build_dir, "--config", config, "-j", jobs])

        built = [p for p in glob.glob(os.path.join(out_dir, "_C.*"))
                 if p.endswith((".so", ".dylib", ".dll"))]
        if len(built) != 1:
            raise RuntimeError(f"sparsekern: expected one built library in {out_dir}, found {built}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # a new file, not rewritten in place: a running process may have the old one mapped
        shutil.copy(built[0], target + ".tmp")
        os.replace(target + ".tmp", target)
        with open(os.path.join(os.path.dirname(target), "_build_info.py"), "w") as f:
            f.write("# Generated by setup.py at build time; do not edit.\n")
            f.write(f"TORCH_VERSION = {torch.__version__!r}\n")


class BuildPy(build_py):
    """Leaves out a sparsekern/_build_info.py left in the source tree by an editable build:
    build_ext writes the one that describes this build (none in the Python-only mode)."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != ("sparsekern", "_build_info")]


NO_EXT = os.environ.get("SPARSEKERN_NO_EXT") == "1"

setup(
    name="sparsekern",
    version="0.1.0",
    description="Fused PyTorch kernels for sparse training and sparse inference",
    packages=find_packages(include=["sparsekern", "sparsekern.*"]),
    python_requires=">=3.10",
    ext_modules=[] if NO_EXT else [CMakeExtension("sparsekern._C")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    zip_safe=False,
)
