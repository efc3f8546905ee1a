"""Regression gating: accepted numbers saved as a baseline JSON, and a noise-aware comparison against it.

A gate that cries wolf on noise gets switched off, so every rule has a tolerance that lives in
thresholds.toml [regression], and perf compares medians only when they moved past both runs' spread.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from harness.cache import atomic_write_text
from harness.errors import HarnessError
from harness.results import SESSION_FILE, TABLES, Row, impossible, run_tables, session_end
from harness.thresholds import THRESHOLDS, thresholds

SCHEMA = "wan-trt-bench/baseline/1"
ABOUT = ("Accepted numbers of one run, written by `python -m harness baseline save` and read by "
         "`python -m harness compare`. entries: one per 'case|backend|metric', with the table it came "
         "from and its value; perf medians (median_ms) carry their spread (iqr_ms). Only metrics with a "
         "rule in harness/thresholds.toml [regression] are kept. An infinite value (PSNR of identical "
         "frames) is the string 'inf'; NaN never appears. machine: where the numbers were measured; "
         "compare refuses another GPU or TensorRT version unless --cross-machine.")
PERF_METRIC, SPREAD_METRIC = "median_ms", "iqr_ms"
MACHINE_KEYS = ("device", "tensorrt", "tensorrt_rtx", "torch")
VERDICTS = ("ok", "regressed", "improved", "new", "missing")
# What a baseline holds unless --tables says otherwise: the tables whose metrics have rules (export's build times have
# none), each of which the run must hold.
BASELINE_TABLES = ("parity", "quality", "perf")
MAX_SHARE = 10.0  # a relative tolerance of 1000% (a median eleven times slower) or more would hide any regression


@dataclass(frozen=True)
class Rule:
    """How one metric may move: its distance from `best` (or the value itself) may grow by rtol*base + atol."""

    better: str  # "lower" or "higher"
    rtol: float
    atol: float
    best: float | None = None  # the perfect value, e.g. 1 for cosine and SSIM: distance from it is the error
    cap: float | None = None  # values above are compared as cap (PSNR of identical frames is inf)

    def error(self, value: float) -> float:
        """A number where lower is better, on which rtol and atol act."""
        if self.cap is not None:
            value = min(value, self.cap)
        if self.best is not None:
            return abs(self.best - value)
        return value if self.better == "lower" else -value

    def meets(self, value: float, threshold: float) -> bool:
        """Whether `value` is on the passing side of a threshold on this metric: at most it where lower is
        better, at least it where higher is; a NaN never is."""
        return value <= threshold if self.better == "lower" else value >= threshold


@dataclass(frozen=True)
class Rules:
    perf_tolerance: float
    metrics: dict[str, Rule]

    def for_metric(self, metric: str) -> Rule | None:
        """`rel_l2@step=3` follows the rule of `rel_l2`."""
        return self.metrics.get(metric.split("@", 1)[0])


@dataclass(frozen=True)
class Entry:
    table: str
    value: float
    iqr_ms: float | None = None


@dataclass(frozen=True)
class Baseline:
    name: str
    source_run: str
    machine: dict
    entries: dict[str, Entry]


@dataclass(frozen=True)
class Verdict:
    key: str
    baseline: float | None
    current: float | None
    change: str
    verdict: str

    @property
    def case(self) -> str:
        return self.key.split("|", 1)[0]


def load_rules(path: Path = THRESHOLDS) -> Rules:
    """The [regression] section of the thresholds file, its tolerances checked as --perf-tolerance is."""
    try:
        section = thresholds(path)["regression"]
        metrics = {name: Rule(**spec) for name, spec in section["metrics"].items()}
        rules = Rules(float(section["perf_tolerance"]), metrics)
    except (KeyError, TypeError, ValueError) as exc:
        raise HarnessError(f"{path}: no usable [regression] section ({type(exc).__name__}: {exc}); "
                           "restore it from git") from None
    check_share(f"{path} [regression] perf_tolerance", rules.perf_tolerance)
    for name, rule in metrics.items():
        where = f"{path} [regression.metrics.{name}]"
        check_share(f"{where} rtol", rule.rtol)
        if rule.better not in ("lower", "higher") or not (_is_number(rule.atol) and 0 <= rule.atol < math.inf):
            raise HarnessError(f"{where}: better must be 'lower' or 'higher' and atol a finite number >= 0; "
                               "restore it from git")
    return rules


def check_share(name: str, value: float) -> float:
    """A relative tolerance: finite, >= 0 and below MAX_SHARE. NaN, inf, a huge or a negative share would make
    every comparison ok."""
    if not (_is_number(value) and 0 <= value < MAX_SHARE):  # NaN compares false
        raise HarnessError(f"{name} {value!r} must be a finite number >= 0 and < {MAX_SHARE:g} ({MAX_SHARE:.0%}): "
                           "a share, 0.05 for 5%")
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- from a run folder to entries ---

def run_entries(run: Path, rules: Rules, tables: tuple[str, ...] = TABLES) -> tuple[dict[str, Entry], dict]:
    """The gateable numbers of a run folder, and the machine that measured them."""
    return _found_entries(run_tables(run), run, rules, tables)


def _found_entries(found: dict[str, list[Row]], run: Path, rules: Rules,
                   tables: tuple[str, ...]) -> tuple[dict[str, Entry], dict]:
    rows = [(t, r) for t in tables for r in found.get(t, [])]
    return _entries(rows, rules, run), machine_from_rows([r for _, r in rows] or [r for v in found.values() for r in v])


def _entries(rows: list[tuple[str, Row]], rules: Rules, run: Path) -> dict[str, Entry]:
    """One entry per gateable key. A median carries the spread its own test recorded with it (a timing writes median_ms
    and iqr_ms). A key measured by several tests is judged by its worse measurement, so a NaN cannot hide behind a
    good repeat: eager torch is re-timed beside each candidate (cases/test_perf.py) under the same case id. Within a
    test a key is unique: run_tables refuses a table that repeats one."""
    spreads = {(t, r.case, r.backend, r.test): r.value for t, r in rows if r.metric == SPREAD_METRIC}
    entries: dict[str, Entry] = {}
    for table, r in rows:
        if r.value is None or (r.metric != PERF_METRIC and rules.for_metric(r.metric) is None):
            continue  # not measured, or no rule: nothing to gate (tflops, export times...)
        iqr = spreads.get((table, r.case, r.backend, r.test)) if r.metric == PERF_METRIC else None
        if r.metric == PERF_METRIC and iqr is None:  # a median without its spread cannot be judged against noise
            raise HarnessError(f"{run}: {r.key} has no {SPREAD_METRIC} row beside it; every perf case writes "
                               f"both, so rerun the case to rebuild its rows")
        entry = Entry(table, r.value, iqr)
        entries[r.key] = _worse(entries[r.key], entry, rules.for_metric(r.metric)) if r.key in entries else entry
    return entries


def _worse(a: Entry, b: Entry, rule: Rule | None) -> Entry:
    """Of two measurements of one key, the one to judge: one with a NaN or Inf, else the larger error (for a median,
    which has no rule: the slower)."""
    def badness(e: Entry) -> tuple[bool, float]:
        error = e.value if rule is None else rule.error(e.value)
        finite = math.isfinite(error) and (e.iqr_ms is None or math.isfinite(e.iqr_ms))
        return not finite, error

    return b if badness(b) > badness(a) else a


def machine_from_rows(rows: list[Row]) -> dict:
    """Device and TensorRT/torch versions from the rows themselves: the machine that ran, not this one."""
    devices = [r.device for r in rows if r.device]
    gpus = [d for d in devices if not d.startswith("cpu")]
    pool = gpus or devices
    versions = _parse_versions(rows[0].versions) if rows else {}
    return {"device": max(set(pool), key=pool.count) if pool else "unknown",
            **{k: versions.get(k) for k in MACHINE_KEYS[1:]}}


def _parse_versions(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(";") if "=" in part)


# --- the baseline file ---

def save_baseline(run: Path, name: str, folder: Path = Path("baselines"), tables: tuple[str, ...] = BASELINE_TABLES,
                  rules: Rules | None = None) -> Path:
    """Store a run's gateable numbers as baselines/<name>.json (atomic, sorted, one entry per line)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise HarnessError(f"baseline name {name!r}: start with a letter or digit, then use letters, digits, "
                           "'.', '_' and '-' only")
    rules = rules or load_rules()
    found = run_tables(Path(run))
    check_whole(Path(run), found, tables)
    entries, machine = _found_entries(found, Path(run), rules, tables)
    problems = {key: _unacceptable(key, entry, rules) for key, entry in entries.items()}
    bad = [f"{key} ({problem})" for key, problem in problems.items() if problem]
    if bad:
        raise HarnessError(f"{run} has {', '.join(bad[:5])}: a NaN or Inf is never an accepted number; "
                           "fix the case and rerun before saving a baseline")
    if not entries:
        raise HarnessError(f"{run} has no gateable numbers in tables {', '.join(tables)}")
    path = folder / f"{name}.json"
    try:
        atomic_write_text(path, dumps_baseline(Baseline(name, Path(run).name, machine, entries)))
    except OSError as exc:
        raise HarnessError(f"cannot write baseline {path}: {exc.filename or path}: {exc.strerror}; pass --dir a "
                           "folder you can write") from None
    return path


