"""Tests of Sparrow inside vLLM, run by `make test-vllm` with build/vllm-env's python (vLLM's CPU
build beside this machine's torch: scripts/make_vllm_env.py). tests/conftest.py leaves this folder
out wherever vLLM is not importable, so `make test` never depends on it."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: tiny_models, tiny_checkpoints
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository: sparrow, built in place
