# Two entry points that set everything up on a fresh machine: `make test` and `make bench`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEPS := triton numpy pytest pytest-benchmark pybind11 ninja hypothesis

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

bench: build
	$(VPY) -m bench

clean:
	rm -rf build *.egg-info sparsekern/_C*.so sparsekern/_build_info.py
