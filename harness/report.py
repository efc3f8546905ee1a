"""What a run folder says to a reader: summary.md, the short summary of `python -m harness summary`, the memory
table, the notes of skipped metrics and the plots.

It sits above the store (harness/results.py) and prints the verdicts the rows already carry: each was computed once,
by its judge (harness/compare.py, harness/timing.py), and nothing here judges again. A row finds the others of its
measurement by key (case, backend, metric and the test that measured it), never by where it stands in its table.
"""
from __future__ import annotations

import datetime as dt
import io
import math
import os
import re
import subprocess
from pathlib import Path

from harness.cache import atomic_write_bytes, atomic_write_text
from harness.memory import CASE_PEAKS, GPU_PEAK, GPU_RESERVED_PEAK, HOST_PEAK
from harness.results import (SESSION_FILE, Row, RunRecorder, SessionEnd, run_tables, session_end,
                             speedup_medians)

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


def write_summary(recorder: RunRecorder) -> Path | None:
    """Write summary.md and the PNG plots of a run (atomically); returns summary.md's path.

    None when there is nothing to summarise: no rows, or `recorder` is a worker's (its controller merges).
    """
    if recorder.part is not None or not recorder.path.is_dir():
        return None
    tables = recorder.tables()
    plots = write_plots(tables, recorder.path)
    text = summary_header(recorder.run_id, recorder.command, recorder.settings, git_commit())
    text += "\n" + completion_note(session_end(recorder.path))
    text += (tables_markdown(tables) or "No rows were recorded.\n")
    plan = recorder.path / "plan.md"
    if plan.is_file():  # written by the session as it finished (harness.session.Session.finish)
        text += ("\n## the plan: estimated beside actual\n\nThe run's plan (harness/plan.py), with each family's actual "
                 "time beside its estimate; `steps.csv` lists the plan's steps beside the ones that ran.\n\n"
                 + plan.read_text(encoding="utf-8"))
    text += "".join(f"\n![{p.stem}]({p.name})\n" for p in plots)
    sheets = sorted(recorder.path.glob("contact-*.png"))
    if sheets:
        text += ("\n## contact sheets\n\nFirst, middle and last frames of the fp32, eager and candidate videos, and "
                 "how far eager's and the candidate's are from fp32's, pixel by pixel.\n"
                 + "".join(f"\n![{p.stem}]({p.name})\n" for p in sheets))
    summary = recorder.path / "summary.md"
    atomic_write_text(summary, text)
    return summary


def completion_note(end: SessionEnd | None) -> str:
    """What a reader must know before the tables when they hold part of a run ('' for a whole one)."""
    if end is None:
        return (f"**Not known to be whole**: no {SESSION_FILE} records that its pytest session finished (it crashed or "
                "was killed, is still running, or ran before run folders recorded it).\n\n")
    if end.complete:
        return ""
    return (f"**Interrupted after {end.ran} of {end.selected} cases** (pytest exit status {end.exit_status}): the "
            "tables hold only the cases that ran.\n\n")


def tables_markdown(tables: dict[str, list[Row]]) -> str:
    """One Markdown table per results table; per-step metrics get their own table."""
    from tabulate import tabulate

    sections = []
    for table, rows in tables.items():
        plain = [r for r in rows if not STEP_METRIC.fullmatch(r.metric)]
        steps = [r for r in rows if STEP_METRIC.fullmatch(r.metric)]
        note = f"{CPU_NOTE}\n\n" if table == "perf" and on_cpu(rows) else ""
        if table == "quality":
            sections.append(_quality_markdown(plain))
        elif plain:
            sections.append(f"## {table}\n\n{note}{tabulate(_pivot(plain), 'keys', tablefmt='github', showindex=False)}\n"
                            + _notes_markdown(plain))
        if steps:
            sections.append(f"## {table}: error by denoising step\n\n"
                            f"{tabulate(_step_pivot(steps), 'keys', tablefmt='github', showindex=False)}\n")
    if any(r.metric in CASE_PEAKS for rows in tables.values() for r in rows):
        sections.append(MEMORY_NOTE + "\n")
    return "\n".join(sections)


# The quality kinds, as harness/quality.py names their rows: <kind>_fp32 (the candidate's distance from the fp32 video,
# gated), <kind>_frame_fp32 (at its tightest frame, gated), eager_<kind>_fp32 (eager's own), <kind>_eager (the
# candidate's from eager); drift_<part>_<kind>_fp32 for the drift attribution.
QUALITY_KINDS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "vmaf": "VMAF", "lpips": "LPIPS"}
FLOORS = ("nonfinite", "frame_std_min", "motion_max")
ATTRIBUTION = re.compile(r"drift_(?P<part>.+)_(?P<kind>psnr|ssim|vmaf)_fp32")


