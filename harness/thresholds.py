"""The only reader of harness/thresholds.toml: the judges' bands (harness/compare.py), the regression rules
(harness/regression.py), the engine checks (engines/) and the floors (harness/profile.py) all come through here."""
from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path

from harness.errors import HarnessError

THRESHOLDS = Path(__file__).with_name("thresholds.toml")


@lru_cache(maxsize=None)
def thresholds(path: Path = THRESHOLDS) -> dict:
    """The parsed thresholds file (read once per process and path)."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise HarnessError(f"{path}: unreadable ({type(exc).__name__}: {exc}); restore it from git") from None


def band(kind: str, precision: str) -> dict:
    """The [<kind>.<precision>] section (a parity or quality band), or an error naming the precisions it has."""
    table = thresholds()[kind]
    if precision not in table:
        known = ", ".join(k for k, v in table.items() if isinstance(v, dict))
        raise HarnessError(f"no [{kind}.{precision}] thresholds in {THRESHOLDS}; known precisions: {known}")
    return table[precision]
