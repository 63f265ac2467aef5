"""Shared test helpers: which devices to run on, and dtype-tied tolerances."""

import importlib.util

import pytest
import torch

import sparrow  # noqa: F401  (loads the compiled ops when built)

# tests/in_vllm/ runs under vLLM's own environment (make test-vllm); elsewhere it is not collected.
# (Not named tests/vllm: with tests/ on the path, that folder would pass for the vllm package.)
collect_ignore = [] if importlib.util.find_spec("vllm") else ["in_vllm"]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def pytest_collection_modifyitems(config, items):
    # Tests marked `cuda` skip cleanly without a GPU and run wherever one exists.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def device_params():
    """pytest params over every available device; the CUDA one carries the `cuda` mark."""
    return [pytest.param(d, marks=pytest.mark.cuda) if d == "cuda" else d for d in DEVICES]


def requires_compiled_ops():
    return pytest.mark.skipif(not sparrow.ops.HAS_COMPILED_OPS, reason="compiled ops not built")


def dtype_error_bound(out, ref64, same_dtype_out):
    """flash-attention's rule: the kernel's error against a float64 reference may be at most about
    twice the error of the same computation done by PyTorch in the same dtype (plus a floor)."""
    kernel_err = (out.double() - ref64).abs().max().item()
    torch_err = (same_dtype_out.double() - ref64).abs().max().item()
    return kernel_err, 2.0 * torch_err + 1e-6
