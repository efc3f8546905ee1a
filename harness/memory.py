"""Host memory of an export or an engine build: each stage's time and peak resident memory, and a stage run in a
process of its own so that what it allocated goes back to the machine when it ends. Also each case's peaks, host and
GPU, from its start to its rows (start_case, case_peaks).

The peak is the kernel's own high-water mark (VmHWM in /proc/self/status), reset at each stage's start by writing
5 to /proc/self/clear_refs, so a spike of a few milliseconds still counts. Resident memory mixes anonymous memory
(what the process allocated) with file-backed pages (mapped libraries, and the ONNX external data TensorRT maps
while it builds), which the kernel can drop at any time; a thread samples the two apart every 20 ms. Where /proc is
absent (macOS) the peak is ru_maxrss, the whole process's peak so far, and the split is unknown.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import resource
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

GiB = 2 ** 30
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
SAMPLE_S = 0.02
T = TypeVar("T")


@dataclass(frozen=True)
class StageUsage:
    """One stage: wall time, peak resident bytes, and the largest anonymous and file-backed parts sampled."""

    stage: str
    seconds: float
    peak_bytes: int
    anon_bytes: int | None = None  # None where /proc is absent
    file_bytes: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in bytes."""
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    values = {}
    for line in STATUS.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in wanted:
            values[key] = int(rest.split()[0]) * 1024
    return values


def meminfo(key: str) -> int | None:
    """A field of /proc/meminfo in bytes (MemTotal, MemAvailable), or None where there is no /proc (macOS)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith(f"{key}:")), None)


def _have_proc() -> bool:
    return STATUS.is_file()


# The highest marks that a stage's or a timed round's reset wiped since the case began (case_peaks): a case's peak
# is the larger of these and the marks now, so measuring part of a case does not hide the rest of it.
_WIPED = {"host": 0, "gpu": 0, "gpu_reserved": 0}
# The metrics case_peaks gives every row a case records: the whole case's peaks, unlike a timing's peak_mem_gib,
# which covers its timed rounds alone.
HOST_PEAK, GPU_PEAK, GPU_RESERVED_PEAK = CASE_PEAKS = ("case_peak_host_gib", "case_peak_gpu_gib",
                                                       "case_peak_gpu_reserved_gib")


def _reset_peak() -> None:
    """Start VmHWM afresh (Linux 4.0 and later); where that is refused, the peak counts from the process start."""
    _WIPED["host"] = max(_WIPED["host"], _peak_bytes())
    with contextlib.suppress(OSError):
        CLEAR_REFS.write_text("5")


def reset_gpu_peak(device=None) -> None:
    """Start CUDA's peak allocation counters afresh on `device` (the current one by default), as _reset_peak does
    the host's. Before CUDA is initialised there is nothing to reset, and resetting would initialise it."""
    import torch

    if not torch.cuda.is_initialized():
        return
    _WIPED["gpu"] = max(_WIPED["gpu"], torch.cuda.max_memory_allocated(device))
    _WIPED["gpu_reserved"] = max(_WIPED["gpu_reserved"], torch.cuda.max_memory_reserved(device))
    torch.cuda.reset_peak_memory_stats(device)


def start_case(cuda: bool) -> None:
    """Reset the peaks that case_peaks reads: the host's always, CUDA's where the case runs on it."""
    _reset_peak()
    if cuda:
        reset_gpu_peak()
    _WIPED.update(dict.fromkeys(_WIPED, 0))


def case_peaks(cuda: bool) -> dict[str, float]:
    """This process's peak resident memory since start_case, and on CUDA the caching allocator's peak allocated and
    reserved memory, in GiB: how close the case came to the machine's RAM and the card's memory. Processes a case
    starts (an isolated export stage, the ranks of a parallel run) are not counted."""
    peaks = {HOST_PEAK: max(_WIPED["host"], _peak_bytes()) / GiB}
    if cuda:
        import torch

        peaks[GPU_PEAK] = max(_WIPED["gpu"], torch.cuda.max_memory_allocated()) / GiB
        peaks[GPU_RESERVED_PEAK] = max(_WIPED["gpu_reserved"], torch.cuda.max_memory_reserved()) / GiB
    return peaks


def _peak_bytes() -> int:
    if _have_proc():
        return _status()["VmHWM"]
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class _Sampler:
    """A daemon thread keeping the largest RssAnon and RssFile seen, until stopped."""

    def __init__(self):
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        status = _status()
        self.anon = max(self.anon, status["RssAnon"])
        self.file = max(self.file, status["RssFile"])

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def __enter__(self) -> "_Sampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@contextlib.contextmanager
def stage(name: str, stages: list[StageUsage]) -> Iterator[None]:
    """Measure the body as stage `name` and append its StageUsage to `stages` when it completes."""
    _reset_peak()
    start = time.perf_counter()
    if not _have_proc():
        yield
        stages.append(StageUsage(name, time.perf_counter() - start, _peak_bytes()))
        return
    with _Sampler() as sampler:
        yield
        seconds = time.perf_counter() - start
    stages.append(StageUsage(name, seconds, _peak_bytes(), sampler.anon, sampler.file))


def resident_bytes() -> int:
    """This process's resident memory now (its peak so far where /proc is absent)."""
    return _status()["VmRSS"] if _have_proc() else _peak_bytes()


class ChildDied(RuntimeError):
    """The process running an isolated stage ended without an answer (killed, for example for memory)."""


def run_isolated(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` in a fresh process, which exits afterwards: everything it allocated is given back.

    The process is spawned, not forked: it starts from an empty interpreter and imports only `fn`'s module and what
    that imports (an engine build needs no torch beside it), and it shares no pages with the caller. `fn`, its
    arguments and its result must pickle; an exception it raises is raised here.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args, **kwargs).result()
        except BrokenProcessPool:
            raise ChildDied(f"the process running {fn.__module__}.{fn.__qualname__} ended without an answer "
                            "(killed: out of memory?)") from None


@dataclass(frozen=True)
class StageTable:
    """Per-stage rows of the export table: `<stage>_s`, `_peak_gib`, `_anon_gib`, `_file_gib`, `_x_weights`.

    With `limit`, each `_x_weights` carries it as its threshold and whether the stage kept under it.
    """

    stages: tuple[StageUsage, ...]
    weight_bytes: int
    limit: float | None = None

    def _key(self, usage: StageUsage) -> str:
        return usage.stage.replace(" ", "_").replace("+", "_")

    def multiple(self, usage: StageUsage) -> float:
        return usage.peak_bytes / self.weight_bytes

    def metrics(self) -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        for usage in self.stages:
            key = self._key(usage)
            values.update({f"{key}_s": usage.seconds, f"{key}_peak_gib": usage.peak_bytes / GiB,
                           f"{key}_anon_gib": None if usage.anon_bytes is None else usage.anon_bytes / GiB,
                           f"{key}_file_gib": None if usage.file_bytes is None else usage.file_bytes / GiB,
                           f"{key}_x_weights": self.multiple(usage)})
        return values

    def thresholds(self) -> dict[str, float | None]:
        return {f"{self._key(u)}_x_weights": self.limit for u in self.stages} if self.limit else {}

    def checks(self) -> dict[str, bool | None]:
        return {f"{self._key(u)}_x_weights": self.multiple(u) <= self.limit for u in self.stages} if self.limit else {}
