"""One flat row schema for every table, the run folder that collects rows as they arrive, and the one reader of a
finished run folder (for `summary`, `compare` and `baseline save`), which refuses a table that contradicts itself."""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import re
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from harness.cache import atomic_write_bytes, atomic_write_text
from harness.errors import HarnessError
from harness.memory import CASE_PEAKS

if TYPE_CHECKING:
    from harness.case import Case

TABLES = ("export", "parity", "quality", "perf")
PARTS = "parts"  # xdist workers write parts/<worker>/<table>.csv; the controller merges them
RUN_ID_ENV = "WAN_BENCH_RUN_ID"  # optional: a run id chosen by the caller (`bench`, CI naming its run folder)
SESSION_FILE = "session.json"  # how the pytest session that wrote the run folder ended (SessionEnd)


@dataclass(frozen=True)
class Row:
    """One number: what it measures, of which case and backend, against which threshold, with which verdict, where."""

    case: str
    component: str
    backend: str
    precision: str
    shape: str
    tokens: int
    metric: str
    value: float | None  # None: not measured (e.g. a metric the backend cannot report)
    threshold: float | None
    passed: bool | None
    device: str
    versions: str
    note: str = ""  # what the number alone does not say: what measured it (VMAF's model) or why it is blank (a skip)
    # The test that measured it (pytest's node id). The rows of one measurement share it, so a reader finds the timings
    # a speed-up divides by key: eager torch is re-timed beside each candidate, under the same case id.
    test: str = ""

    @property
    def key(self) -> str:
        """case|backend|metric: what the row measures, as a baseline names it."""
        return f"{self.case}|{self.backend}|{self.metric}"

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def as_dict(self) -> dict:
        return asdict(self)


class Result(Protocol):
    """What every verdict-carrying object (parity, quality, timing, speed-up, export) gives a results table;
    one may also give notes() -> {metric: note} (a quality result does, for VMAF)."""

    def metrics(self) -> dict[str, float | None]: ...

    def thresholds(self) -> dict[str, float | None]: ...

    def checks(self) -> dict[str, bool | None]: ...


@dataclass(frozen=True)
class Measured:
    """Plain numbers for a table, with thresholds and verdicts where they have them (e.g. a ratio, build stats)."""

    values: dict
    bounds: dict = None
    verdicts: dict = None

    def metrics(self) -> dict[str, float | None]:
        return dict(self.values)

    def thresholds(self) -> dict[str, float | None]:
        return dict(self.bounds or {})

    def checks(self) -> dict[str, bool | None]:
        return dict(self.verdicts or {})


def result_rows(case: "Case", backend: str, result: Result, *, precision: str | None = None, device: str,
                versions: str, test: str = "") -> list[Row]:
    """One Row per metric of `result`, each with the threshold, the verdict and the note the result itself carries."""
    thresholds, checks = result.thresholds(), result.checks()
    notes = result.notes() if hasattr(result, "notes") else {}
    return [Row(case=case.id, component=case.component, backend=backend, precision=precision or case.precision,
                shape=case.shape.id, tokens=case.shape.tokens, metric=metric,
                value=None if value is None else float(value), threshold=thresholds.get(metric),
                passed=checks.get(metric), device=device, versions=versions, note=notes.get(metric, ""), test=test)
            for metric, value in result.metrics().items()]


