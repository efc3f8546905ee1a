"""A content-keyed disk cache of build artifacts (ONNX graphs, engines): one folder per entry.

The key is a readable part (a Case id and what was built) plus a hash of everything that changes
the artifact, so a new TensorRT version or precision can never be served an old file. Entries are
built into a temporary folder beside the target and renamed into place, so a crash or a concurrent
build never leaves a half-written entry under the final name. Each entry's manifest, written last,
holds the spec and the size and sha256 of every file; a hit is served only when the manifest is the
caller's spec and the entry's files are exactly the listed ones, each still matching it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, TypeVar

from harness.errors import HarnessError

log = logging.getLogger(__name__)

T = TypeVar("T")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # 2: size and sha256 per file (1 had sizes only: such entries are rebuilt)
HASH_CHUNK = 8 * 2 ** 20
# Hashing runs at roughly 1-2 GB/s, so a 40-layer expert's 28.6 GB ONNX takes tens of seconds: files
# past this size get their hash time logged, so a slow hit is explained.
HASH_LOG_BYTES = 2 ** 30
# A writer's temp folder is `.<key>.tmp-<host>-<pid>.<random>`. One whose writer is gone (same host, pid
# no longer running) is swept at once. One whose writer cannot be checked (another host sharing the
# cache, a restored CI cache, or a name from before pids were recorded) is swept only when nothing in it
# has changed for a day: an export or build writes to its folder well within that, and sweeping a live
# writer's folder would break its build.
STALE_AFTER_S = 24 * 3600
_TEMP = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9-]*)-(?P<pid>\d+)\.[^.]*$")


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
    """Raised by a loader or the manifest check when an entry on disk cannot be used."""


@dataclass
class DiskCache:
    """Folders under `root/<kind>/<key>`; `events` records every hit, miss and rebuild in order."""

    root: Path
    events: list[CacheEvent] = field(default_factory=list)
    _swept: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self):
        self.root = Path(self.root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def fetch(self, kind: str, readable: str, spec: dict, build: Callable[[Path], None],
              load: Callable[[Path], T]) -> Cached[T]:
        """Load the entry for (readable, spec), building it with `build(folder)` when absent or unusable.

        A hit is served when its manifest is for `spec`, its files match the manifest and `load(folder)`
        succeeds; otherwise the entry is evicted and rebuilt.
        """
        if kind not in self._swept:
            self._swept.add(kind)
            sweep_temp_folders(self.root / kind)
        key = entry_key(readable, spec)
        target = self.path(kind, key)
        start = time.perf_counter()
        outcome = "miss"
        if target.exists():
            try:
                value = load(_checked(target, spec))
                return self._record(kind, key, "hit", start, Cached(value, target, True, 0.0))
            except Exception as exc:  # any failure to load means the entry is unusable: rebuild it
                self.evict(target, f"{type(exc).__name__}: {exc}")
                outcome = "rebuild"
        self._build_into(target, spec, build)
        value = load(_checked(target, spec))
        return self._record(kind, key, outcome, start, Cached(value, target, False, 0.0))

    def evict(self, entry: Path, reason: str) -> None:
        """Remove a bad entry, logging `reason`, so the next fetch rebuilds it.

        Callers whose own check fails on a hit (an ONNX graph failing validation, an engine that does not
        deserialize) evict the entry and fetch once more; a fresh entry that fails the same check is the
        builder's own result, reported as such, and not rebuilt again.
        """
        log.warning("cache entry %s is unusable (%s); rebuilding it", entry, reason)
        if entry.exists():
            _discard(entry)

    def _build_into(self, target: Path, spec: dict, build: Callable[[Path], None]) -> None:
        tmp = _temp_folder(target)
        try:
            build(tmp)
            _write_manifest(tmp, spec)
            os.chmod(tmp, _mode(0o777))  # mkdtemp's 0700 would lock the other users of a shared cache out
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


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])


def _temp_prefix(name: str) -> str:
    """`.<name>.tmp-<host>-<pid>.`: the sweep can tell whether the writer still runs."""
    return f".{name}.tmp-{_host()}-{os.getpid()}."


def _temp_folder(target: Path) -> Path:
    """A new temp folder beside `target`, its parents made as needed; a HarnessError where the cache cannot hold one."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name), dir=target.parent))
    except OSError as exc:  # --cache-dir (or a folder in it) is a file, read-only, or cannot be made
        raise HarnessError(f"cannot write the cache folder {target.parent} ({exc.strerror}); "
                           "pass --cache-dir a writable folder") from None


def sweep_temp_folders(folder: Path) -> list[Path]:
    """Delete the hidden temp folders in `folder` that killed writers left behind; returns what was swept."""
    if not folder.is_dir():
        return []
    swept = []
    for path in folder.iterdir():
        if path.name.startswith(".") and path.is_dir() and _abandoned(path):
            log.warning("removing %s, a temporary cache folder its writer left behind (killed mid-build)", path)
            shutil.rmtree(path, ignore_errors=True)
            swept.append(path)
    return swept


