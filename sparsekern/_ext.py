"""Loads the compiled CPU kernels (``sparsekern/_C*.so``): the CPU kernels of the
``torch.ops.sparsekern.*`` ops, registered with ``TORCH_LIBRARY_IMPL(sparsekern, CPU, m)``
before ``sparsekern.ops`` defines their schemas (the dispatcher checks each kernel's C++
signature against its schema at definition).

If the library is missing or fails to load (e.g. built against another torch), import still
works: a warning names the build and runtime torch versions and the ops fall back to their
reference implementations. ``SPARSEKERN_NO_EXT=1`` skips loading on purpose.
"""
import glob
import os
import warnings

import torch

LOADED = False
ERROR = None


def _load():
    global LOADED, ERROR
    if os.environ.get("SPARSEKERN_NO_EXT") == "1":
        ERROR = "SPARSEKERN_NO_EXT=1"
        return
    here = os.path.dirname(os.path.abspath(__file__))
    libs = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    try:
        from ._build_info import TORCH_VERSION as built_with
    except ImportError:
        built_with = "unknown (no _build_info.py)"
    if not libs:
        ERROR = "compiled library sparsekern/_C*.so not found"
    else:
        try:
            torch.ops.load_library(libs[0])
            LOADED = True
            return
        except (OSError, RuntimeError) as e:
            ERROR = f"{libs[0]} failed to load: {e}"
    warnings.warn(
        f"sparsekern: C++ kernels unavailable ({ERROR}); built with torch {built_with}, "
        f"running torch {torch.__version__}. CPU ops fall back to the eager reference. "
        "Rebuild with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=3,
    )


_load()
