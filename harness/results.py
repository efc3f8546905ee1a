"""One flat row schema for every table, and the run folder that collects rows as they arrive."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

TABLES = ("export", "parity", "quality", "perf")


@dataclass(frozen=True)
class Row:
    """case, component, backend, precision, shape, tokens, metric, value, threshold, passed, device, versions."""

    case: str
    component: str
    backend: str
    precision: str
    shape: str
    tokens: int
    metric: str
    value: float
    threshold: float | None
    passed: bool | None
    device: str
    versions: str

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def as_dict(self) -> dict:
        return asdict(self)
