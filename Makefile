# Entry points that set everything up on a fresh machine:
#   make test                    # venv with the pinned torch + requirements/test.txt, build, pytest
#   make matrix                  # the supported-version matrix (see below); CI runs it after test
#   make gpu-check               # on a CUDA machine, offline: CUDA tests + short GPU benchmark
#   make bench                   # the device present: CUDA if nvidia-smi sees a GPU, else CPU
#   make bench DEVICE=cpu        # a venv with the pinned CPU torch, then python -m bench
#   make bench DEVICE=cuda       # the system python's torch + triton, offline: no venv, no downloads
#   make bench BENCH_ARGS="--suite quick"    # arguments for python -m bench
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
REQS := requirements/test.txt
DEVICE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
BENCH_ARGS ?=
GPU_CHECK_ARGS ?=
# The matrix: Triton of the GPU machines (3.6), of torch 2.13's CUDA wheel (3.7) beside the
# pinned one (requirements/test.txt); the newest torch (a CUDA build, so the build runs with a
# CUDA torch and whatever CUDA toolkit the machine has) with a numpy older than 2.4.
TRITON_MATRIX ?= 3.6.0:numpy==2.3.5 3.7.1
NEW_TORCH_SPEC ?= torch==2.14.1
OLD_NUMPY_SPEC ?= numpy==2.3.5
MATRIX := build/matrix

.PHONY: venv build test matrix matrix-triton matrix-torch gpu-check bench clean

STAMP := $(VENV)/.deps-installed

# torch is pinned and installed first, so nothing after it can pull an unpinned (CUDA) torch.
$(STAMP): Makefile $(REQS)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install "$(TORCH_SPEC)"
	$(VPY) -m pip install -r $(REQS)
	touch $@

venv: $(STAMP)

build: venv
	$(VPY) -m pip install --no-build-isolation --no-deps -e .

# the whole suite, the AOT compile check of every Triton kernel included (tests/test_aot.py)
test: build
	$(VPY) -m pytest tests -q

matrix: matrix-triton matrix-torch

# Each Triton of the matrix goes into its own folder, ahead of the venv's on PYTHONPATH; the
# tests that run Triton (the interpreter tests, -k triton, and the AOT check) run against it. An entry "VERSION:SPEC" also puts
# SPEC there: Triton 3.6's interpreter needs numpy < 2.4 (triton-lang/triton#9171; compiled
# kernels are unaffected).
matrix-triton: build
	set -e; for entry in $(TRITON_MATRIX); do \
	  v=$${entry%%:*}; extra=$$(echo "$$entry" | sed -n 's/^[^:]*://p'); dir=$(MATRIX)/triton-$$v; \
	  test -f $$dir/.done || { rm -rf $$dir; \
	    $(VPY) -m pip install -q --no-deps --target $$dir "triton==$$v" $$extra; touch $$dir/.done; }; \
	  echo "=== triton $$v $$extra"; \
	  PYTHONPATH=$$dir $(VPY) -c "import triton, numpy; assert triton.__version__ == '$$v', triton.__file__; print('numpy', numpy.__version__)"; \
	  PYTHONPATH=$$dir $(VPY) -m pytest tests -q -p no:cacheprovider -k "triton or aot"; \
	done

# The newest torch in its own venv, on a copy of the tree (an editable build writes the library
# into the source tree, and it must not replace the one the main venv loads).
matrix-torch:
	test -x $(MATRIX)/torch-venv/bin/python || $(PY) -m venv $(MATRIX)/torch-venv
	$(MATRIX)/torch-venv/bin/python -m pip install -q --upgrade pip
	$(MATRIX)/torch-venv/bin/python -m pip install -q "$(NEW_TORCH_SPEC)"
	grep -v -e '^triton==' -e '^numpy==' $(REQS) > $(MATRIX)/torch-reqs.txt
	$(MATRIX)/torch-venv/bin/python -m pip install -q -r $(MATRIX)/torch-reqs.txt "$(OLD_NUMPY_SPEC)"
	rm -rf $(MATRIX)/src && mkdir -p $(MATRIX)/src
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(MATRIX)/src
	cd $(MATRIX)/src && ../torch-venv/bin/python -m pip install --no-build-isolation --no-deps -e .
	cd $(MATRIX)/src && ../torch-venv/bin/python -c "import torch, triton, numpy, sparsekern; \
	  assert sparsekern._ext.LOADED, sparsekern._ext.ERROR; \
	  print('=== torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)"
	cd $(MATRIX)/src && ../torch-venv/bin/python -m pytest tests -q -p no:cacheprovider

# A lent GPU machine, offline, one command (< 8 min on one H100): GPU facts, the CUDA tests of
# every family, a short CUDA benchmark of every family -> bench/results/<gpu>-<date>-gpu-check.*
# Runs from the source tree with $(PY)'s torch + triton: no install, no C++ build (CUDA runs
# Triton). Wheels in .whl/ (e.g. pytest, hypothesis) are used when the machine lacks them.
gpu-check:
	$(PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

ifeq ($(DEVICE),cuda)
# Offline on a CUDA machine: torch and triton must already be installed for $(PY). The editable
# install builds the C++ CPU kernels if setuptools and cmake are there; if not, the bench
# still runs from this source tree (CUDA work runs on the Triton kernels either way).
# matplotlib and tqdm are optional there (no plots / no progress bars without them).
bench:
	$(PY) -c "import torch, triton; assert torch.cuda.is_available(), 'DEVICE=cuda but torch.cuda.is_available() is False'"
	PIP_BREAK_SYSTEM_PACKAGES=1 $(PY) -m pip install --no-index --no-build-isolation --no-deps -e . \
		|| echo "sparsekern: offline install failed; running from the source tree"
	$(PY) -m bench --device cuda $(BENCH_ARGS)
else
bench: build
	$(VPY) -m bench --device cpu $(BENCH_ARGS)
endif

clean:
	rm -rf build *.egg-info sparsekern/_C*.so sparsekern/_build_info.py
