"""Calibrated static scales, made once for every backend that runs them: one disk-cache entry per set of scales.

A backend's static scales (torch-fp8's activation scales, ModelOpt's quantizer state and so the fp8/int8 engines
built from its Q/DQ export) come from running the expert on its calls in the real denoising loop
(harness.components.loop_inputs). That loop is the slow part: at 40 layers it is minutes of eager forwards. So
the entry is keyed on what determines the calls without running them: the model's identity, the expert, shape and
dtype, the calibration prompts, seed and steps, and the libraries, with the backend's own settings (its recipe,
its quantization config). A hit reads a few KB per layer and runs no loop; the entry's files can be carried to
another runner of the same model and libraries (harness/cache.py checks each file's size and sha256, and the spec
it was written for, and rebuilds a damaged entry with one log line).

Every lookup is logged with its outcome and seconds, and kept in CALIBRATIONS, from which the session gives the
cases that calibrated a row each (Calibrations).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from harness.cache import Cached, DiskCache
from harness.case import Case, precision_of
from harness.components import Call, Component
from harness.errors import BackendUnavailable
from harness.machine import version

log = logging.getLogger(__name__)

KIND = "calibration"
SCALES_FILE = "scales.pt"
# Bumped when what an entry stores, or how the calls are run through the expert, changes: older entries are rebuilt.
FORMAT = 1
METRIC = "calibration_s"


@dataclass(frozen=True)
class Calibration:
    """One lookup of a set of scales: which, whether it was a hit, a miss or a rebuild, and what it took."""

    scales: str  # whose scales: "torch-fp8-static", "modelopt-fp8", "modelopt-int8"
    expert: str
    key: str  # the cache entry's folder name
    outcome: str  # "hit" | "miss" | "rebuild" (harness.cache.CacheEvent)
    seconds: float  # this lookup: reading the entry on a hit; the loop and the calibration otherwise
    made_s: float  # what making the stored scales took, the loop included
    loop_s: float  # of which running the eager loop
    forwards: int  # the expert calls calibrated on
    prompts: int  # the calibration prompts those calls came from

    def line(self) -> str:
        """What the log and a row's note say."""
        made = (f"calibrated in {self.made_s:.1f} s (eager loop {self.loop_s:.1f} s, {self.forwards} calls of "
                f"{self.prompts} prompt{'s' if self.prompts != 1 else ''})")
        if self.outcome == "hit":
            return f"cache hit, read in {self.seconds:.2f} s; {made} when stored"
        return f"cache {self.outcome}: {made}"


# Every lookup in this process, in order: the session takes the ones a backend's build made (Session.build).
CALIBRATIONS: list[Calibration] = []


def calibration_prompts(prompts: int | None) -> int:
    """How many calibration prompts `prompts` means (None: all of harness.pipeline.CALIBRATION_PROMPTS)."""
    from harness.pipeline import CALIBRATION_PROMPTS

    return len(CALIBRATION_PROMPTS[:prompts])


def calibration_entry(scales: str, component: Component, case: Case, settings: dict,
                      prompts: int | None) -> tuple[str, dict]:
    """The cache entry's readable name and spec: everything the scales depend on, known without running the loop."""
    spec = {"format": FORMAT, "scales": scales, "loop": component.loop_inputs.identity, "weights": component.fingerprint,
            "expert": case.component, "shape": case.shape.id, "dtype": str(case.dtype),
            "device": component.device.type, "prompts": calibration_prompts(prompts),
            "versions": {name: version(name) for name in ("torch", "diffusers")}, **settings}
    readable = f"{scales}-{case.component}-{case.source}-{case.shape.id}-{precision_of(case.dtype)}-p{spec['prompts']}"
    return readable, spec


def calibrated(scales: str, component: Component, case: Case, cache: DiskCache, settings: dict,
               calibrate: Callable[[list[Call]], dict], prompts: int | None = None) -> Cached[dict]:
    """The scales named `scales` of `component` for `case`, through the cache: on a miss, `calibrate(calls)` runs on
    the expert's calls in the loop over the first `prompts` calibration prompts and returns what to store
    (tensors, and plain values). `settings` is the backend's part of the key (its recipe, config, library version).

    The stored value is {"scales": what calibrate returned, "made_s", "loop_s", "forwards", "prompts"}.
    """
    if component.loop_inputs is None:
        raise BackendUnavailable(f"{component.name} carries no denoising-loop inputs to calibrate {scales} on (an "
                                 "expert held without a WanModel); quantize an expert of a whole model")
    readable, spec = calibration_entry(scales, component, case, settings, prompts)

    def build(folder: Path) -> None:
        start = time.perf_counter()
        calls = component.loop_inputs(case, False, prompts)
        loop_s = time.perf_counter() - start
        value = calibrate(calls)
        torch.save({"scales": value, "made_s": time.perf_counter() - start, "loop_s": loop_s, "forwards": len(calls),
                    "prompts": spec["prompts"]}, folder / SCALES_FILE)

    cached = cache.fetch(KIND, readable, spec, build, _load)
    stored = cached.value
    made = Calibration(scales, case.component, cached.path.name, cache.events[-1].outcome, cached.seconds,
                       stored["made_s"], stored["loop_s"], stored["forwards"], stored["prompts"])
    CALIBRATIONS.append(made)
    log.info("calibration %s: %s (%s)", readable, made.line(), cached.path)
    return cached


def _load(folder: Path) -> dict:
    """An entry's stored value: tensors and plain containers only, so a file carried from elsewhere runs no code."""
    return torch.load(folder / SCALES_FILE, map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class Calibrations:
    """The calibrations a backend made or read while it was built, as rows beside its case's result: one metric per
    expert, its seconds in this run, the note saying hit or miss and what making the scales took."""

    made: tuple[Calibration, ...]

    def metrics(self) -> dict[str, float | None]:
        return {f"{METRIC}_{c.expert}": c.seconds for c in self.made}

    def thresholds(self) -> dict[str, float | None]:
        return {}

    def checks(self) -> dict[str, bool | None]:
        return {}

    def notes(self) -> dict[str, str]:
        return {f"{METRIC}_{c.expert}": f"{c.scales}: {c.line()}" for c in self.made}
