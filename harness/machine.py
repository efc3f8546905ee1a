"""What machine and library versions produced a number: feeds `env`, result rows and benchmark JSON."""
from __future__ import annotations

import importlib.metadata
import platform
from functools import lru_cache

import torch

LIBRARIES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "tensorrt", "tensorrt_rtx",
             "torchao", "lpips")
# Distribution names differ from import names for the TensorRT wheels.
_DISTRIBUTIONS = {"tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
                  "tensorrt_rtx": ("tensorrt-rtx-cu13", "tensorrt-rtx", "tensorrt_rtx")}


def version(name: str) -> str | None:
    """Installed version of a library, or None; reads metadata so nothing heavy is imported."""
    for dist in _DISTRIBUTIONS.get(name, (name,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@lru_cache(maxsize=None)
def device_name(device: str = "cuda") -> str:
    """'NVIDIA H100 80GB HBM3 (sm_90)' on a GPU, 'cpu (<processor>)' otherwise."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@lru_cache(maxsize=None)
def versions_string() -> str:
    """Compact 'torch=2.14.1;diffusers=0.42.1;…' for the results rows' `versions` column."""
    return ";".join(f"{n}={v}" for n in LIBRARIES if (v := version(n)))


def machine_info() -> dict:
    """Everything a reader needs to reproduce a number: GPU, driver, CUDA, library versions."""
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "device": device_name(), "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
        info["cudnn"] = torch.backends.cudnn.version()
        info["driver"] = _driver_version()
    info.update({n: version(n) for n in LIBRARIES})
    return info


def _driver_version() -> str | None:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None
