"""One flat row schema for every table, and the run folder that collects rows as they arrive."""
from __future__ import annotations

import csv
import datetime as dt
import io
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from harness.cache import atomic_write_bytes
from harness.errors import HarnessError
from harness.memory import CASE_PEAKS, GPU_PEAK, GPU_RESERVED_PEAK, HOST_PEAK

if TYPE_CHECKING:
    from harness.case import Case
    from harness.regression import Rules

TABLES = ("export", "parity", "quality", "perf")
PARTS = "parts"  # xdist workers write parts/<worker>/<table>.csv; the controller merges them
RUN_ID_ENV = "WAN_BENCH_RUN_ID"  # optional: a run id chosen by the caller (`bench`, CI naming its run folder)


@dataclass(frozen=True)
class Row:
    """case, component, backend, precision, shape, tokens, metric, value, threshold, passed, device, versions, note."""

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
                versions: str) -> list[Row]:
    """One Row per metric of `result`, each with the threshold, the verdict and the note the result itself carries."""
    thresholds, checks = result.thresholds(), result.checks()
    notes = result.notes() if hasattr(result, "notes") else {}
    return [Row(case=case.id, component=case.component, backend=backend, precision=precision or case.precision,
                shape=case.shape.id, tokens=case.shape.tokens, metric=metric,
                value=None if value is None else float(value), threshold=thresholds.get(metric),
                passed=checks.get(metric), device=device, versions=versions, note=notes.get(metric, ""))
            for metric, value in result.metrics().items()]


def new_run_id(now: dt.datetime | None = None) -> str:
    """`run-YYYYmmdd-HHMMSS` in UTC: sorts by time and matches the git-ignore pattern."""
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("run-%Y%m%d-%H%M%S")


def atomic_write_text(path: Path, text: str) -> None:
    """Write next to the target, then rename: a reader never sees half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


class RunRecorder:
    """The run folder `results/<run-id>/`: one CSV per table, appended row by row, then summary and plots.

    Rows hit the disk as they arrive so a crash keeps everything measured so far. The folder is made
    on the first row, so a run that records nothing (unit tests only) leaves no empty folder. An xdist
    worker (`part="gw0"`) writes `parts/gw0/<table>.csv`; the controller's `finish()` merges the parts.
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

    def attach(self, name: str, text: str) -> Path:
        """A text file beside the tables (e.g. a kernel breakdown), written atomically now."""
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / name
        atomic_write_text(path, text)
        return path

    def tables(self) -> dict[str, list[Row]]:
        """Every row of the run so far, by table, with workers' parts merged in first."""
        if not self._dir.is_dir():
            return {}
        if self.part is None:
            merge_parts(self.path)
        return load_tables(self._dir)

    def markdown(self) -> str:
        """The tables as Markdown, for the terminal summary and summary.md."""
        return tables_markdown(self.tables())

    def finish(self) -> Path | None:
        """Write summary.md and the PNG plots (atomically); returns summary.md's path.

        None when there is nothing to summarise: no rows, or this is a worker (its controller merges).
        """
        if self.part is not None or not self.path.is_dir():
            return None
        tables = self.tables()
        plots = write_plots(tables, self.path)
        text = summary_header(self.run_id, self.command, self.settings, git_commit())
        text += "\n" + (self.markdown() or "No rows were recorded.\n")
        text += "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
        summary = self.path / "summary.md"
        atomic_write_text(summary, text)
        return summary


def _csv_fields(row: Row) -> dict:
    """Empty cells for None keep the CSV readable by pandas and by `load_run`."""
    return {k: ("" if v is None else v) for k, v in row.as_dict().items()}


def _parse_float(text: str) -> float | None:
    return float(text) if text else None


def _parse_bool(text: str) -> bool | None:
    return {"True": True, "False": False, "": None}[text]


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
        row = Row(case=record["case"], component=record["component"], backend=record["backend"],
                  precision=record["precision"], shape=record["shape"], tokens=int(record["tokens"]),
                  metric=record["metric"], value=_parse_float(record["value"]),
                  threshold=_parse_float(record["threshold"]),
                  passed=_parse_bool(record["passed"]), device=record["device"], versions=record["versions"],
                  note=record.get("note", ""))
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
        if columns not in (Row.columns(), Row.columns()[:-1]):  # tables written before the note column still load
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
    """The tables of a finished run folder, for the commands that read one: at least one must be there."""
    tables = load_tables(path)
    if not tables:
        raise HarnessError(f"no result tables in {path} (is it a run folder?); pass results/<run-id>, a folder "
                           f"holding {' / '.join(f'{t}.csv' for t in TABLES)}")
    return tables


