"""A content-keyed disk cache of build artifacts (ONNX graphs, engines): one folder per entry.

The key is a readable part (a Case id and what was built) plus a hash of everything that changes
the artifact, so a new TensorRT version or precision can never be served an old file. Entries are
built into a temporary folder beside the target and renamed into place, so a crash or a concurrent
build never leaves a half-written entry under the final name.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
MANIFEST = "manifest.json"


def spec_hash(spec: dict) -> str:
    """A stable sha256 of a JSON-able description of an artifact's inputs."""
    blob = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def entry_key(readable: str, spec: dict) -> str:
    """Folder name: the readable part (made filesystem-safe) plus 16 hex digits of the spec hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", readable)
    return f"{safe}-{spec_hash(spec)[:16]}"


@dataclass(frozen=True)
class CacheEvent:
    """One lookup: which entry, whether it was a hit, a miss or a rebuild of a bad entry, and how long it took."""

    kind: str
    key: str
    outcome: str  # "hit" | "miss" | "rebuild"
    seconds: float


@dataclass
class Cached(Generic[T]):
    """What a lookup returns: the loaded value, the entry folder, and whether it came from disk."""

    value: T
    path: Path
    hit: bool
    seconds: float


class CorruptEntry(Exception):
    """Raised by a loader (or the manifest check) when an entry on disk cannot be used."""


@dataclass
class DiskCache:
    """Folders under `root/<kind>/<key>`; `events` records every hit, miss and rebuild in order."""

    root: Path
    events: list[CacheEvent] = field(default_factory=list)

    def __post_init__(self):
        self.root = Path(self.root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def fetch(self, kind: str, readable: str, spec: dict, build: Callable[[Path], None],
              load: Callable[[Path], T]) -> Cached[T]:
        """Load the entry for (readable, spec), building it with `build(folder)` when absent or unusable."""
        key = entry_key(readable, spec)
        target = self.path(kind, key)
        start = time.perf_counter()
        outcome = "miss"
        if target.exists():
            try:
                value = load(_checked(target))
                return self._record(kind, key, "hit", start, Cached(value, target, True, 0.0))
            except Exception as exc:  # any failure to load means the entry is unusable: rebuild it
                log.warning("cache entry %s is unusable (%s: %s); rebuilding it", target, type(exc).__name__, exc)
                _discard(target)
                outcome = "rebuild"
        self._build_into(target, spec, build)
        value = load(_checked(target))
        return self._record(kind, key, outcome, start, Cached(value, target, False, 0.0))

    def _build_into(self, target: Path, spec: dict, build: Callable[[Path], None]) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            _write_manifest(tmp, spec)
            try:
                os.rename(tmp, target)
            except OSError:  # another process renamed its build into place first: keep theirs
                if not target.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _record(self, kind: str, key: str, outcome: str, start: float, cached: Cached[T]) -> Cached[T]:
        cached.seconds = time.perf_counter() - start
        self.events.append(CacheEvent(kind, key, outcome, cached.seconds))
        return cached

    def outcomes(self, kind: str, key: str) -> list[str]:
        """The recorded outcomes for one entry, oldest first (what tests assert hits through)."""
        return [e.outcome for e in self.events if e.kind == kind and e.key == key]


def _write_manifest(folder: Path, spec: dict) -> None:
    """Record each file's size next to the spec, so a truncated file is caught before it is parsed."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps({"spec": spec, "files": files}, indent=1, default=str))


def _checked(folder: Path) -> Path:
    """Raise CorruptEntry when the manifest is missing or any file's size differs from it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptEntry(f"no readable {MANIFEST}: {exc}") from None
    for name, size in manifest["files"].items():
        path = folder / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            raise CorruptEntry(f"{name} is {actual} bytes, expected {size}")
    return folder


def _discard(target: Path) -> None:
    """Move a bad entry aside first (atomic), then delete it, so no reader sees it half-deleted."""
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.bad.", dir=target.parent))
    os.rename(target, trash / "entry")
    shutil.rmtree(trash, ignore_errors=True)


def _file_mode() -> int:
    """What open() would give a new file: 0o666 less the umask (read without changing it for good)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a single file atomically (temp file beside it, then os.replace).

    mkstemp makes the temp file owner-only (0600); it gets the usual mode back before the rename, so
    results and engines stay readable by the other users of a shared runner.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_cache_dir() -> Path:
    """--cache-dir's default: $WAN_BENCH_CACHE or .cache (git-ignored)."""
    return Path(os.environ.get("WAN_BENCH_CACHE", ".cache"))
