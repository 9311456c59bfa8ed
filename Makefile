# Two commands do all set-up on a fresh machine (Python >= 3.10):
#   make demo   - venv + pinned deps + build, then the main job on its built-in default
#   make test   - same set-up, then the whole test suite
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

.PHONY: demo test test-isa bench info build clean

demo: $(BUILD_STAMP)
	$(PY) -m lowrank_kernels demo

test: $(BUILD_STAMP)
	$(PY) -m pytest tests --ignore=tests/triton -q -p no:cacheprovider
	@echo "== Triton kernels under TRITON_INTERPRET=1 (own process: read at decoration time) =="
	TRITON_INTERPRET=1 $(PY) -m pytest tests/triton -q -p no:cacheprovider

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

bench: $(BUILD_STAMP)
	$(PY) -m lowrank_kernels bench

info: $(BUILD_STAMP)
	$(PY) -m lowrank_kernels info

build: $(BUILD_STAMP)

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
