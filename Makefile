# The two commands of the README: `make demo` and `make test`. Everything else supports them.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_PIN := torch==2.13.0
STAMP := build/.installed

.PHONY: install deps build test test-fast test-vllm vllm-env cuda-check gpu-check bench demo clean

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

# torchvision only for the tests that compare sparrow/inputs with transformers' video processors: kept
# out of the environment (the PyPI wheel for a CPU torch does not import there by itself: see
# tests/tiny_checkpoints.py), unpacked under build/ and put on the path of those tests' subprocess.
TORCHVISION_PIN := torchvision==0.28.0
TEST_DEPS := build/test-deps/torchvision/.installed
$(TEST_DEPS):
	$(PIP) install -q --no-deps --target build/test-deps/torchvision $(TORCHVISION_PIN)
	@touch $@

test: build $(TEST_DEPS)
	$(PYTHON) -m pytest -q -x tests
	@$(MAKE) --no-print-directory cuda-check

# Sparrow inside vLLM (tests/in_vllm/): vLLM's CPU build in its own environment under build/, beside
# this machine's torch (scripts/make_vllm_env.py says how and why); made once, then reused.
VLLM_ENV := build/vllm-env
vllm-env: deps
	$(PYTHON) scripts/make_vllm_env.py --env $(VLLM_ENV)

test-vllm: build vllm-env
	$(VLLM_ENV)/bin/python -m pytest -q -x -p no:cacheprovider tests/in_vllm

# Compile every csrc/cuda/*.cu to an object against torch's headers (no GPU, no link needed).
cuda-check:
	@if command -v nvcc >/dev/null 2>&1; then \
	  echo "cuda-check: compiling csrc/cuda/*.cu with nvcc (sm_90, objects only)"; \
	  cmake -S . -B build/cuda-check -G Ninja -DSPARROW_CUDA_CHECK_ONLY=ON \
	    -DPython3_EXECUTABLE=$$(command -v $(PYTHON)) -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null && \
	  cmake --build build/cuda-check -j 2; \
	else echo "cuda-check: nvcc not found, skipped"; fi

# One command for a lent GPU (bench/gpu_check.py): builds for that GPU, runs the CUDA tests and the
# op and decode-step benchmarks at 7B shapes; without a GPU, a dry run at tiny shapes on CPU. It
# installs nothing (GPU machines have no internet): their own torch and transformers are used.
GPU_CHECK_OUT ?=
gpu-check:
	$(PYTHON) bench/gpu_check.py $(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT))

bench: build
	$(PYTHON) bench/bench_ops.py

demo: build
	$(PYTHON) -m sparrow.demo

clean:
	rm -rf build sparrow/_C*.so *.egg-info