def check_whole(run: Path, found: dict[str, list[Row]], tables: tuple[str, ...]) -> None:
    """An accepted baseline is a whole run: its session ran every case it selected, and it holds every table asked
    for (a baseline without them would judge nothing there, and say nothing of it)."""
    end = session_end(run)
    if end is None:
        raise HarnessError(f"{run} holds no {SESSION_FILE} recording that its pytest session finished (it crashed or "
                           "was killed, is still running, or ran before run folders recorded it); a baseline takes a "
                           "whole run: rerun the cases")
    if not end.complete:
        raise HarnessError(f"{run} was interrupted after {end.ran} of {end.selected} cases (pytest exit status "
                           f"{end.exit_status}); a baseline takes a whole run: rerun the cases")
    missing = [t for t in tables if t not in found]
    if missing:
        raise HarnessError(f"{run} has no {' or '.join(f'{t}.csv' for t in missing)} for --tables {','.join(tables)}; "
                           f"it holds {', '.join(found)}: pass --tables naming those, or rerun the cases that write "
                           f"{', '.join(missing)}")


def dumps_baseline(baseline: Baseline) -> str:
    """Valid JSON laid out for diffs: header fields first, then one sorted entry per line."""
    header = {"about": ABOUT, "machine": baseline.machine, "name": baseline.name, "schema": SCHEMA,
              "saved": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}", "source_run": baseline.source_run}
    lines = [f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}," for k, v in header.items()]
    entries = [f"  {json.dumps(k)}: {json.dumps(_entry_json(e), sort_keys=True)}"
               for k, e in sorted(baseline.entries.items())]
    return "{\n" + "\n".join(lines) + '\n "entries": {\n' + ",\n".join(entries) + "\n }\n}\n"


