"""Builds sparrow's ops for the visible GPU (the first stage of `make gpu-check`).

setup.py first (CMakeLists.txt, for the GPU's own architecture, every core). If that fails on a
machine nobody has built on yet (a CMake or toolkit mismatch), torch's JIT extension build from the
same sources, copied to where sparrow/ops.py loads the library from. Either way it then checks
that every op has a CUDA kernel, so a build without them cannot pass for one with them.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OPS = ("fused_fc", "text_attention", "gather_kv_", "write_kv_", "verify")


def arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def cmake_build() -> bool:
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch(), MAX_JOBS=str(os.cpu_count() or 4),
               SPARROW_BUILD_DIR=os.path.join(ROOT, "build", f"gpu-sm{arch().replace('.', '')}"))
    rc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env).returncode
    return rc == 0


def jit_build() -> None:
    from torch.utils import cpp_extension

    os.environ["TORCH_CUDA_ARCH_LIST"] = arch()
    csrc = os.path.join(ROOT, "csrc")
    sources = [os.path.join(csrc, "torch_bindings.cpp"), os.path.join(csrc, "error_word.cpp")]
    sources += sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp"))) + sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    build_dir = os.path.join(ROOT, "build", "gpu-jit")
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(name="sparrow_jit", sources=sources, extra_include_paths=[csrc], build_directory=build_dir,
                       extra_cflags=["-O3", "-std=c++20", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       extra_cuda_cflags=["-O3", "-std=c++20", "--expt-relaxed-constexpr"],
                       is_python_module=False, verbose=True)
    target = os.path.join(ROOT, "sparrow", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    shutil.copyfile(os.path.join(build_dir, "sparrow_jit.so"), target)


def check_kernels() -> None:
    """In a fresh process: the library sparrow loads has a CUDA kernel for every op."""
    code = ("import torch, sparrow; assert sparrow.ops.HAS_COMPILED_OPS, 'no compiled ops'; "
            f"missing = [o for o in {OPS!r} if not torch._C._dispatch_has_kernel_for_dispatch_key('sparrow::' + o, 'CUDA')]; "
            "assert not missing, f'no CUDA kernel for {missing}'; print('CUDA kernels for every op')")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def main() -> None:
    if not cmake_build():
        print("gpu_build: setup.py failed; trying torch's JIT build of the same sources", flush=True)
        jit_build()
    check_kernels()


if __name__ == "__main__":
    main()
