# equifast: build, test and benchmark.
#   make venv       the virtual environment (requirements.txt) and the compiled extension
#   make test       the whole test suite (tests marked `cuda` skip without a GPU)
#   make run        measure resnet18 on the embedded sample photos -> results/run
#   make bench      the CPU benchmarks (benchmarks/*.py)
#   make lint       ruff check + ruff format --check
#   make gpu-check  on the GPU machine (system python3, no venv): CUDA build, cuda tests, benchmarks
#   make clean      build outputs (keeps the venv; `make distclean` removes it too)

PY ?= python3
VENV ?= .venv
MAX_JOBS ?= 2
# Facts of these machines (shared/ENVIRONMENT.md): torch must be told where the toolkit is, and which
# GPU architecture to compile for when no GPU is visible. Both can be overridden from the command line.
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
TORCH_CUDA_ARCH_LIST ?= 9.0
PYTEST_ARGS ?=
# Where gpu-check writes the GPU benchmark results (on the device machine, e.g. GPU_OUT=$OUT/gpu).
GPU_OUT ?= benchmarks/results/gpu
# The GPU benchmarks, in order of importance, each under a time limit so that gpu-check stays
# within 10 minutes (a benchmark that runs out of time fails gpu-check, the others still run).
GPU_BENCHMARKS ?= benchmarks/bench_ops.py benchmarks/bench_end_to_end.py benchmarks/bench_data.py
GPU_BENCH_TIMEOUT ?= 130

BIN := $(VENV)/bin
VENV_STAMP := $(VENV)/.stamp
EXT_STAMP := $(VENV)/.ext-stamp
EXT_DEPS := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml
BENCHMARKS := $(filter-out benchmarks/_%,$(wildcard benchmarks/*.py))

.PHONY: venv ext run test bench lint format gpu-check clean distclean

venv: $(EXT_STAMP)

$(VENV_STAMP): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -r requirements.txt
	touch $@

# Rebuilds the extension when a C++/CUDA source, setup.py or pyproject.toml changes (ninja then
# recompiles only what changed, objects are kept under build/).
$(EXT_STAMP): $(VENV_STAMP) $(EXT_DEPS)
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" MAX_JOBS=$(MAX_JOBS) \
		$(BIN)/pip install --no-build-isolation --no-deps -e .
	touch $@

ext: $(EXT_STAMP)

run: venv
	$(BIN)/equifast measure --model resnet18 --samples --out results/run

# Runs everything and reports every failure (no -x). pytest's exit status is kept: 5 (no test
# collected) fails too.
test: venv
	$(BIN)/python -m pytest -q -ra --durations=15 $(PYTEST_ARGS) tests

bench: venv
	@if [ -z "$(BENCHMARKS)" ]; then echo "no benchmarks/*.py yet"; fi
	@set -e; for script in $(BENCHMARKS); do \
		echo "== $$script"; \
		$(BIN)/python $$script --device cpu --out benchmarks/results/cpu; \
	done

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# One command for the GPU machine: its system python3 has torch + pytest, there is no venv.
gpu-check:
	set -e; \
	export CUDA_HOME=$$(dirname $$(dirname $$(which nvcc))) TORCH_CUDA_ARCH_LIST=9.0 \
		EQUIFAST_CUDA=1 MAX_JOBS=$$(nproc) PIP_BREAK_SYSTEM_PACKAGES=1; \
	if python3 -m pip --version >/dev/null 2>&1; then \
		python3 -m pip install --no-build-isolation --no-deps -e .; \
	else \
		python3 setup.py build_ext --inplace; \
	fi; \
	python3 -c "import equifast._C as C; print(C.build_info())"; \
	status=0; timeout 150 python3 -m pytest -q -ra -m cuda tests || status=$$?; \
	for script in $(GPU_BENCHMARKS); do \
		echo "== $$script"; \
		timeout $(GPU_BENCH_TIMEOUT) python3 $$script --device cuda --out $(GPU_OUT) \
			|| status=$$?; \
	done; \
	exit $$status

clean:
	rm -rf build dist *.egg-info equifast/*.so .pytest_cache .hypothesis .ruff_cache $(EXT_STAMP)
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