def _entry_json(entry: Entry) -> dict:
    doc = {"table": entry.table, "value": _number_json(entry.value)}
    if entry.iqr_ms is not None:
        doc["iqr_ms"] = _number_json(entry.iqr_ms)
    return doc


def _unacceptable(key: str, entry: Entry, rules: Rules) -> str:
    """Why an entry cannot be an accepted number ('' when it can), for saving and loading alike: a median or IQR
    that is NaN or Inf or that no timing gives (a time <= 0, a spread < 0), or a metric whose error is not
    finite (PSNR of identical frames is inf, but its rule caps it to a finite error)."""
    metric = key.rsplit("|", 1)[1]
    if metric == PERF_METRIC:
        problems = (impossible(name, value) or ("" if math.isfinite(value) else f"{name} {value}")
                    for name, value in ((PERF_METRIC, entry.value), (SPREAD_METRIC, entry.iqr_ms)))
        return next(filter(None, problems), "")
    return "" if math.isfinite(rules.for_metric(metric).error(entry.value)) else f"{metric} {entry.value}"


def _number_json(value: float) -> float | str:
    """Strict JSON has no inf: PSNR of identical frames is stored as the string 'inf' (a NaN has no form)."""
    return value if math.isfinite(value) else {math.inf: "inf", -math.inf: "-inf"}[value]


