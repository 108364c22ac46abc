# Two entry points that set everything up on a fresh machine: `make test` and `make bench`.
#   make bench                   # the device present: CUDA if nvidia-smi sees a GPU, else CPU
#   make bench DEVICE=cpu        # a venv with the pinned CPU torch, then python -m bench
#   make bench DEVICE=cuda       # the system python's torch + triton, offline: no venv, no downloads
#   make bench BENCH_ARGS="--suite quick"    # arguments for python -m bench
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEPS := triton numpy pytest pytest-benchmark pybind11 ninja hypothesis matplotlib tqdm scikit-learn
DEVICE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
BENCH_ARGS ?=

.PHONY: venv build test bench clean

STAMP := $(VENV)/.deps-installed

# torch is pinned and installed first, so nothing after it can pull an unpinned (CUDA) torch.
$(STAMP): Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install "$(TORCH_SPEC)"
	$(VPY) -m pip install $(DEPS)
	touch $@

venv: $(STAMP)

build: venv
	$(VPY) -m pip install --no-build-isolation --no-deps -e .

test: build
	$(VPY) -m pytest tests -q

ifeq ($(DEVICE),cuda)
# Offline on a CUDA machine: torch and triton must already be installed for $(PY). The editable
# install builds the C++ CPU kernels if setuptools, wheel and cmake are there; if not, the bench
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