def new_run_id(now: dt.datetime | None = None) -> str:
    """`run-YYYYmmdd-HHMMSS` in UTC: sorts by time and matches the git-ignore pattern."""
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("run-%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class SessionEnd:
    """How the pytest session that wrote a run folder ended: pytest's exit status, the cases it selected and how many
    of them ran to their end. A folder's tables alone cannot tell a whole run from one cut short."""

    exit_status: int
    selected: int
    ran: int

    @property
    def complete(self) -> bool:
        """Every selected case ran, whether it passed or not; Ctrl-C, a crash or -x stop a session short of that."""
        return self.ran >= self.selected


class CaseCount:
    """A pytest plugin object counting the cases that ran to their end, for SessionEnd; under pytest-xdist the
    controller hears each worker's cases through the same hook."""

    def __init__(self):
        self.ran = 0

    def pytest_runtest_logfinish(self, nodeid: str, location) -> None:
        self.ran += 1


class RunRecorder:
    """The run folder `results/<run-id>/`: one CSV per table, appended row by row (harness/report.py then writes
    the summary and plots beside them).

    Rows hit the disk as they arrive so a crash keeps everything measured so far. The folder is made
    on the first row, so a run that records nothing (unit tests only) leaves no empty folder. An xdist
    worker (`part="gw0"`) writes `parts/gw0/<table>.csv`; the controller's `tables()` merges the parts.
    """

    def __init__(self, results_dir: Path, run_id: str | None = None, command: str = "",
                 settings: dict | None = None, part: str | None = None):
        self.run_id = run_id or new_run_id()
        self.path = Path(results_dir) / self.run_id
        self.command = command or shlex.join(sys.argv)
        self.settings = settings or {}
        self.part = part
        self._dir = self.path / PARTS / part if part else self.path

    def add(self, table: str, row: Row) -> None:
        """Append one row to its table's CSV now (header first when the file is new)."""
        if table not in TABLES:
            raise HarnessError(f"unknown results table {table!r}; use one of {', '.join(TABLES)}")
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / f"{table}.csv"
        new = not path.exists() or path.stat().st_size == 0
        with path.open("a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=Row.columns())
            if new:
                writer.writeheader()
            writer.writerow(_csv_fields(row))
            f.flush()

    def attach(self, name: str, content: str | bytes) -> Path:
        """A file beside the tables (a kernel breakdown, a contact sheet), written atomically now; in the run folder
        itself even from an xdist worker, so summary.md finds it (its name is the case's: no worker shares it)."""
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / name
        atomic_write_bytes(path, content.encode("utf-8") if isinstance(content, str) else content)
        return path

    def finish(self, end: SessionEnd) -> None:
        """Record how the session ended, atomically, in a folder that holds rows (a worker's part records nothing:
        its controller counts every case)."""
        if self.part is None and self.path.is_dir():
            atomic_write_text(self.path / SESSION_FILE, json.dumps(asdict(end)) + "\n")

    def tables(self) -> dict[str, list[Row]]:
        """Every row of the run so far, by table, with workers' parts merged in first."""
        if not self._dir.is_dir():
            return {}
        if self.part is None:
            merge_parts(self.path)
        return load_tables(self._dir)


def _csv_fields(row: Row) -> dict:
    """Empty cells for None keep the CSV readable by pandas and by `load_run`."""
    return {k: ("" if v is None else v) for k, v in row.as_dict().items()}


def impossible(metric: str, value: float | None) -> str:
    """Why no measurement gives `metric` this value ('' when one can): a time (`*_ms`) is > 0, a spread
    (`*iqr_ms`) >= 0. NaN and inf stay possible: a broken case records them, and no gate passes them."""
    if value is None or math.isnan(value) or not metric.endswith("_ms"):
        return ""
    if metric.endswith("iqr_ms"):
        return "" if value >= 0 else f"{metric} {value:g} (a spread is >= 0)"
    return "" if value > 0 else f"{metric} {value:g} (a time is > 0)"


def _damaged(where: str, problem: str) -> HarnessError:
    return HarnessError(f"{where}: {problem}; rerun the cases to rebuild the table")


def _parse_row(record: dict, where: str) -> Row:
    try:
        # The header is checked, so the record's names are Row's; an older table lacks the last (defaulted) ones.
        numbers = {name: float(record[name]) if record[name] else None for name in ("value", "threshold")}
        passed = {"True": True, "False": False, "": None}[record["passed"]]
        row = Row(**{**record, **numbers, "tokens": int(record["tokens"]), "passed": passed})
    except (KeyError, ValueError) as exc:
        raise _damaged(where, f"unreadable row ({type(exc).__name__}: {exc})") from None
    problem = impossible(row.metric, row.value)
    if problem:
        raise _damaged(where, f"holds {problem}")
    return row


def _read_csv(path: Path) -> list[Row]:
    """The rows of one table file, as RunRecorder writes it: the header, then one terminated line per row.

    Read whole (tables are small) so that a file cut short in its last row is caught by its missing line end.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise HarnessError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise _damaged(str(path), f"not UTF-8 text (byte {exc.start})") from None
    if not text:
        raise _damaged(str(path), "the file is empty")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    try:
        columns = next(reader)
        if columns not in (Row.columns(), Row.columns()[:-1], Row.columns()[:-2]):  # before the test, the note column
            raise _damaged(str(path), f"the first line is not the header {','.join(Row.columns())}")
        for record in filter(None, reader):  # blank lines are skipped, as csv.DictReader did
            where = f"{path}:{reader.line_num}"
            if len(record) != len(columns):
                raise _damaged(where, f"{len(record)} fields where the header has {len(columns)}")
            rows.append(_parse_row(dict(zip(columns, record)), where))
    except csv.Error as exc:
        raise _damaged(f"{path}:{reader.line_num}", str(exc)) from None
    if not text.endswith("\n"):
        raise _damaged(f"{path}:{reader.line_num}", "the file ends inside this line, cut short while written")
    if not rows:  # RunRecorder writes the header with the first row, so a table never holds none
        raise _damaged(str(path), "a header and no rows")
    return rows


def load_tables(path: Path) -> dict[str, list[Row]]:
    """Rows of a run folder by table; a table with no CSV is absent."""
    path = Path(path)
    if not path.is_dir():
        raise HarnessError(f"{path} is not a run folder; pass results/<run-id> as written by pytest")
    return {t: _read_csv(path / f"{t}.csv") for t in TABLES if (path / f"{t}.csv").exists()}


def run_tables(path: Path) -> dict[str, list[Row]]:
    """The tables of a finished run folder, for every command that reads one (`summary`, `compare`, `baseline save`):
    at least one must be there, and none may contradict itself."""
    tables = load_tables(path)
    if not tables:
        raise HarnessError(f"no result tables in {path} (is it a run folder?); pass results/<run-id>, a folder "
                           f"holding {' / '.join(f'{t}.csv' for t in TABLES)}")
    for table, rows in tables.items():
        problem = contradiction(rows) or speedup_contradiction(rows)
        if problem:
            raise HarnessError(f"{Path(path) / f'{table}.csv'} {problem}; it was edited by hand or appended to by "
                               "another run: rerun the cases into a new run folder")
    return tables


def session_end(path: Path) -> SessionEnd | None:
    """How the session that wrote a run folder ended; None where it recorded nothing: it crashed or was killed, is
    still running, or ran before run folders recorded their end."""
    file = Path(path) / SESSION_FILE
    if not file.exists():
        return None
    try:
        end = SessionEnd(**json.loads(file.read_text(encoding="utf-8")))
        counts = (end.exit_status, end.selected, end.ran)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
            raise ValueError(f"exit_status, selected and ran must be whole numbers >= 0, not {counts}")
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:  # json's JSONDecodeError is a ValueError
        raise HarnessError(f"{file}: unreadable session record ({type(exc).__name__}: {exc}); it was edited by hand: "
                           "rerun the cases into a new run folder") from None
    return end


def contradiction(rows: list[Row]) -> str:
    """How a table contradicts itself ('' when it does not): a row marked passed whose numbers no judge passes (a NaN
    or Inf value or threshold, or a threshold with no value to meet it), or one key twice in one test, which a reader
    could take for either verdict. The case's peak memory repeats by design: every record of a case carries it."""
    seen = set()
    for r in rows:
        numbers = [n for n in (r.value, r.threshold) if n is not None]
        if r.passed and (not all(map(math.isfinite, numbers)) or (r.value is None and r.threshold is not None)):
            return (f"marks {r.key} passed with value {'blank' if r.value is None else r.value} and threshold "
                    f"{r.threshold}, which no judge passes")
        if (r.key, r.test) in seen and r.metric not in CASE_PEAKS:
            return (f"holds {r.key} more than once{f' in {r.test}' if r.test else ''}; a table has one row per "
                    "case, backend and metric of a test")
        seen.add((r.key, r.test))
    return ""


# A speed-up divides a baseline median by the candidate's median_ms, both recorded by its own test: eager torch's
# median_ms under the same case (cases/test_perf.py), or the one its parallel case records under its own backend.
SPEEDUP_BASELINES = {"speedup": "eager_median_ms", "speedup_vs_one_gpu": "one_gpu_median_ms"}


def speedup_medians(rows: list[Row]) -> list[tuple[Row, float | None, float | None]]:
    """Each speed-up row of a perf table with the baseline and candidate medians it divides (None: not recorded)."""
    values = {(r.case, r.backend, r.test, r.metric): r.value for r in rows}

    def baseline(r: Row) -> float | None:
        own = (r.case, r.backend, r.test, SPEEDUP_BASELINES[r.metric])
        if own in values or r.metric != "speedup":
            return values.get(own)
        return values.get((r.case, "torch", r.test, "median_ms"))

    return [(r, baseline(r), values.get((r.case, r.backend, r.test, "median_ms")))
            for r in rows if r.metric in SPEEDUP_BASELINES]


def speedup_contradiction(rows: list[Row]) -> str:
    """How a table's speed-ups contradict the medians beside them ('' when none does): a speed-up with no medians to
    divide, or one that is not their ratio beyond float rounding (a median edited, a speed-up carried over). A blank
    speed-up claims nothing."""
    for r, base, cand in speedup_medians(rows):
        if r.value is None:
            continue
        if base is None or cand is None:
            return f"holds {r.key} with no medians beside it to divide, where every perf case records both"
        ratio = base / cand if cand > 0 else math.nan  # as the judge divides: no time is <= 0, a NaN gives NaN
        if not (math.isclose(r.value, ratio, rel_tol=1e-9) or (math.isnan(r.value) and math.isnan(ratio))):
            return (f"gives {r.case} {r.backend} a {r.metric} of {r.value:.4g}x where the medians beside it "
                    f"({base:.4g} -> {cand:.4g} ms) give {ratio:.4g}x")
    return ""


def load_run(path: Path) -> list[Row]:
    """All rows of a finished run folder (run_tables, so checked), typed (ints, floats, None for empty cells)."""
    return [row for rows in run_tables(path).values() for row in rows]


def merge_parts(run_path: Path) -> None:
    """Fold each xdist worker's part CSVs into the run's tables (sorted by worker), then drop the parts."""
    parts = Path(run_path) / PARTS
    if not parts.is_dir():
        return
    workers = sorted((p for p in parts.iterdir() if p.is_dir()), key=_worker_order)
    for table in TABLES:
        sources = [w / f"{table}.csv" for w in workers if (w / f"{table}.csv").is_file()]
        if sources:
            _merge_table(Path(run_path) / f"{table}.csv", sources)
    shutil.rmtree(parts)


def _worker_order(path: Path) -> tuple[int, int, str]:
    """gw2 before gw10: numeric order of xdist worker ids, other names after them."""
    m = re.fullmatch(r"gw(\d+)", path.name)
    return (0, int(m.group(1)), "") if m else (1, 0, path.name)


def _merge_table(target: Path, sources: list[Path]) -> None:
    rows = _read_csv(target) if target.is_file() else []
    for source in sources:
        rows.extend(_read_csv(source))
    text = io.StringIO()  # the whole table first, so that it is written in one atomic step
    writer = csv.DictWriter(text, fieldnames=Row.columns())
    writer.writeheader()
    writer.writerows(_csv_fields(r) for r in rows)
    atomic_write_text(target, text.getvalue())
