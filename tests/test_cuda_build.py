"""Static checks of the CUDA sources' wiring; no compiler needed (`make test` runs the nvcc
compile check, `make cuda-check`, separately).

- every csrc/cuda/*.cu registers CUDA kernels (TORCH_LIBRARY_IMPL(sparrow, CUDA, m)) only for ops
  whose schema csrc/torch_bindings.cpp defines, and every op there has a CUDA kernel (but the
  private host helpers, `_name`, which have none);
- device headers (csrc/cuda/*.cuh) stay framework-free: no torch / ATen / c10 include;
- launchers include the c10/cuda headers that compile without a GPU, not ATen/cuda/CUDAContext.h;
- launchers read no device value on the host (value checks go through the error word).
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"


def _schema_ops() -> set[str]:
    text = (ROOT / "csrc" / "torch_bindings.cpp").read_text()
    # m.def("name(...) -> ...") possibly split over adjacent string literals.
    return set(re.findall(r'm\.def\(\s*"([A-Za-z_][A-Za-z0-9_]*)\(', text))


def _impls(text: str) -> list[str]:
    blocks = re.findall(r"TORCH_LIBRARY_IMPL\(\s*sparrow\s*,\s*CUDA\s*,\s*m\s*\)\s*\{(.*?)\}", text, re.S)
    return [name for block in blocks for name in re.findall(r'm\.impl\(\s*"([A-Za-z_][A-Za-z0-9_]*)"', block)]


def test_schema_lists_the_ops():
    assert {"fused_fc", "text_attention", "gather_kv_", "write_kv_", "verify", "_set_error_word",
            "_raise_error_word"} <= _schema_ops()


def test_every_cu_registers_known_cuda_ops():
    ops = _schema_ops()
    cu_files = sorted(CUDA_DIR.glob("*.cu"))
    assert cu_files, "no csrc/cuda/*.cu sources"
    registered: list[str] = []
    for path in cu_files:
        names = _impls(path.read_text())
        assert names, f"{path.name} registers no CUDA kernel (TORCH_LIBRARY_IMPL(sparrow, CUDA, m))"
        unknown = set(names) - ops
        assert not unknown, f"{path.name} registers ops with no schema: {sorted(unknown)}"
        registered += names
    assert len(registered) == len(set(registered)), f"an op is registered twice: {sorted(registered)}"
    missing = {op for op in ops if not op.startswith("_")} - set(registered)
    assert not missing, f"ops without a CUDA kernel: {sorted(missing)}"


def test_device_headers_are_framework_free():
    for path in sorted(CUDA_DIR.glob("*.cuh")):
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', path.read_text())
        bad = [inc for inc in includes if inc.split("/")[0] in {"torch", "ATen", "c10"}]
        assert not bad, f"{path.name} includes framework headers {bad}"


def test_launchers_avoid_cuda_context_header():
    for path in sorted(CUDA_DIR.glob("*.cu")):
        text = path.read_text()
        assert "ATen/cuda/CUDAContext.h" not in text, f"{path.name}: include c10/cuda headers instead"
        assert "C10_CUDA_KERNEL_LAUNCH_CHECK()" in text, f"{path.name}: check each kernel launch"
        assert "getCurrentCUDAStream" in text, f"{path.name}: launch on the current stream"


def test_launchers_read_no_device_values():
    """A decode step reads the device once; no launcher may add a read of its own (a direct call's
    error-word read lives in cuda/value_checks.h, and is skipped inside deferred_checks)."""
    reads = re.compile(r"\.item<|\.item\(|\.cpu\(|\.tolist\(|first_true|cudaMemcpy|cudaStreamSynchronize|cudaDeviceSynchronize")
    for path in sorted(CUDA_DIR.glob("*.cu")):
        found = reads.findall(path.read_text())
        assert not found, f"{path.name} reads device values on the host: {found}"
    header = (CUDA_DIR / "value_checks.h").read_text()
    assert header.count("cudaStreamSynchronize") == 2  # the direct call's read, and its error path
    for path in sorted(CUDA_DIR.glob("*.cu")):
        text = path.read_text()
        assert "begin_value_checks" in text and "finish_value_checks" in text, f"{path.name}: no value checks"
