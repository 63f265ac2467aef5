"""Builds sparrow's compiled ops by driving CMakeLists.txt (the one list of sources).

With a CPU torch: the CPU kernels. With a CUDA torch: CPU and CUDA kernels, for the
architectures in TORCH_CUDA_ARCH_LIST (default: the visible GPU's, else 9.0 for Hopper).
Build against the torch you already have: `pip install --no-build-isolation .`
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _torch_or_exit():
    try:
        import torch
    except ImportError:
        sys.exit(
            "sparrow: torch is not importable. Install it first (here: `pip install torch==2.13.0`), "
            "then build with `pip install --no-build-isolation .`, or run `make install`."
        )
    return torch


def _default_cuda_arch_list(torch) -> str:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "9.0"


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        torch = _torch_or_exit()
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(os.environ.get("SPARROW_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if torch.version.cuda is not None:
            env.setdefault("TORCH_CUDA_ARCH_LIST", _default_cuda_arch_list(torch))
        generator = ["-G", "Ninja"] if _has_ninja() else []
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), *generator,
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DSPARROW_OUTPUT_DIR={target.parent}",
            f"-DSPARROW_LIB_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SPARROW_BUILD_TYPE', 'Release')}",
        ]
        subprocess.run(configure, check=True, env=env)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True, env=env)
        if not target.exists():
            raise RuntimeError(f"sparrow: CMake finished but {target} was not produced")


def _has_ninja() -> bool:
    try:
        subprocess.run(["ninja", "--version"], check=True, capture_output=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


setup(ext_modules=[CMakeExtension("sparrow._C")], cmdclass={"build_ext": CMakeBuild})