def _quality_markdown(rows: list[Row]) -> str:
    """Per case and backend, each kind's three distances side by side: the candidate's from the fp32 video (with its
    band, over the video and at its tightest frame), eager's own, the candidate's from eager; then the floors, the
    drift attribution, the notes (where the videos came from, a reference far from fp32) and the peaks."""
    from tabulate import tabulate

    found = {(r.case, r.backend, r.test, r.metric): r for r in rows}
    body, parts = [], []
    for case, backend, test in dict.fromkeys((r.case, r.backend, r.test) for r in rows):
        def get(metric: str) -> Row | None:
            return found.get((case, backend, test, metric))

        for kind, label in QUALITY_KINDS.items():
            whole, frame = get(f"{kind}_fp32"), get(f"{kind}_frame_fp32")
            if whole is not None:
                where = f" at {frame.note.split(',')[0]}" if frame is not None and frame.note.startswith("frame") else ""
                body.append([case, backend, label, _cell(whole), _value(get(f"eager_{kind}_fp32")),
                             _value(get(f"{kind}_eager")), _cell(frame) + where if frame else "", _verdict_of([whole, frame])])
        floors = [r for r in map(get, FLOORS) if r is not None]
        if floors:
            body.append([case, backend, "floors", ", ".join(f"{r.metric} {_cell(r)}" for r in floors), "", "", "",
                         _verdict_of(floors)])
        parts += [[case, m["part"], m["kind"], _value(r)] for r in rows
                  if (r.case, r.backend, r.test) == (case, backend, test) and (m := ATTRIBUTION.fullmatch(r.metric))]
    text = "## quality: distance from the fp32 video\n\n"
    if body:
        text += tabulate(body, ["case", "backend", "metric", "candidate vs fp32 (band)", "eager vs fp32",
                                "candidate vs eager", "tightest frame (band)", "verdict"], tablefmt="github") + "\n"
    if parts:
        text += ("\nWhere eager's drift comes from: the video with only that part at the case's precision, the rest "
                 "in fp32, against the fp32 video (reported, not gated).\n\n"
                 + tabulate(_attribution_table(parts), "keys", tablefmt="github", showindex=False) + "\n")
    notes = _notes_markdown([r for r in rows if not r.note.startswith("frame ")])
    return text + notes + _memory_table(rows)


def _attribution_table(parts: list[list]):
    import pandas as pd

    frame = pd.DataFrame(parts, columns=["case", "part", "kind", "value"])
    table = frame.pivot_table(index=["case", "part"], columns="kind", values="value", aggfunc="last", sort=False)
    return table.fillna("").reset_index().rename_axis(columns=None)


def _value(row: Row | None) -> str:
    return "" if row is None else _number(row.value) or "n/a"


def _verdict_of(rows: list[Row | None]) -> str:
    verdicts = [r.passed for r in rows if r is not None]
    return "FAIL" if False in verdicts else ("pass" if True in verdicts else "not measured")


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
    """Speed-ups with the gate verdict each row carries, then the candidates' parity and quality verdicts, from the one
    reader of a run folder (run_tables, which refuses a table that contradicts itself)."""
    from tabulate import tabulate

    tables = run_tables(run)
    rows = [r for table in tables.values() for r in table]
    perf = tables.get("perf", [])
    speed = [[r.case, r.backend, _number(eager), _number(candidate), "n/a" if r.value is None else f"{r.value:.3f}x",
              "" if r.threshold is None else f">= {r.threshold:g}x",
              {True: "pass", False: "FAIL", None: "not gated"}[r.passed]]
             for r, eager, candidate in speedup_medians(perf) if r.metric == "speedup"]
    checks = [[r.case, r.backend, r.metric, f"{r.value:.4g}" if r.value is not None else "n/a",
               "" if r.threshold is None else f"{r.threshold:.3g}",
               "skipped" if _skipped(r) else {True: "pass", False: "FAIL"}[r.passed]]
              for r in rows if r.backend != "torch" and (r.passed is not None or _skipped(r))]
    note = completion_note(session_end(run))
    note += CPU_NOTE + "\n\n" if on_cpu([r for r in perf if r.metric == "speedup"]) else ""
    return (note + tabulate(speed, ["case", "candidate", "eager ms", "candidate ms", "speed-up", "gate", "verdict"],
                            tablefmt="github") + "\n\n"
            + tabulate(checks, ["case", "backend", "metric", "value", "threshold", "verdict"], tablefmt="github")
            + _memory_table(rows) + "\n"
            + _notes_markdown([r for r in rows if r.backend != "torch" and _skipped(r)]))


