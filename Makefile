# Two commands do all set-up on a fresh machine (Python >= 3.10):
#   make demo   - venv + pinned deps + build, then the main job on its built-in default
#   make test   - same set-up, then the whole test suite (make test-fast: without the slow tests)
# Both are idempotent: stamps skip the dependency install and the build when nothing changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.stamp-deps
BUILD_STAMP := $(VENV)/.stamp-build
SOURCES := $(shell find csrc lowrank_kernels -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py pyproject.toml

# torch's extension builder finds ninja on PATH; two compile jobs match the machine.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MAX_JOBS ?= 2

.PHONY: demo test test-fast test-rounding test-isa lint format bench info build clean gpu-check gpu-fit

demo: $(BUILD_STAMP)
	$(PY) -m lowrank_kernels demo

# The whole suite in one pytest run, slow tests included: tests/triton runs inside it in a process
# of its own under TRITON_INTERPRET=1 (tests/test_triton_interpreted.py), so plain `pytest` from
# the root runs the same tests.
test: $(BUILD_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# The fast tier (under 3 minutes on 2 cores): every test not marked slow, tests/triton included
# (its subprocess gets the same -m). tests/conftest.py fails the run if a test module loses all
# its tests to the marker.
test-fast: $(BUILD_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

# The numerical modules again under other BLAS / ATen code paths (CI runs this after `test`): a
# test that holds only for one machine's rounding fails here on any machine. MKL_CBWR=COMPATIBLE
# is MKL's conservative code path; ATEN_CPU_CAPABILITY picks ATen's vectorised kernels (avx2, and
# default = scalar where the CPU has AVX-512, whose own path the plain run already took).
NUMERICAL_TESTS := tests/test_decompose.py tests/test_rsvd_properties.py tests/test_batch_invariant.py \
	tests/test_robust.py tests/test_adapters_qpissa.py
ROUNDING_VARIANTS := MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=avx2 \
	$(if $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo yes),ATEN_CPU_CAPABILITY=default)

test-rounding: $(BUILD_STAMP)
	@set -e; for variant in $(ROUNDING_VARIANTS); do \
		echo "== numerical tests under $$variant =="; \
		env $$variant $(PY) -m pytest $(NUMERICAL_TESTS) -q -p no:cacheprovider; \
	done

# The C++ kernel modules again under every lower CPU ISA this CPU runs (LOWRANK_KERNELS_ISA;
# on an AVX-512 CPU: avx2 and scalar), against the same references as `make test`. The fused
# forward runs its with-bias cases only (the same kernel paths as without, plus the bias).
ISA_TEST_MODULES := tests/test_nf4_kernels.py tests/test_fused_linear_kernels.py tests/test_gram_kernels.py \
	tests/test_skinny_kernels.py tests/test_norms_kernels.py tests/test_huber_kernels.py \
	-k "not (test_forward_matches_reference and nobias)"
test-isa: $(BUILD_STAMP)
	@for isa in $$($(PY) -c "import lowrank_kernels as lk; print(*reversed(lk.build_info()['cpu_isas_supported'][:-1]))"); do \
		echo "== C++ kernel tests with LOWRANK_KERNELS_ISA=$$isa =="; \
		LOWRANK_KERNELS_ISA=$$isa $(PY) -m pytest $(ISA_TEST_MODULES) -q -p no:cacheprovider || exit 1; \
	done

# Style gate (CI runs it first): ruff's lint and format check on the Python, clang-format on the
# C++/CUDA sources, all pinned in requirements.txt. `make format` applies both formatters.
CXX_SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_SOURCES)

format: $(DEPS_STAMP)
	$(VENV)/bin/ruff check --fix --select I .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

bench: $(BUILD_STAMP)
	$(PY) -m lowrank_kernels bench

# AOT-compiles every Triton and CUDA kernel for sm_80 / sm_90 (no GPU needed) and fails on
# spills or shared memory over the limit; report in bench/results/gpu_fit.{txt,json}.
gpu-fit: $(DEPS_STAMP)
	$(PY) -m lowrank_kernels.gpu_fit

info: $(BUILD_STAMP)
	$(PY) -m lowrank_kernels info

build: $(BUILD_STAMP)

# On a CUDA machine: build (with the CUDA sources), the suite on the GPU, the GPU benchmarks, one
# report in bench/results/gpu_check.md (lowrank_kernels/bench/gpu_check.py). Without a GPU: one line, exit 0.
gpu-check:
	@if ! nvidia-smi -L >/dev/null 2>&1; then \
		echo "gpu-check: no CUDA GPU on this machine (nvidia-smi finds none); nothing to check"; \
	else \
		$(MAKE) --no-print-directory build && $(PY) -m lowrank_kernels.bench.gpu_check; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements.txt requirements-nodeps.txt | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
	$(PY) -m lowrank_kernels info
	touch $@

clean:
	rm -rf build lowrank_kernels/*.so $(BUILD_STAMP)