def load_run(path: Path) -> list[Row]:
    """All rows of a finished run folder (run_tables), typed (ints, floats, None for empty cells)."""
    return [row for rows in run_tables(path).values() for row in rows]


def merge_parts(run_path: Path) -> list[Path]:
    """Fold each xdist worker's part CSVs into the run's tables (sorted by worker), then drop the parts."""
    parts = Path(run_path) / PARTS
    if not parts.is_dir():
        return []
    workers = sorted((p for p in parts.iterdir() if p.is_dir()), key=_worker_order)
    merged = []
    for table in TABLES:
        sources = [w / f"{table}.csv" for w in workers if (w / f"{table}.csv").is_file()]
        if sources:
            merged.append(_merge_table(Path(run_path) / f"{table}.csv", sources))
    shutil.rmtree(parts)
    return merged


def _worker_order(path: Path) -> tuple[int, int, str]:
    """gw2 before gw10: numeric order of xdist worker ids, other names after them."""
    m = re.fullmatch(r"gw(\d+)", path.name)
    return (0, int(m.group(1)), "") if m else (1, 0, path.name)


def _merge_table(target: Path, sources: list[Path]) -> Path:
    rows = _read_csv(target) if target.is_file() else []
    for source in sources:
        rows.extend(_read_csv(source))
    lines = _CsvText()
    writer = csv.DictWriter(lines, fieldnames=Row.columns())
    writer.writeheader()
    writer.writerows(_csv_fields(r) for r in rows)
    atomic_write_text(target, "".join(lines))
    return target


class _CsvText(list):
    """A list that csv.writer can write into, so a merged table is written in one atomic step."""

    def write(self, text: str) -> None:
        self.append(text)


COMMIT_ENV = "WAN_BENCH_COMMIT"  # the commit, where the checkout's own git metadata is absent or stale


