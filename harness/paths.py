"""The one rule for a folder a run will write into: proved writable when the options are checked, before any work."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from harness.errors import HarnessError


def writable_folder(folder: str | os.PathLike, what: str) -> Path:
    """`folder`, when it can be made (if missing) and written into; else HarnessError, its message starting with
    `what` (the option and its value) and saying what to do. Nothing is made: the folder comes when something is
    written, so a run that records nothing leaves nothing behind.

    Proved, not inferred: a probe folder is made and removed at once in the nearest folder that exists (the folder
    itself, or the one its missing parents would be made in). os.access alone says yes to root on a read-only mount
    or in /proc, where making the folder then fails.
    """
    path = Path(folder).expanduser()
    # os.path.exists, not Path.exists: a parent the user may not enter is "not there", not a PermissionError.
    existing = next(p for p in (path, *path.absolute().parents) if os.path.exists(p))
    if not existing.is_dir():
        raise HarnessError(f"{what}: {existing} is a file, not a folder; give another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=existing))
    except OSError as exc:
        raise HarnessError(f"{what}: cannot make a folder in {existing} ({exc.strerror}); give a folder you can "
                           "write to") from None
    return path
