# The two commands of the README: `make demo` and `make test`. Everything else supports them.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_PIN := torch==2.13.0
STAMP := build/.installed

.PHONY: install deps build test test-fast cuda-check bench demo clean

# Fresh machine -> everything: torch only where none is importable (an unpinned torch would pull
# GBs of CUDA wheels), then the pinned Python deps, then sparrow itself from source.
install: deps
	$(PIP) install --no-build-isolation --no-deps -e .

deps: $(STAMP)
$(STAMP): requirements.txt
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_PIN)
	$(PIP) install -r requirements.txt
	@mkdir -p build && touch $(STAMP)

# Incremental in-place build of sparrow/_C*.so (CMake keeps its state in build/cmake).
build: deps
	$(PYTHON) setup.py -q build_ext --inplace

test: build
	$(PYTHON) -m pytest -q -x tests
	@$(MAKE) --no-print-directory cuda-check

# Compile every csrc/cuda/*.cu to an object against torch's headers (no GPU, no link needed).
cuda-check:
	@if command -v nvcc >/dev/null 2>&1; then \
	  echo "cuda-check: compiling csrc/cuda/*.cu with nvcc (sm_90, objects only)"; \
	  cmake -S . -B build/cuda-check -G Ninja -DSPARROW_CUDA_CHECK_ONLY=ON \
	    -DPython3_EXECUTABLE=$$(command -v $(PYTHON)) -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null && \
	  cmake --build build/cuda-check -j 2; \
	else echo "cuda-check: nvcc not found, skipped"; fi

bench: build
	$(PYTHON) bench/bench_ops.py

demo: build
	$(PYTHON) -m sparrow.demo

clean:
	rm -rf build sparrow/_C*.so *.egg-info