def git_commit() -> str:
    """The commit that produced the numbers, with `-dirty` when the tree had changes."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not found)"


# --- summary.md: tables pivoted per (case, backend) so a reviewer reads one line per measurement ---

STEP_METRIC = re.compile(r"(?P<metric>.+)@step=(?P<step>\d+)")
KEYS = ["case", "backend", "precision", "shape"]
CPU_NOTE = ("CPU timings are informational, never gated: on a shared CPU machine one case's median moved "
            "by 10x between runs, and the speed-up gate judges CUDA timings only.")
MEMORY_NOTE = (f"Memory, in GiB: {HOST_PEAK} is this process's peak resident memory from the case's start to its "
               f"row; {GPU_PEAK} and {GPU_RESERVED_PEAK} are CUDA's peak allocated and reserved memory over the same "
               "span (CUDA runs only); peak_mem_gib is CUDA's peak over the timed rounds alone.")


def tables_markdown(tables: dict[str, list[Row]]) -> str:
    """One Markdown table per results table; per-step metrics get their own table."""
    from tabulate import tabulate

    sections = []
    for table, rows in tables.items():
        plain = [r for r in rows if not STEP_METRIC.fullmatch(r.metric)]
        steps = [r for r in rows if STEP_METRIC.fullmatch(r.metric)]
        note = f"{CPU_NOTE}\n\n" if table == "perf" and on_cpu(rows) else ""
        if plain:
            sections.append(f"## {table}\n\n{note}{tabulate(_pivot(plain), 'keys', tablefmt='github', showindex=False)}\n"
                            + _notes_markdown(plain))
        if steps:
            sections.append(f"## {table}: error by denoising step\n\n"
                            f"{tabulate(_step_pivot(steps), 'keys', tablefmt='github', showindex=False)}\n")
    if any(r.metric in CASE_PEAKS for rows in tables.values() for r in rows):
        sections.append(MEMORY_NOTE + "\n")
    return "\n".join(sections)


def _notes_markdown(rows: list[Row]) -> str:
    """The rows' notes under their table, each once with the metrics that carry it (a skip reason, VMAF's model)."""
    metrics: dict[str, list[str]] = {}
    for r in rows:
        if r.note and r.metric not in metrics.setdefault(r.note, []):
            metrics[r.note].append(r.metric)
    return "".join(f"\n- {', '.join(names)}: {note}" for note, names in metrics.items()) + ("\n" if metrics else "")


def on_cpu(rows: list[Row]) -> bool:
    """Whether any of these rows was measured on a CPU (whose timings are not gated)."""
    return any(r.device.startswith("cpu") for r in rows)


def _cell(row: Row) -> str:
    text = "n/a" if row.value is None else f"{row.value:.4g}"
    if row.threshold is not None:
        text += f" (thr {row.threshold:.3g})"
    return text + (" FAIL" if row.passed is False else "")


def _pivot(rows: list[Row]):
    """case | backend | precision | shape | <metric>... | verdict, in the order rows arrived."""
    import pandas as pd

    frame = pd.DataFrame([{**r.as_dict(), "cell": _cell(r)} for r in rows])
    cells = frame.pivot_table(index=KEYS, columns="metric", values="cell", aggfunc="last", sort=False)
    verdicts = frame.groupby(KEYS, sort=False)[["metric", "passed"]].apply(_verdict).rename("verdict")
    return cells.join(verdicts).fillna("").reset_index().rename_axis(columns=None)


def _verdict(group) -> str:
    failed = group.loc[group["passed"].eq(False), "metric"].tolist()
    if failed:
        return "FAIL: " + ", ".join(failed)
    return "pass" if group["passed"].eq(True).any() else ""


def _step_pivot(rows: list[Row]):
    """case | backend | metric | step 1 | step 2 | ...: how an error grows through the loop."""
    import pandas as pd

    frame = pd.DataFrame([{"case": r.case, "backend": r.backend, **STEP_METRIC.fullmatch(r.metric).groupdict(),
                           "cell": "" if r.value is None else f"{r.value:.4g}"} for r in rows])
    frame["step"] = frame["step"].astype(int)
    table = frame.pivot_table(index=["case", "backend", "metric"], columns="step", values="cell", aggfunc="last",
                              sort=False)
    table = table[sorted(table.columns)].rename(columns=lambda step: f"step {step}")
    return table.fillna("").reset_index().rename_axis(columns=None)


def short_summary(run: Path) -> str:
    """Speed-ups with the gate verdict each row carries, then the candidates' parity and quality verdicts."""
    from tabulate import tabulate

    from harness.regression import load_rules

    rules = load_rules()
    rows = load_run(run)
    median, speed = {}, []
    for r in rows:  # in recorded order: a speed-up follows the eager and candidate times it divides
        if r.metric == "median_ms":
            median[(r.case, r.backend)] = r.value
        elif r.metric == "speedup":
            speed.append([r.case, r.backend, _number(median.get((r.case, "torch"))),
                          _number(median.get((r.case, r.backend))),
                          "n/a" if r.value is None else f"{r.value:.3f}x",
                          "" if r.threshold is None else f">= {r.threshold:g}x",
                          {True: "pass", False: "FAIL", None: "not gated"}[_row_verdict(r, rules)]])
    checks = [[r.case, r.backend, r.metric, f"{r.value:.4g}" if r.value is not None else "n/a",
               "" if r.threshold is None else f"{r.threshold:.3g}",
               "skipped" if _skipped(r) else {True: "pass", False: "FAIL"}[_row_verdict(r, rules)]]
              for r in rows if r.backend != "torch" and (r.passed is not None or _skipped(r))]
    note = CPU_NOTE + "\n\n" if on_cpu([r for r in rows if r.metric == "speedup"]) else ""
    return (note + tabulate(speed, ["case", "candidate", "eager ms", "candidate ms", "speed-up", "gate", "verdict"],
                            tablefmt="github") + "\n\n"
            + tabulate(checks, ["case", "backend", "metric", "value", "threshold", "verdict"], tablefmt="github")
            + _memory_table(rows) + "\n"
            + _notes_markdown([r for r in rows if r.backend != "torch" and _skipped(r)]))


def _skipped(row: Row) -> bool:
    """A metric that was not measured, with the reason in its note (VMAF on frames too small to score)."""
    return row.value is None and row.passed is None and bool(row.note)


def _memory_table(rows: list[Row]) -> str:
    """Each case and backend's peak memory (the last recorded: the case's peak up to its last row), with the
    columns the run measured: no GPU columns where it ran on the CPU."""
    from tabulate import tabulate

    peaks: dict[tuple[str, str], dict[str, float | None]] = {}
    for r in rows:
        if r.metric in CASE_PEAKS:
            peaks.setdefault((r.case, r.backend), {})[r.metric] = r.value
    if not peaks:
        return ""
    metrics = [m for m in CASE_PEAKS if any(m in p for p in peaks.values())]
    body = [[case, backend, *(_number(values.get(m)) for m in metrics)] for (case, backend), values in peaks.items()]
    return "\n\n" + MEMORY_NOTE + "\n\n" + tabulate(body, ["case", "backend", *metrics], tablefmt="github")


def _row_verdict(row: Row, rules: "Rules") -> bool | None:
    """The row's own verdict (None: not judged), unless its numbers contradict a pass: a NaN or Inf value or
    threshold (no judge sets an infinite bound), or a value off the passing side of its threshold. A blank value is
    "not measured" and leaves a verdict that rests on other checks (an export whose ORT parity was skipped), but
    not one that rests on the value alone (a speed-up, a parity error)."""
    numbers = [n for n in (row.value, row.threshold) if n is not None]
    if row.passed and (not all(math.isfinite(n) for n in numbers) or _meets(row, rules) is False):
        return False
    return row.passed


