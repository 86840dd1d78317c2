# Every target sets up what it needs, idempotently, on a fresh machine of this kind.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install data test demo bench clean

install: $(STAMP) data

# torch is pinned first: that version is the local CPU build; an open range would pull CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist (IDX files); nothing is downloaded at run time.
data:
	@if [ -d $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	else echo "Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist'"; fi

# pytest exits 5 when it collects no test: a suite that runs nothing is broken, so fail.
test: install
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi; exit $$rc

demo: install
	$(BIN)/python -m nmsparse reproduce --demo

bench: install
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

# Everything CUDA-specific: the CUDA tests, then the GPU benchmarks -> docs/results/gpu/gpu_check.{json,md}
# (see docs/gpu.md). No install step: GPU machines may be offline; GPU_PYTHON must have a CUDA torch.
.PHONY: gpu-check
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=src $(GPU_PYTHON) benchmarks/gpu_check.py
