"""The GPU's SM clock, power draw and clock-limit reasons while work runs, sampled through NVML.

An achieved TFLOP/s is kernel time against FLOPs, and kernel time scales with the SM clock. Two stacks can
run the very same cuBLAS kernel at different speeds when one of them keeps the card at its power limit.
Reading the clock beside the rate tells a slower kernel apart from a slower clock. NVML is the driver's
own library (libnvidia-ml.so.1, on every machine with an NVIDIA driver), called through ctypes, so nothing
needs installing. Where it cannot be read, the sampler says why instead of failing the case.
"""
from __future__ import annotations

import ctypes
import statistics
import threading
from dataclasses import dataclass

import torch

NVML_CLOCK_SM = 1
# nvmlClocksEventReasons bits (nvml.h): why the clock sits below its maximum.
REASONS = {0x1: "idle", 0x2: "application clocks", 0x4: "power cap", 0x8: "hardware slowdown",
           0x10: "sync boost", 0x20: "software thermal", 0x40: "hardware thermal", 0x80: "power brake",
           0x100: "display clock"}
PERIOD_S = 0.02  # cheap to read, and finer than NVML's own power averaging (1/6 s to 1 s by card)


def reason_names(mask: int) -> list[str]:
    """The clock-limit reasons set in an NVML bitmask, by name."""
    return [name for bit, name in REASONS.items() if mask & bit]


@dataclass(frozen=True)
class Clocks:
    """What the card ran at while the work ran: medians of the samples, and every limit reason seen."""

    sm_mhz: float
    power_w: float
    samples: int
    reasons: tuple[str, ...]

    @classmethod
    def from_samples(cls, samples: list[tuple[int, int, int]]) -> "Clocks":
        """From (SM clock MHz, power mW, reason bitmask) samples."""
        if not samples:
            raise ValueError("no clock samples")
        seen = 0
        for _, _, mask in samples:
            seen |= mask
        return cls(sm_mhz=float(statistics.median(s[0] for s in samples)),
                   power_w=float(statistics.median(s[1] for s in samples)) / 1e3,
                   samples=len(samples), reasons=tuple(reason_names(seen)))

    def describe(self) -> str:
        limits = ", ".join(self.reasons) or "none"
        return (f"SM clock {self.sm_mhz:.0f} MHz, power {self.power_w:.0f} W (medians of {self.samples} NVML "
                f"samples); clock limits seen: {limits}")

    # A results-table entry like any other measurement (no threshold, no verdict: it explains, it does not judge).
    def metrics(self) -> dict[str, float]:
        return {"sm_clock_mhz": self.sm_mhz, "power_w": self.power_w}

    def thresholds(self) -> dict[str, float | None]:
        return {}

    def checks(self) -> dict[str, bool | None]:
        return {}


class _Nvml:
    """The few NVML calls the sampler makes, on the device torch calls `device`."""

    def __init__(self, device: int):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._check(self.lib.nvmlInit_v2(), "nvmlInit_v2")
        try:
            # torch's device index is not NVML's where CUDA_VISIBLE_DEVICES reorders; the UUID is the same.
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            self.handle = ctypes.c_void_p()
            self._check(self.lib.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(self.handle)),
                        f"nvmlDeviceGetHandleByUUID({uuid})")
            # Newer drivers call them clock "event" reasons, older ones "throttle" reasons: the same call.
            self._reasons = (getattr(self.lib, "nvmlDeviceGetCurrentClocksEventReasons", None)
                             or self.lib.nvmlDeviceGetCurrentClocksThrottleReasons)
        except Exception:
            self.close()
            raise

    @staticmethod
    def _check(rc: int, call: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{call} returned NVML error {rc}")

    def sample(self) -> tuple[int, int, int]:
        mhz, milliwatts, mask = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_ulonglong()
        self._check(self.lib.nvmlDeviceGetClockInfo(self.handle, NVML_CLOCK_SM, ctypes.byref(mhz)), "clock")
        self._check(self.lib.nvmlDeviceGetPowerUsage(self.handle, ctypes.byref(milliwatts)), "power")
        self._check(self._reasons(self.handle, ctypes.byref(mask)), "clock reasons")
        return mhz.value, milliwatts.value, mask.value

    def close(self) -> None:
        self.lib.nvmlShutdown()


class ClockSampler:
    """`with ClockSampler() as clocks:` samples the current CUDA device from a thread while the block runs;
    afterwards `clocks.result` is a Clocks, or None with `clocks.reason` saying why nothing was read."""

    def __init__(self, period_s: float = PERIOD_S):
        self.period_s = period_s
        self.result: Clocks | None = None
        self.reason = ""
        self._samples: list[tuple[int, int, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: _Nvml | None = None

    def __enter__(self) -> "ClockSampler":
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device")
            self._nvml = _Nvml(torch.cuda.current_device())
            self._nvml.sample()  # a probe, not kept: the card is idle until the work starts
        except (OSError, RuntimeError, AttributeError) as e:  # no driver library, an old driver, a failed call
            self.reason = f"SM clock not sampled: {e}"
            self._close()
            return self
        self._thread = threading.Thread(target=self._run, name="nvml-clocks", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._samples.append(self._nvml.sample())
            except RuntimeError as e:
                self.reason = f"SM clock sampling stopped: {e}"
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            if not self._samples and not self.reason:  # work shorter than one period: read it as it ends
                try:
                    self._samples.append(self._nvml.sample())
                except RuntimeError as e:
                    self.reason = f"SM clock not sampled: {e}"
            self.result = Clocks.from_samples(self._samples) if self._samples else None
        self._close()

    def _close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None

    def describe(self) -> str:
        return self.result.describe() if self.result else self.reason