def _meets(row: Row, rules: "Rules") -> bool | None:
    """Whether the value is on the passing side of its threshold, by the rule that judged it where this module
    can know it: the speed-up gate's, or the direction of the metric's regression rule. None: no threshold, or no
    rule known here (loop_rel_l2, export metrics)."""
    from harness.timing import meets_gate

    rule = rules.for_metric(row.metric)
    if row.threshold is None or (row.metric != "speedup" and rule is None):
        return None
    if row.value is None:
        return False
    return meets_gate(row.value, row.threshold) if row.metric == "speedup" else rule.meets(row.value, row.threshold)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def summary_header(run_id: str, command: str, settings: dict, commit: str) -> str:
    """Who made these numbers: command, commit, date, settings, machine and versions."""
    from harness.machine import machine_info

    lines = [f"# {run_id}", "", f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC",
             f"- command: `{command}`", f"- git commit: {commit}"]
    lines += [f"- {k}: {_plain(v)}" for k, v in settings.items()]
    lines += ["", "## machine", "", "| key | value |", "|---|---|"]
    parallel = settings.get("parallel", "none") != "none"
    lines += [f"| {k} | {'not installed' if v is None else v} |" for k, v in machine_info(parallel).items()]
    return "\n".join(lines) + "\n"


def _plain(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    return str(getattr(value, "id", value))


# --- plots: PNG files next to summary.md, written atomically ---

def write_plots(tables: dict[str, list[Row]], folder: Path) -> list[Path]:
    """speedup.png (per backend and shape, with the gate) and error_vs_step.png, where rows exist."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI runners
    written = []
    perf = tables.get("perf", [])
    speedups = [r for r in perf if r.metric == "speedup" and r.value is not None]
    if speedups:
        quartiles = {(r.case, r.backend, r.metric): r.value for r in perf if r.metric in ("speedup_q1", "speedup_q3")}
        written.append(_save(_speedup_figure(speedups, quartiles), Path(folder) / "speedup.png"))
    steps = [r for r in tables.get("parity", []) if STEP_METRIC.fullmatch(r.metric) and r.value is not None]
    if steps:
        written.append(_save(_step_figure(steps), Path(folder) / "error_vs_step.png"))
    return written


def _speedup_figure(rows: list[Row], quartiles: dict[tuple[str, str, str], float]):
    """Bars of the speed-up of medians, with error bars from the quartiles of the per-round ratios."""
    import matplotlib.pyplot as plt

    def label(r: Row) -> str:
        return f"{r.component}\n{r.shape}\n{r.precision}"

    labels = list(dict.fromkeys(label(r) for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(labels)), 4))
    for i, backend in enumerate(backends):
        mine = {label(r): r for r in rows if r.backend == backend}
        xs = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(labels))]
        bars = [(mine[lbl].value, *_error_bar(mine[lbl], quartiles)) if lbl in mine else (math.nan, 0.0, 0.0)
                for lbl in labels]
        values, below, above = zip(*bars)
        ax.bar(xs, values, width, yerr=[below, above], capsize=3, label=backend)
    for gate in sorted({r.threshold for r in rows if r.threshold is not None}):
        ax.axhline(gate, color="red", linestyle="--", label=f"gate {gate:g}x")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("speed-up over torch eager (x)")
    title = "speed-up per backend and shape\n(error bars: quartiles of the per-round ratios)"
    if on_cpu(rows):
        title = "CPU timings: informational, not gated\n" + title
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _error_bar(row: Row, quartiles: dict[tuple[str, str, str], float]) -> tuple[float, float]:
    """How far below and above the bar the per-round ratios' quartiles reach (none recorded: no bar).

    The ratio of medians need not lie between the ratios' quartiles, so each extent is clipped at zero.
    """
    q1 = quartiles.get((row.case, row.backend, "speedup_q1"), row.value)
    q3 = quartiles.get((row.case, row.backend, "speedup_q3"), row.value)
    return max(0.0, row.value - q1), max(0.0, q3 - row.value)


def _step_figure(rows: list[Row]):
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        m = STEP_METRIC.fullmatch(r.metric)
        series.setdefault(f"{r.case} {r.backend} {m['metric']}", []).append((int(m["step"]), r.value))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if all(r.value > 0 for r in rows):
        ax.set_yscale("log")  # errors grow by orders of magnitude through a loop
    ax.set_xlabel("denoising step")
    ax.set_ylabel("error vs fp32 eager reference")
    ax.set_title("error vs step count")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