def load_baseline(path: Path, rules: Rules | None = None) -> Baseline:
    """Read and check a baseline file; a corrupt or hand-edited field is named in the error."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise HarnessError(f"{path} is not UTF-8 text (byte {exc.start}); restore it from git or save it "
                           "again") from None
    except OSError as exc:
        raise HarnessError(f"cannot read baseline {path}: {exc.strerror}; save one with "
                           "`python -m harness baseline save --from results/<run-id> --name <name>`") from None
    except json.JSONDecodeError as exc:
        raise HarnessError(f"{path} is not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno}); "
                           "restore it from git or save it again") from None
    return _check_baseline(doc, path, rules or load_rules())


def _field_error(path: Path, field: str, problem: str) -> HarnessError:
    return HarnessError(f"{path}: field {field} {problem}; restore the file from git or save it again "
                        "with `python -m harness baseline save`")


def _check_baseline(doc, path: Path, rules: Rules) -> Baseline:
    if not isinstance(doc, dict):
        raise _field_error(path, "(top level)", "must be a JSON object")
    if doc.get("schema") != SCHEMA:
        raise _field_error(path, "'schema'", f"is {doc.get('schema')!r}, expected {SCHEMA!r}")
    machine = doc.get("machine")
    if not isinstance(machine, dict) or not isinstance(machine.get("device"), str):
        raise _field_error(path, "'machine.device'", "must be a string naming the device")
    entries = doc.get("entries")
    if not isinstance(entries, dict) or not entries:
        raise _field_error(path, "'entries'", "must be a non-empty object of 'case|backend|metric' entries")
    checked = {key: _check_entry(key, value, path, rules) for key, value in entries.items()}
    return Baseline(str(doc.get("name", path.stem)), str(doc.get("source_run", "")), machine, checked)


def _check_entry(key: str, doc, path: Path, rules: Rules) -> Entry:
    parts = key.split("|")
    if len(parts) != 3 or not all(parts):
        raise _field_error(path, _entry_field(key), "has a key that is not 'case|backend|metric'")
    if not isinstance(doc, dict):
        raise _field_error(path, _entry_field(key), "must be an object with 'table' and 'value'")
    unknown = sorted(set(doc) - {"table", "value", "iqr_ms"})
    if unknown:
        raise _field_error(path, _entry_field(key, unknown[0]), "is not a baseline field")
    if doc.get("table") not in TABLES:
        raise _field_error(path, _entry_field(key, "table"), f"is {doc.get('table')!r}, expected one of {TABLES}")
    metric = parts[2]
    if metric != PERF_METRIC and rules.for_metric(metric) is None:
        raise _field_error(path, _entry_field(key), f"names metric {metric!r}, which has no rule in thresholds.toml")
    value = _number(doc.get("value"), path, _entry_field(key, "value"))
    if metric != PERF_METRIC:
        entry = Entry(doc["table"], value)
    elif "iqr_ms" not in doc:
        raise _field_error(path, _entry_field(key, "iqr_ms"), "is missing; every median_ms entry carries its spread")
    else:
        entry = Entry(doc["table"], value, _number(doc["iqr_ms"], path, _entry_field(key, "iqr_ms")))
    problem = _unacceptable(key, entry, rules)
    if problem:
        raise _field_error(path, _entry_field(key), f"holds {problem}, which no rule can compare against")
    return entry


def _entry_field(key: str, name: str | None = None) -> str:
    suffix = f".{name}" if name else ""
    return f"'entries[\"{key}\"]{suffix}'"


def _number(raw, path: Path, field: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise _field_error(path, field, f"is {raw!r}, expected a number")
    if isinstance(raw, str) and raw not in ("inf", "-inf"):
        raise _field_error(path, field, f"is {raw!r}, expected a number (or 'inf'/'-inf')")
    value = float(raw)
    if math.isnan(value):
        raise _field_error(path, field, "is NaN, which is never an accepted number")
    return value


# --- comparing ---

def check_machines(baseline: dict, current: dict, cross_machine: bool) -> list[str]:
    """Refuse numbers from another GPU or TensorRT version; returns notes for softer differences."""
    differ = [k for k in ("device", "tensorrt", "tensorrt_rtx")
              if _comparable(k, baseline.get(k)) != _comparable(k, current.get(k))]
    if differ and not cross_machine:
        detail = "; ".join(f"{k}: baseline {baseline.get(k)}, current {current.get(k)}" for k in differ)
        raise HarnessError(f"the baseline was measured on another machine ({detail}); numbers from another GPU "
                           "or TensorRT version are not comparable. Save a baseline on this machine, or pass "
                           "--cross-machine to compare anyway")
    notes = [f"note: {k} differs: baseline {baseline.get(k)}, current {current.get(k)}"
             for k in (differ if cross_machine else []) + ["torch"] if baseline.get(k) != current.get(k)]
    return notes


def _comparable(key: str, value):
    """CPUs count as one device: the CPU baseline gates deterministic parity numbers, not CPU timings."""
    return "cpu" if key == "device" and str(value).startswith("cpu") else value


def compare(baseline: Baseline, current: dict[str, Entry], rules: Rules,
            perf_tolerance: float | None = None) -> list[Verdict]:
    """A verdict per entry of either side, sorted by key."""
    tolerance = rules.perf_tolerance if perf_tolerance is None else check_share("--perf-tolerance", perf_tolerance)
    verdicts = []
    for key in sorted(set(baseline.entries) | set(current)):
        base, cur = baseline.entries.get(key), current.get(key)
        if base is None:
            verdicts.append(Verdict(key, None, cur.value, "", "new"))
        elif cur is None:
            verdicts.append(Verdict(key, base.value, None, "", "missing"))
        elif key.endswith("|" + PERF_METRIC):
            verdicts.append(_judge_perf(key, base, cur, tolerance))
        else:
            verdicts.append(_judge_metric(key, base, cur, rules.for_metric(key.rsplit("|", 1)[1])))
    return verdicts


def _judge_perf(key: str, base: Entry, cur: Entry, tolerance: float) -> Verdict:
    """Regressed when the median slowed by > tolerance AND by more than both runs' IQRs added.

    A NaN or Inf median or IQR in the run regresses: it would otherwise pass every comparison it takes part in.
    """
    delta = cur.value - base.value
    noise = base.iqr_ms + cur.iqr_ms
    if not all(math.isfinite(v) for v in (cur.value, cur.iqr_ms)):
        return Verdict(key, base.value, cur.value, f"not finite (median {cur.value}, IQR {cur.iqr_ms})", "regressed")
    change = f"{delta / base.value:+.1%} (IQRs {noise:.3g} ms)"  # a baseline median is > 0 (_unacceptable)
    if abs(delta) > tolerance * base.value and abs(delta) > noise:
        return Verdict(key, base.value, cur.value, change, "regressed" if delta > 0 else "improved")
    return Verdict(key, base.value, cur.value, change, "ok")


def _judge_metric(key: str, base: Entry, cur: Entry, rule: Rule) -> Verdict:
    """Regressed when the error grew by more than rtol * baseline error + atol; a NaN or Inf error always regresses.

    The baseline's error is finite (load_baseline refuses another), so only the run's can be NaN or Inf.
    """
    change = _change(base.value, cur.value)
    e_base, e_cur = rule.error(base.value), rule.error(cur.value)
    if not math.isfinite(e_cur):
        return Verdict(key, base.value, cur.value, change or f"not finite ({cur.value})", "regressed")
    margin = rule.rtol * abs(e_base) + rule.atol
    worse = e_cur - e_base
    verdict = "regressed" if worse > margin else "improved" if -worse > margin else "ok"
    return Verdict(key, base.value, cur.value, change, verdict)


def _change(base: float, cur: float) -> str:
    if not (math.isfinite(base) and math.isfinite(cur)):
        return ""
    delta = cur - base
    return f"{delta:+.3g}" + (f" ({delta / abs(base):+.0%})" if base else "")


def render(verdicts: list[Verdict]) -> str:
    """A table per case: backend, metric, baseline, current, change, verdict; then the counts."""
    from tabulate import tabulate

    by_case: dict[str, list[Verdict]] = {}
    for v in verdicts:
        by_case.setdefault(v.case, []).append(v)
    blocks = []
    for case, items in by_case.items():
        body = [[*v.key.split("|")[1:], _fmt(v.baseline), _fmt(v.current), v.change, v.verdict] for v in items]
        blocks.append(f"{case}\n" + tabulate(body, ["backend", "metric", "baseline", "current", "change",
                                                     "verdict"], tablefmt="simple", disable_numparse=True))
    counts = ", ".join(f"{sum(v.verdict == name for v in verdicts)} {name}" for name in VERDICTS)
    return "\n\n".join(blocks) + f"\n\n{counts}\n"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.5g}"


def exit_code(verdicts: list[Verdict], allow_missing: bool = False) -> int:
    """1 on any regression, or on a missing case unless allowed; else 0."""
    failing = {"regressed"} | (set() if allow_missing else {"missing"})
    return int(any(v.verdict in failing for v in verdicts))


def compare_run(baseline_path: Path, run: Path, perf_tolerance: float | None = None, allow_missing: bool = False,
                cross_machine: bool = False, tables: tuple[str, ...] = TABLES) -> tuple[str, int]:
    """The `compare` command: the printed report and the exit code."""
    rules = load_rules()
    baseline = load_baseline(baseline_path, rules)
    current, machine = run_entries(Path(run), rules, tables)
    notes = check_machines(baseline.machine, machine, cross_machine)
    kept = Baseline(baseline.name, baseline.source_run, baseline.machine,
                    {k: e for k, e in baseline.entries.items() if e.table in tables})
    if not kept.entries.keys() & current.keys():  # else "0 ok, 0 regressed" would exit 0 having judged nothing
        held = ", ".join(sorted({e.table for e in baseline.entries.values()}))
        measured = ", ".join(sorted({e.table for e in current.values()})) or "none of those"
        raise HarnessError(f"nothing to compare: baseline {baseline_path} holds {held}, --tables asks for "
                           f"{', '.join(tables)}, and run {run} has gateable numbers in {measured}; no key is in both: "
                           "pass --tables naming a table both hold, or a baseline of the same cases")
    verdicts = compare(kept, current, rules, perf_tolerance)
    header = f"baseline {baseline_path} (run {baseline.source_run}) vs {run}\n"
    return header + "".join(n + "\n" for n in notes) + "\n" + render(verdicts), exit_code(verdicts, allow_missing)