def _skipped(row: Row) -> bool:
    """A metric that was not measured, with the reason in its note (VMAF on frames too small to score)."""
    return row.value is None and row.passed is None and bool(row.note)


def _memory_table(rows: list[Row]) -> str:
    """Each case and backend's peak memory (the largest recorded: every row of a test carries its peak so far, and
    several tests may measure one case), with the columns the run measured: no GPU columns where it ran on the CPU."""
    from tabulate import tabulate

    peaks: dict[tuple[str, str], dict[str, float | None]] = {}
    for r in rows:
        if r.metric in CASE_PEAKS:
            mine = peaks.setdefault((r.case, r.backend), {})
            mine[r.metric] = max((v for v in (mine.get(r.metric), r.value) if v is not None), default=None)
    if not peaks:
        return ""
    metrics = [m for m in CASE_PEAKS if any(m in p for p in peaks.values())]
    body = [[case, backend, *(_number(values.get(m)) for m in metrics)] for (case, backend), values in peaks.items()]
    return "\n\n" + MEMORY_NOTE + "\n\n" + tabulate(body, ["case", "backend", *metrics], tablefmt="github")


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
    """speedup.png (per backend and shape, with the gate), video_breakdown.png (where a whole video's time goes,
    eager beside the candidate) and error_vs_step.png, where rows exist."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI runners
    written = []
    perf = tables.get("perf", [])
    speedups = [r for r in perf if r.metric == "speedup" and r.value is not None]
    if speedups:
        quartiles = {(r.case, r.backend, r.metric, r.test): r.value for r in perf
                     if r.metric in ("speedup_q1", "speedup_q3")}
        written.append(_save(_speedup_figure(speedups, quartiles), Path(folder) / "speedup.png"))
    videos = [r for r in perf if r.metric in VIDEO_BARS and r.value is not None]
    if videos:
        written.append(_save(_video_figure(videos), Path(folder) / "video_breakdown.png"))
    steps = [r for r in tables.get("parity", []) if STEP_METRIC.fullmatch(r.metric) and r.value is not None]
    if steps:
        written.append(_save(_step_figure(steps), Path(folder) / "error_vs_step.png"))
    return written


# A whole video's parts, as harness/perf.py VideoBreakdown names its rows, stacked in the order they run.
VIDEO_BARS = {"video_text_encode_s": "text encoding", "video_transformer_s": "high-noise expert's steps",
              "video_transformer_2_s": "low-noise expert's steps", "video_vae_decode_s": "VAE decode",
              "video_moves_s": "moves onto the card"}


def _video_figure(rows: list[Row]):
    """Stacked bars of each side's video time by part (medians of the timed videos), per case: eager beside the
    candidate, so what fp8 buys in steps and in moves shows."""
    import matplotlib.pyplot as plt

    bars = list(dict.fromkeys((r.case, r.backend, r.test) for r in rows))
    value = {(r.case, r.backend, r.test, r.metric): r.value for r in rows}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(bars)), 4))
    bottom = [0.0] * len(bars)
    for metric, label in VIDEO_BARS.items():
        heights = [value.get((*bar, metric), 0.0) for bar in bars]
        ax.bar(range(len(bars)), heights, 0.6, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(bars)), [f"{backend}\n{case}" for case, backend, _ in bars], fontsize=7)
    ax.set_ylabel("seconds per video (median of the timed videos)")
    ax.set_title("where a whole video's time goes", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _speedup_figure(rows: list[Row], quartiles: dict[tuple[str, str, str, str], float]):
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


def _error_bar(row: Row, quartiles: dict[tuple[str, str, str, str], float]) -> tuple[float, float]:
    """How far below and above the bar the per-round ratios' quartiles reach (none recorded: no bar).

    The ratio of medians need not lie between the ratios' quartiles, so each extent is clipped at zero.
    """
    q1 = quartiles.get((row.case, row.backend, "speedup_q1", row.test), row.value)
    q3 = quartiles.get((row.case, row.backend, "speedup_q3", row.test), row.value)
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
