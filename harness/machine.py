"""What machine and library versions produced a number: feeds `env`, result rows and benchmark JSON."""
from __future__ import annotations

import importlib.metadata
import platform
import re
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


def machine_info(parallel: bool = False) -> dict:
    """Everything a reader needs to reproduce a number: GPU, driver, CUDA, library versions; with several GPUs
    visible, or for a `parallel` run, how many GPUs and what links them."""
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "device": device_name(), "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
        info["cudnn"] = torch.backends.cudnn.version()
        info["driver"] = _nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader").partition("\n")[0] or None
    if parallel or torch.cuda.device_count() > 1:
        info["gpus"] = torch.cuda.device_count()
        info["interconnect"] = interconnect(_nvidia_smi("topo", "-m")) if info["gpus"] > 1 else "n/a"
    info.update({n: version(n) for n in LIBRARIES})
    return info


def interconnect(topo: str) -> str:
    """What links the GPUs, from `nvidia-smi topo -m`: 'NVLink (NV18)' when every pair has NVLink, 'PCIe (PIX,
    SYS)' when none does, 'mixed: ...' otherwise; 'unknown' without the matrix."""
    pairs = _gpu_links(topo)
    if not pairs:
        return "unknown (nvidia-smi topo -m gave no GPU matrix)"
    nvlink = sorted({p for p in pairs if p.startswith("NV")})
    other = sorted({p for p in pairs if not p.startswith("NV")})
    if nvlink and not other:
        return f"NVLink ({', '.join(nvlink)})"
    if other and not nvlink:
        return f"PCIe ({', '.join(other)})"
    return f"mixed: NVLink ({', '.join(nvlink)}) and PCIe ({', '.join(other)})"


def _gpu_links(topo: str) -> list[str]:
    """The link of every GPU pair in the matrix: its header row names GPU0..GPUn, and each GPUi row starts
    with that many cells (X on the diagonal; NV# for NVLink; PIX, PXB, PHB, NODE, SYS for PCIe paths)."""
    lines = [line.split() for line in topo.splitlines() if line.strip()]
    header = next((cells for cells in lines if re.fullmatch(r"GPU\d+", cells[0])), None)
    if header is None:
        return []
    gpus = [c for c in header if re.fullmatch(r"GPU\d+", c)]
    links = []
    for cells in lines:
        if cells is not header and cells[0] in gpus and len(cells) > len(gpus):
            links += [c for c in cells[1:len(gpus) + 1] if c != "X"]
    return links


def _nvidia_smi(*arguments: str) -> str:
    """nvidia-smi's output, or '' where it is missing or fails."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", *arguments], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""