def _abandoned(path: Path) -> bool:
    match = _TEMP.search(path.name)
    if match and match["host"] == _host():
        return not _running(int(match["pid"]))
    try:
        newest = max(p.stat().st_mtime for p in (path, *path.rglob("*")))
    except FileNotFoundError:  # its writer renamed or removed it meanwhile: not ours to touch
        return False
    return time.time() - newest > STALE_AFTER_S


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _entry_files(folder: Path) -> list[str]:
    """The files of an entry, less its manifest, by path inside it."""
    names = (str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return sorted(name for name in names if name != MANIFEST)


def _write_manifest(folder: Path, spec: dict) -> None:
    """Record each file's size and sha256 next to the spec: written last, after every file is complete."""
    files = {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
             for name in _entry_files(folder)}
    doc = {"format": MANIFEST_FORMAT, "spec": spec, "files": files}
    (folder / MANIFEST).write_text(json.dumps(doc, indent=1, default=str))


def content_digest(folder: Path, skip: tuple[str, ...] = ()) -> str:
    """sha256 over the (file, sha256) pairs of an entry's manifest, less the files named in `skip`.

    It names what the entry's files hold without reading them again: a fetch has already checked them against
    the manifest, and a 40-layer graph is 28.6 GB.
    """
    files = json.loads((folder / MANIFEST).read_text())["files"]
    pairs = sorted((name, entry["sha256"]) for name, entry in files.items() if name not in skip)
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def _checked(folder: Path, spec: dict) -> Path:
    """Raise CorruptEntry unless the manifest is for `spec` and lists exactly the entry's files, each at its size
    and sha256.

    The key holds only 16 hex digits of the spec hash, so the spec is compared whole. Every file in the folder must
    be listed, else a loader could read one nothing checked. Sizes are compared first, so a truncated file is
    caught without reading any file.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptEntry(f"no readable {MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict):
        raise CorruptEntry(f"{MANIFEST} holds a {type(manifest).__name__}, not an object")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CorruptEntry(f"{MANIFEST} is format {manifest.get('format')!r}, not {MANIFEST_FORMAT} "
                           "(written by another harness version)")
    if manifest.get("spec") != json.loads(json.dumps(spec, default=str)):  # `spec` as the manifest stores it
        raise CorruptEntry(f"{MANIFEST} was written for another spec than its key's")
    files = manifest.get("files")
    if not (isinstance(files, dict) and all(isinstance(e, dict) and isinstance(e.get("size"), int)
                                            and isinstance(e.get("sha256"), str) for e in files.values())):
        raise CorruptEntry(f"{MANIFEST} has no valid file list (name -> size and sha256)")
    on_disk = _entry_files(folder)
    if sorted(files) != on_disk:
        unlisted, absent = sorted(set(on_disk) - set(files)), sorted(set(files) - set(on_disk))
        raise CorruptEntry(f"{MANIFEST} does not list the entry's files (unlisted: {', '.join(unlisted) or 'none'}; "
                           f"listed but absent: {', '.join(absent) or 'none'})")
    for name, expected in files.items():
        actual = (folder / name).stat().st_size
        if actual != expected["size"]:
            raise CorruptEntry(f"{name} is {actual} bytes, expected {expected['size']}")
    for name, expected in files.items():
        digest = file_sha256(folder / name)
        if digest != expected["sha256"]:
            raise CorruptEntry(f"{name} has sha256 {digest[:12]}..., expected {expected['sha256'][:12]}... "
                               "(same size: its bytes were changed in place)")
    return folder


# (device, inode) -> (size, mtime, ctime, sha256) of files this process hashed: a hit on a file hashed here
# (a 28.6 GB graph is fetched by several backends in one run, and was hashed when its entry was written)
# is not read again. Any write changes mtime and ctime (ctime cannot be set back), so a changed file is
# hashed afresh; renaming the entry folder into place changes neither.
_HASHED: dict[tuple[int, int], tuple[int, int, int, str]] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 8 MiB chunks into one buffer; logs the time of a hash over 1 GiB."""
    st = os.stat(path)
    known = _HASHED.get((st.st_dev, st.st_ino))
    if known and known[:3] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
        return known[3]
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    seconds = time.perf_counter() - start
    if st.st_size >= HASH_LOG_BYTES:
        log.info("sha256 of %s (%.1f GB) took %.1f s (%.2f GB/s)", path, st.st_size / 1e9, seconds,
                 st.st_size / 1e9 / max(seconds, 1e-9))
    _HASHED[(st.st_dev, st.st_ino)] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest.hexdigest())
    return digest.hexdigest()


def _discard(target: Path) -> None:
    """Move a bad entry aside first (atomic), then delete it, so no reader sees it half-deleted."""
    trash = _temp_folder(target)
    with contextlib.suppress(FileNotFoundError):  # another process found it bad too, and moved it first
        os.rename(target, trash / "entry")
    shutil.rmtree(trash, ignore_errors=True)


def _mode(bits: int) -> int:
    """What open() (0o666) or mkdir() (0o777) would give a new file or folder: `bits` less the umask (read
    without changing it for good)."""
    umask = os.umask(0)
    os.umask(umask)
    return bits & ~umask


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
            os.fchmod(f.fileno(), _mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text, written as atomic_write_bytes writes: a reader never sees half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))
