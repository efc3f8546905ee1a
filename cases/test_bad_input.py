"""What a new user gets wrong, and what the harness must do with each: a NaN never passes the gate, a damaged
cache entry is rebuilt, and every user error is one line (CLI: exit 2; pytest: one usage error, exit 4,
before any case runs) with no traceback.

The CLI cases run in this process through `main`; whole pytest sessions and `bench` run as subprocesses,
with their results and cache folders under the test's temporary folder.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from harness.__main__ import main
from harness.cache import MANIFEST, DiskCache, file_sha256, sweep_temp_folders
from harness.case import Case
from harness.errors import BackendUnavailable, HarnessError
from harness.results import Row, RunRecorder
from harness.settings import settings_from
from harness.shapes import parse_shape

REPO = Path(__file__).resolve().parent.parent
SHAPE = parse_shape("16x16x9")
H100 = "NVIDIA H100 80GB HBM3 (sm_90)"
PERF_CASE = "cfg_step-proxy-480p-bf16-b1"


def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI and return its one line: exit 2, `error: ...` alone on stderr, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """A subprocess from the repository root, with HF offline (nothing here downloads). Under `pytest -n` the
    worker's PYTEST_XDIST_* variables are left out: the child is a plain session, not a second worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**env, "HF_HUB_OFFLINE": "1", "WAN_BENCH_RUN_ID": "run-bad-input"})


def pytest_session(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--results-dir={tmp_path / 'results'}",
                f"--cache-dir={tmp_path / 'cache'}", *args])


def assert_one_usage_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    """pytest stopped in pytest_configure: exit 4, exactly one `ERROR:` line naming the problem, no case ran."""
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert lines == [lines[0]] and lines[0].startswith("ERROR: ") and needle in lines[0], output
    assert "Traceback" not in output


# --- the regression gate: a NaN never passes ---

def perf_run(root: Path, name: str, median: float, iqr: float) -> Path:
    """A run folder holding one perf case's median and IQR, as a perf case records them."""
    recorder = RunRecorder(root, name)
    for metric, value in (("median_ms", median), ("iqr_ms", iqr)):
        recorder.add("perf", Row(PERF_CASE, "cfg_step", "tensorrt", "bf16", "480p", 32760, metric, value, None, None,
                                 H100, "torch=2.14.1;tensorrt=11.4.0.106"))
    return recorder.path


@pytest.fixture
def accepted(tmp_path) -> Path:
    assert main(["baseline", "save", "--from", str(perf_run(tmp_path, "run-ok", 100.0, 1.0)), "--name", "gpu",
                 "--dir", str(tmp_path / "baselines")]) == 0
    return tmp_path / "baselines" / "gpu.json"


@pytest.mark.unit
@pytest.mark.parametrize("median, iqr", [(math.nan, 1.0), (1000.0, math.nan), (100.0, math.inf)],
                         ids=["nan-median", "nan-iqr-10x-slower", "inf-iqr"])
def test_compare_calls_a_nan_perf_row_regressed(accepted, tmp_path, capsys, median, iqr):
    current = perf_run(tmp_path, "run-nan", median, iqr)
    assert main(["compare", "--baseline", str(accepted), "--current", str(current)]) == 1
    out = capsys.readouterr().out
    assert "1 regressed" in out and "0 ok" in out


@pytest.mark.unit
def test_baseline_save_refuses_a_nan_iqr(tmp_path, capsys):
    run_folder = perf_run(tmp_path, "run-nan", 100.0, math.nan)
    line = cli_error(["baseline", "save", "--from", str(run_folder), "--name", "nan", "--dir", str(tmp_path)], capsys)
    assert "iqr_ms nan" in line and "never an accepted number" in line
    assert not (tmp_path / "nan.json").exists()


@pytest.mark.unit
def test_a_baseline_without_iqr_ms_names_the_field(accepted, tmp_path, capsys):
    doc = json.loads(accepted.read_text())
    del doc["entries"][f"{PERF_CASE}|tensorrt|median_ms"]["iqr_ms"]
    accepted.write_text(json.dumps(doc))
    current = perf_run(tmp_path, "run-cur", 100.0, 1.0)
    line = cli_error(["compare", "--baseline", str(accepted), "--current", str(current)], capsys)
    assert f'entries["{PERF_CASE}|tensorrt|median_ms"].iqr_ms' in line and "is missing" in line


@pytest.mark.unit
@pytest.mark.parametrize("tolerance", ["nan", "inf", "1e9", "-1"])
def test_compare_refuses_a_perf_tolerance_that_hides_a_regression(accepted, tmp_path, capsys, tolerance):
    current = perf_run(tmp_path, "run-slow", 1000.0, 1.0)
    line = cli_error(["compare", "--baseline", str(accepted), "--current", str(current),
                      f"--perf-tolerance={tolerance}"], capsys)
    assert "--perf-tolerance" in line and "must be a finite number >= 0 and < 10" in line


def read_run_commands(run: str, accepted: Path, tmp_path: Path) -> list[list[str]]:
    return [["summary", run], ["compare", "--baseline", str(accepted), "--current", run],
            ["baseline", "save", "--from", run, "--name", "x", "--dir", str(tmp_path / "saved")]]


@pytest.mark.unit
@pytest.mark.parametrize("metric, value, passed, needle", [
    ("median_ms", math.nan, None, f"perf.csv holds {PERF_CASE}|tensorrt|median_ms more than once"),
    ("speedup", math.nan, True, f"perf.csv marks {PERF_CASE}|tensorrt|speedup passed with value nan"),
], ids=["nan-repeating-a-key", "nan-marked-passed"])
def test_a_table_that_contradicts_itself_is_one_line_for_every_command(accepted, tmp_path, capsys, metric, value,
                                                                       passed, needle):
    """A row appended by hand: read as-is, `summary` would print a pass or both verdicts of one key, and `compare`
    could judge the good repeat; every command that reads a run folder refuses it alike, and saves nothing."""
    run = perf_run(tmp_path, "run-bad", 100.0, 1.0)
    RunRecorder(tmp_path, "run-bad").add("perf", Row(PERF_CASE, "cfg_step", "tensorrt", "bf16", "480p", 32760, metric,
                                                     value, 1.5, passed, H100, "torch=2.14.1"))
    for argv in read_run_commands(str(run), accepted, tmp_path):
        line = cli_error(argv, capsys)
        assert needle in line and "rerun the cases into a new run folder" in line, argv
    assert not (tmp_path / "saved").exists()


@pytest.mark.unit
@pytest.mark.parametrize("damage, needle", [
    (lambda run: [p.unlink() for p in run.iterdir()], "no result tables in"),
    (lambda run: (run / "perf.csv").write_bytes(b"\xff\xfe\x00\x01garbage\n"), "perf.csv: not UTF-8 text"),
    (lambda run: (run / "perf.csv").write_text(""), "perf.csv: the file is empty"),
], ids=["no-tables", "not-utf8", "empty-table"])
def test_a_damaged_run_folder_is_one_line_for_every_command(accepted, tmp_path, capsys, damage, needle):
    run = perf_run(tmp_path, "run-damaged", 100.0, 1.0)
    damage(run)
    for argv in read_run_commands(str(run), accepted, tmp_path):
        assert needle in cli_error(argv, capsys), argv
    assert not (tmp_path / "saved").exists()


@pytest.mark.unit
def test_an_empty_path_is_refused_not_read_as_the_current_folder(accepted, tmp_path, capsys):
    for argv in read_run_commands("", accepted, tmp_path) + [["compare", "--baseline", "", "--current", "x"]]:
        assert "is an empty path" in cli_error(argv, capsys), argv


@pytest.mark.unit
def test_baseline_save_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    line = cli_error(["baseline", "save", "--from", str(perf_run(tmp_path, "run-ok", 100.0, 1.0)), "--name", "x",
                      "--dir", str(tmp_path / "a-file")], capsys)
    assert f"cannot write baseline {tmp_path / 'a-file' / 'x.json'}" in line


# --- the cache: damaged entries are rebuilt, killed writers' folders swept ---

@pytest.fixture(scope="module")
def text_encoder():
    """The tiny text encoder (the smallest component) in fp32, and in fp16, whose dynamo export writes its
    weights to an external data file."""
    from harness.components import make_component
    from harness.models import load_model

    return {p: make_component(load_model("tiny", dtype=dtype), "text_encoder")
            for p, dtype in (("fp32", torch.float32), ("fp16", torch.float16))}


def overwrite_same_size(path: Path) -> bytes:
    """Random bytes of the file's own size (returned): only a content hash can tell."""
    garbage = os.urandom(path.stat().st_size)
    path.write_bytes(garbage)
    return garbage


@pytest.mark.export
@pytest.mark.parametrize("precision, damaged", [("fp32", "model.onnx"), ("fp16", "model.onnx.data")],
                         ids=["graph", "external-data"])
def test_same_size_garbage_in_an_onnx_entry_is_rebuilt(text_encoder, tmp_path, caplog, precision, damaged):
    from harness.export import export_case

    case, cache = Case("text_encoder", SHAPE, precision), DiskCache(tmp_path)
    graph = export_case(text_encoder[precision], case, cache)
    target = graph.path.parent / damaged
    assert target.is_file(), sorted(p.name for p in graph.path.parent.iterdir())
    original = target.read_bytes()
    overwrite_same_size(target)
    with caplog.at_level(logging.WARNING, logger="harness.cache"):
        again = export_case(text_encoder[precision], case, cache)
    assert cache.outcomes("onnx", graph.key) == ["miss", "rebuild"] and not again.hit
    assert f"{damaged} has sha256" in caplog.text and "rebuilding" in caplog.text
    assert (again.path.parent / damaged).stat().st_size == len(original)


@pytest.mark.export
def test_same_size_garbage_in_an_engine_plan_is_rebuilt(text_encoder, tmp_path, caplog):
    from engines.tensorrt import PLAN_FILE, TensorRTRTXBuilder

    case, cache = Case("text_encoder", SHAPE), DiskCache(tmp_path)
    builder = TensorRTRTXBuilder(cache=cache)
    _, engine = builder.build(text_encoder["fp32"], case)
    garbage = overwrite_same_size(engine.path)
    with caplog.at_level(logging.WARNING, logger="harness.cache"):
        _, again = builder.build(text_encoder["fp32"], case)
    assert cache.outcomes("engines", engine.key) == ["miss", "rebuild"] and not again.hit
    assert f"{PLAN_FILE} has sha256" in caplog.text
    assert again.path.read_bytes() != garbage and again.layers == engine.layers


def list_no_files(entry: Path) -> None:
    """The manifest kept but its file list emptied, and 1000 random bytes for the entry's main file."""
    manifest = json.loads((entry / MANIFEST).read_text())
    (entry / MANIFEST).write_text(json.dumps({**manifest, "files": {}}))
    main_file = max(entry.iterdir(), key=lambda p: p.stat().st_size)
    main_file.write_bytes(os.urandom(1000))


@pytest.mark.export
def test_an_entry_whose_manifest_lists_no_files_is_rebuilt(text_encoder, tmp_path, caplog):
    from engines.tensorrt import PLAN_FILE, TensorRTRTXBuilder

    case, cache = Case("text_encoder", SHAPE), DiskCache(tmp_path)
    builder = TensorRTRTXBuilder(cache=cache)
    graph, engine = builder.build(text_encoder["fp32"], case)
    list_no_files(graph.path.parent)
    list_no_files(engine.path.parent)
    with caplog.at_level(logging.WARNING, logger="harness.cache"):
        again_graph, again = builder.build(text_encoder["fp32"], case)
    assert cache.outcomes("onnx", graph.key) == ["miss", "rebuild"] and not again_graph.hit
    assert cache.outcomes("engines", engine.key) == ["miss", "rebuild"] and not again.hit
    assert f"unlisted: {PLAN_FILE}" in caplog.text and "unlisted: export.json, model.onnx" in caplog.text
    assert again.size_bytes == engine.size_bytes and again.layers == engine.layers


@pytest.mark.export
def test_a_fetch_while_a_graph_is_validated_is_a_hit(tmp_path, monkeypatch):
    """Validation writes its shape-inferred graph outside the entry: a file added inside would make a fetch by
    another process meanwhile see an unlisted file and rebuild the entry."""
    import onnx

    from harness.session import Session

    session, case = Session(settings_from({"cache_dir": str(tmp_path)})), Case("text_encoder", SHAPE)
    meanwhile = []
    infer = onnx.shape_inference.infer_shapes_path

    def infer_and_fetch(*args, **kwargs):
        infer(*args, **kwargs)
        meanwhile.append(session.export(case, DiskCache(tmp_path)))

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", infer_and_fetch)
    graph, check = session.checked_export(case)
    assert check.shape_inference == "ok" and [g.hit for g in meanwhile] == [True], str(check)
    assert sorted(p.name for p in graph.path.parent.iterdir()) == ["export.json", MANIFEST, "model.onnx"]


@pytest.mark.export
def test_a_cached_graph_failing_validation_is_exported_once_more(tmp_path, caplog):
    """An entry whose manifest matches its (bad) bytes, as a buggy writer could leave: the hash cannot see
    it, validation does, and the graph is evicted and exported again."""
    import onnx
    from onnx import numpy_helper

    from harness.session import Session

    session = Session(settings_from({"cache_dir": str(tmp_path)}))
    case = Case("text_encoder", SHAPE)
    graph, check = session.checked_export(case)
    assert check and not graph.hit
    model = onnx.load(str(graph.path))
    weight = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 3.0, weight.name))
    onnx.save(model, str(graph.path))
    manifest_path = graph.path.parent / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][graph.path.name] = {"size": graph.path.stat().st_size, "sha256": file_sha256(graph.path)}
    manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="harness.cache"):
        again, check = session.checked_export(case)
    assert check and not again.hit, str(check)
    assert "failed validation" in caplog.text


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from harness.cache import DiskCache

    def build(folder):
        (folder / "model.onnx").write_bytes(b"x" * 1_000_000)
        Path(sys.argv[2]).write_text(str(folder))  # tell the test the temp folder exists, half written
        time.sleep(600)

    DiskCache(Path(sys.argv[1])).fetch("onnx", "victim", {"v": 1}, build, lambda folder: None)
""")


@pytest.mark.unit
def test_a_writer_killed_mid_write_leaves_a_folder_the_next_fetch_sweeps(tmp_path, caplog):
    ready = tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "cache"), str(ready)], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the writer never started its build"
            time.sleep(0.1)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(timeout=60)
    left = Path(ready.read_text())
    assert writer.returncode == -signal.SIGKILL and left.is_dir() and left.name.startswith(".victim-")
    cache = DiskCache(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="harness.cache"):
        built = cache.fetch("onnx", "victim", {"v": 1}, lambda f: (f / "model.onnx").write_bytes(b"ok"),
                            lambda f: (f / "model.onnx").read_bytes())
    assert not left.exists() and "left behind" in caplog.text
    assert built.value == b"ok" and [p.name for p in left.parent.iterdir()] == [built.path.name]


@pytest.mark.unit
def test_a_live_writers_folder_is_kept_and_an_old_unknown_one_swept(tmp_path):
    from harness.cache import STALE_AFTER_S, _temp_prefix

    live = tmp_path / f"{_temp_prefix('entry-a')}abc123"  # this process: still writing
    recent, old = tmp_path / ".entry-b.x1y2z3", tmp_path / ".entry-c.q9w8e7"  # names without a writer pid
    for folder in (live, recent, old):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"partial")
    stale = time.time() - STALE_AFTER_S - 60
    for path in (old, old / "model.onnx"):
        os.utime(path, (stale, stale))
    assert sweep_temp_folders(tmp_path) == [old]
    assert live.is_dir() and recent.is_dir()


def write_plan(folder: Path) -> None:
    (folder / "engine.plan").write_bytes(b"plan" * 250)
    (folder / "network.json").write_text('{"layers": 3}')


def read_plan(folder: Path) -> tuple[bytes, dict]:
    return (folder / "engine.plan").read_bytes(), json.loads((folder / "network.json").read_text())


def edit_manifest(change):
    """A damage that replaces the manifest with `change(manifest)`."""
    def damage(entry: Path) -> None:
        (entry / MANIFEST).write_text(json.dumps(change(json.loads((entry / MANIFEST).read_text()))))
    return damage


def replace_with_a_file(entry: Path) -> None:
    shutil.rmtree(entry)
    entry.write_text("not an entry")


DAMAGES = {
    "lists-no-files": (edit_manifest(lambda m: {**m, "files": {}}), "unlisted: engine.plan, network.json"),
    "lists-an-absent-file": (edit_manifest(lambda m: {**m, "files": {**m["files"], "../x": {"size": 1, "sha256": ""}}}),
                             "listed but absent: ../x"),
    "other-spec": (edit_manifest(lambda m: {**m, "spec": {}}), "written for another spec"),
    "a-list": (edit_manifest(lambda m: [m]), "holds a list, not an object"),
    "a-string": (edit_manifest(lambda m: "manifest"), "holds a str, not an object"),
    "null": (edit_manifest(lambda m: None), "holds a NoneType, not an object"),
    "future-format": (edit_manifest(lambda m: {**m, "format": 99}), "is format 99, not 2"),
    "files-a-list": (edit_manifest(lambda m: {**m, "files": list(m["files"])}), "no valid file list"),
    "size-a-string": (edit_manifest(lambda m: {**m, "files": {k: {**v, "size": str(v["size"])}
                                                             for k, v in m["files"].items()}}), "no valid file list"),
    "an-unlisted-file": (lambda entry: (entry / "layers.txt").write_text("forged"), "unlisted: layers.txt"),
    "a-file-for-the-folder": (replace_with_a_file, "no readable manifest.json"),
}


@pytest.mark.unit
@pytest.mark.parametrize("damage, reason", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_manifest_is_never_served(tmp_path, caplog, damage, reason):
    cache = DiskCache(tmp_path)
    first = cache.fetch("engines", "e", {"v": 1}, write_plan, read_plan)
    damage(first.path)
    with caplog.at_level(logging.WARNING, logger="harness.cache"):
        again = cache.fetch("engines", "e", {"v": 1}, write_plan, read_plan)
    assert cache.outcomes("engines", first.path.name) == ["miss", "rebuild"] and again.value == first.value
    assert reason in caplog.text and "rebuilding" in caplog.text
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name]


@pytest.mark.unit
@pytest.mark.parametrize("blocker", ["", "engines"], ids=["cache-dir", "kind-folder"])
def test_a_cache_folder_that_is_a_file_is_a_harness_error(tmp_path, blocker):
    root = tmp_path / "cache"
    if blocker:
        root.mkdir()
    (root / blocker).write_text("not a folder")  # the cache folder itself, or its engines folder
    with pytest.raises(HarnessError, match=rf"^cannot write the cache folder {re.escape(str(root / 'engines'))} "
                                           r"\(.*\); pass --cache-dir a writable folder$"):
        DiskCache(root).fetch("engines", "e", {"v": 1}, write_plan, read_plan)


@pytest.mark.unit
def test_export_into_a_cache_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "cachefile"
    path.write_text("not a folder")
    assert str(path) in cli_error(["export", f"--cache-dir={path}", "--component", "text_encoder"], capsys)


@pytest.mark.unit
def test_an_entry_folder_gets_the_umask_mode_not_mkdtemps(tmp_path):
    umask = os.umask(0o022)
    try:
        entry = DiskCache(tmp_path).fetch("engines", "e", {"v": 1}, write_plan, read_plan).path
    finally:
        os.umask(umask)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755


@pytest.mark.unit
def test_discarding_an_entry_another_process_moved_first_is_quiet(tmp_path):
    """Two processes that find one entry bad both evict it; the second may get past evict's exists() check
    just before the first moves the entry away."""
    from harness.cache import _discard

    _discard(tmp_path / "engines" / "gone")
    assert list((tmp_path / "engines").iterdir()) == []


# --- a damaged checkpoint folder: one line naming the file, before any case ---

@pytest.fixture
def damaged_checkpoint(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint with one file cut in half; returns (folder, the file's relative path)."""
    def cut(relative: str) -> Path:
        folder = tmp_path / "checkpoint"
        shutil.copytree(tiny_checkpoint, folder)
        data = (folder / relative).read_bytes()
        (folder / relative).write_bytes(data[: len(data) // 2])
        return folder

    return cut


@pytest.mark.unit
@pytest.mark.parametrize("relative, needle", [("model_index.json", "is unreadable"),
                                              ("transformer/diffusion_pytorch_model.safetensors", "is cut short")])
def test_a_file_cut_in_half_is_named_by_the_cli(damaged_checkpoint, capsys, tmp_path, relative, needle):
    folder = damaged_checkpoint(relative)
    line = cli_error(["generate", "--prompt", "x", "--model-source", "checkpoint", "--model-path", str(folder),
                      "--out", str(tmp_path / "v.mp4")], capsys)
    assert str(folder / relative) in line and needle in line and "copy the file again" in line


def test_a_truncated_checkpoint_stops_pytest_once(damaged_checkpoint, tmp_path):
    folder = damaged_checkpoint("model_index.json")
    proc = pytest_session(tmp_path, "-m", "parity", "--model-source=checkpoint", f"--model-path={folder}")
    assert_one_usage_error(proc, "model_index.json is unreadable")


def _edit_json(relative: str, **changes):
    """An edit that sets (None: drops) keys of one of the folder's JSON files."""
    def edit(folder: Path) -> None:
        doc = json.loads((folder / relative).read_text())
        doc.update(changes)
        (folder / relative).write_text(json.dumps({k: v for k, v in doc.items() if v is not DROP}))
    return edit


def _edit_tensors(relative: str, edit_state):
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(folder / relative)
        edit_state(state)
        save_file(state, folder / relative, metadata={"format": "pt"})
    return edit


def _append(relative: str, data: bytes):
    def edit(folder: Path) -> None:
        with (folder / relative).open("ab") as f:
            f.write(data)
    return edit


def _shard(relative: str, drop: str):
    """Save a single weights file as two shards and their index, as from_pretrained reads a large model, then take
    `drop` out of its shard while the index still names it."""
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        single = folder / relative
        state = load_file(single)
        names = sorted(state)
        stem = single.name.removesuffix(".safetensors")
        weight_map = {}
        for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
            shard = f"{stem}-{i:05d}-of-00002.safetensors"
            save_file({n: state[n] for n in part if n != drop}, single.parent / shard, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        single.unlink()
        (single.parent / f"{single.name}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return edit


def _replace(relative: str, make):
    """An edit that removes a file or folder and lets `make` put something else at its path."""
    def edit(folder: Path) -> None:
        target = folder / relative
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        make(target)
    return edit


DROP = object()
DIT_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
DIT_INDEX = "transformer/diffusion_pytorch_model.safetensors.index.json"
WRONG_CHECKPOINTS = {
    "other pipeline": (_edit_json("model_index.json", _class_name="WanImageToVideoPipeline"),
                       "names the pipeline 'WanImageToVideoPipeline'"),
    "expand_timesteps": (_edit_json("model_index.json", expand_timesteps=True), "single-expert checkpoint"),
    "no transformer_2 entry": (_edit_json("model_index.json", transformer_2=DROP), "single-expert checkpoint"),
    "transformer_2 null": (_edit_json("model_index.json", transformer_2=[None, None]), "single-expert checkpoint"),
    "no tokenizer entry": (_edit_json("model_index.json", tokenizer=DROP), "gives tokenizer as None"),
    "vae of another class": (_edit_json("model_index.json", vae=["diffusers", "AutoencoderKL"]),
                             "gives vae as ['diffusers', 'AutoencoderKL']"),
    "boundary_ratio null": (_edit_json("model_index.json", boundary_ratio=None), "boundary_ratio None"),
    "boundary_ratio 0": (_edit_json("model_index.json", boundary_ratio=0), "boundary_ratio 0;"),
    "boundary_ratio 1.5": (_edit_json("model_index.json", boundary_ratio=1.5), "boundary_ratio 1.5"),
    "boundary_ratio nan": (_edit_json("model_index.json", boundary_ratio=float("nan")), "boundary_ratio nan"),
    "boundary_ratio text": (_edit_json("model_index.json", boundary_ratio="0.875"), "boundary_ratio '0.875'"),
    "vae z_dim": (_edit_json("vae/config.json", z_dim=48), "in_channels is 16 but the vae's z_dim is 48"),
    "experts' heads": (_edit_json("transformer_2/config.json", num_attention_heads=4, attention_head_dim=6),
                       "transformer num_attention_heads is 2 but transformer_2 num_attention_heads is 4"),
    "text width": (_edit_json("text_encoder/config.json", d_model=64), "text_dim is 32 but the text encoder's d_model is 64"),
    "vocabulary": (_edit_json("text_encoder/config.json", vocab_size=100), "text encoder's vocab_size is 100"),
    "patch_size int": (_edit_json("transformer/config.json", patch_size=7), "has patch_size 7"),
    "patch_size zero": (_edit_json("transformer/config.json", patch_size=[1, 0, 2]), "has patch_size [1, 0, 2]"),
    "rope null": (_edit_json("transformer/config.json", rope_max_seq_len=None), "rope_max_seq_len None"),
    "no scheduler config": (_replace("scheduler/scheduler_config.json", lambda p: None),
                            "scheduler_config.json does not exist"),
    "no tokenizer_config": (_replace("tokenizer/tokenizer_config.json", lambda p: None),
                            "tokenizer_config.json does not exist"),
    "tokenizer.json {}": (_replace("tokenizer/tokenizer.json", lambda p: p.write_text("{}")),
                          "tokenizer.json has no model vocabulary"),
    "tokenizer a file": (_replace("tokenizer", lambda p: p.write_text("x")), "tokenizer is not a folder"),
    "no text weights": (_replace("text_encoder/model.safetensors", lambda p: None),
                        "text_encoder holds none of model.safetensors"),
    "weights a folder": (_replace(DIT_WEIGHTS, Path.mkdir), "safetensors is a folder, not a file"),
    "dangling weights": (_replace(DIT_WEIGHTS, lambda p: p.symlink_to(p.parent / "gone")),
                         "safetensors is a dangling symlink"),
    "index as list": (_replace(DIT_INDEX, lambda p: p.write_text('{"weight_map": []}')),
                      "index.json has no weight_map"),
    "index without map": (_replace(DIT_INDEX, lambda p: p.write_text("{}")), "index.json has no weight_map"),
    "int32 weight": (_edit_tensors(DIT_WEIGHTS, lambda s: s.update(w=s.pop("blocks.0.attn1.to_q.weight").int())),
                     "holds non-floating tensors where weights belong: w (I32)"),
    "tensor shape": (_edit_tensors(DIT_WEIGHTS, lambda s: s.update({"blocks.0.attn1.to_q.weight": torch.zeros(24, 23)})),
                     "diffusion_pytorch_model.safetensors holds blocks.0.attn1.to_q.weight as [24, 23] where "
                     "transformer/config.json builds [24, 24]"),
    "more layers": (_edit_json("transformer/config.json", num_layers=3),
                    "lacks 27 of the 96 tensors transformer/config.json needs: blocks.2."),
    "DiT tensor": (_edit_tensors(DIT_WEIGHTS, lambda s: s.pop("blocks.0.attn1.to_q.weight")),
                   "diffusion_pytorch_model.safetensors lacks 1 of the 69 tensors transformer/config.json needs: "
                   "blocks.0.attn1.to_q.weight;"),
    "text tensor": (_edit_tensors("text_encoder/model.safetensors",
                                  lambda s: s.pop("encoder.block.1.layer.1.DenseReluDense.wi_0.weight")),
                    "model.safetensors lacks 1 of the 22 tensors text_encoder/config.json needs: "
                    "encoder.block.1.layer.1.DenseReluDense.wi_0.weight;"),
    "trailing bytes": (_append(DIT_WEIGHTS, b"\0" * 16), "has 16 bytes past the"),
    "sharded DiT tensor": (_shard(DIT_WEIGHTS, drop="blocks.1.ffn.net.0.proj.weight"),
                           "diffusion_pytorch_model.safetensors.index.json lacks 1 of the 69 tensors "
                           "transformer/config.json needs: blocks.1.ffn.net.0.proj.weight;"),
}


@pytest.fixture
def wrong_checkpoint(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint that one edit makes wrong."""
    def make(edit) -> Path:
        folder = tmp_path / "checkpoint"
        shutil.copytree(tiny_checkpoint, folder)
        edit(folder)
        return folder

    return make


@pytest.mark.unit
@pytest.mark.parametrize("edit, needle", WRONG_CHECKPOINTS.values(), ids=WRONG_CHECKPOINTS)
def test_a_wrong_checkpoint_is_one_line(wrong_checkpoint, capsys, tmp_path, edit, needle):
    folder = wrong_checkpoint(edit)
    line = cli_error(["generate", "--prompt", "x", "--model-source", "checkpoint", "--model-path", str(folder),
                      "--shape", "16x16x9", "--steps", "1", "--out", str(tmp_path / "v.mp4")], capsys)
    assert needle in line


@pytest.mark.unit
def test_a_tensor_the_model_does_not_use_is_a_warning_not_an_error(wrong_checkpoint, caplog):
    """Nothing is left uninitialised by a spare tensor (checkpoints carry such leftovers), so it loads."""
    from harness.models import load_model

    folder = wrong_checkpoint(_edit_tensors(DIT_WEIGHTS, lambda s: s.update(spare=torch.zeros(2))))
    with caplog.at_level(logging.WARNING, logger="harness.models"):
        model = load_model("checkpoint", path=folder)
    assert model.transformer.config.num_layers == 2
    assert "checkpoint transformer holds 1 tensors its model does not use (e.g. spare)" in caplog.text


@pytest.mark.unit
@pytest.mark.parametrize("name", ["DiT tensor", "tensor shape", "trailing bytes", "int32 weight", "sharded DiT tensor"])
def test_the_folder_check_names_a_bad_tensor_from_the_headers_alone(wrong_checkpoint, name):
    """Read from the safetensors headers and the configs, before any weight loads (57 GB take minutes)."""
    from harness.models import check_checkpoint_folder

    edit, needle = WRONG_CHECKPOINTS[name]
    folder = wrong_checkpoint(edit)
    with pytest.raises(HarnessError) as caught:
        check_checkpoint_folder(folder)
    message = str(caught.value)
    assert "\n" not in message and needle in message and message.startswith(str(folder / "transformer"))
    assert message.endswith(("copy the component again", "copy the file again", "copy it again"))


@pytest.mark.unit
def test_a_tied_embedding_may_be_stored_under_either_name(wrong_checkpoint):
    """UMT5's shared.weight and encoder.embed_tokens.weight are one tensor: a checkpoint holding only the second
    passes the check and loads it as the first."""
    from safetensors.torch import load_file

    from harness.models import check_checkpoint_folder, load_model

    def rename(state):
        state["encoder.embed_tokens.weight"] = state.pop("shared.weight")

    folder = wrong_checkpoint(_edit_tensors("text_encoder/model.safetensors", rename))
    assert check_checkpoint_folder(folder) == folder
    stored = load_file(folder / "text_encoder" / "model.safetensors")["encoder.embed_tokens.weight"]
    assert torch.equal(load_model("checkpoint", path=folder).text_encoder.shared.weight, stored)


@pytest.mark.parametrize("name", ["DiT tensor", "trailing bytes"])
def test_a_bad_tensor_stops_pytest_once_before_any_case(wrong_checkpoint, tmp_path, name):
    edit, needle = WRONG_CHECKPOINTS[name]
    folder = wrong_checkpoint(edit)
    proc = pytest_session(tmp_path, "-m", "parity", "--model-source=checkpoint", f"--model-path={folder}")
    assert_one_usage_error(proc, needle)


def test_a_single_expert_checkpoint_stops_pytest_once(wrong_checkpoint, tmp_path):
    folder = wrong_checkpoint(_edit_json("model_index.json", transformer_2=[None, None]))
    proc = pytest_session(tmp_path, "-m", "parity", "--model-source=checkpoint", f"--model-path={folder}")
    assert_one_usage_error(proc, "needs the two-expert A14B layout (Wan2.2-T2V-A14B)")


# --- shapes: the loaded model's positional table decides ---

@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory) -> Path:
    """A held-out-like checkpoint of other dimensions: 3 heads x 16, 3 layers, text width 24, a WordLevel
    tokenizer, and a positional table of 64 per axis in its transformer configs."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    from harness.models import TINY_TRANSFORMER, TINY_VAE, TOKENIZER_CORPUS, make_scheduler

    torch.manual_seed(0)
    words = sorted(set(TOKENIZER_CORPUS.replace(",", " ").replace(".", " ").lower().split()))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    dit = {**TINY_TRANSFORMER, "num_attention_heads": 3, "attention_head_dim": 16, "text_dim": 24, "num_layers": 3,
           "ffn_dim": 40, "rope_max_seq_len": 64}
    text = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=24, d_kv=8, d_ff=40, num_layers=2, num_heads=3,
                                       relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"))
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text, vae=AutoencoderKLWan(**TINY_VAE),
                       scheduler=make_scheduler(), transformer=WanTransformer3DModel(**dit),
                       transformer_2=WanTransformer3DModel(**dit), boundary_ratio=0.875)
    folder = tmp_path_factory.mktemp("odd-checkpoint")
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.unit
def test_a_shape_past_the_tiny_table_is_refused(capsys, tmp_path):
    line = cli_error(["generate", "--prompt", "x", "--shape", "16x528x1", "--out", str(tmp_path / "v.mp4")], capsys)
    assert "rope_max_seq_len is 32" in line and "width <= 512" in line


@pytest.mark.unit
def test_a_checkpoints_own_table_decides(odd_checkpoint, capsys, tmp_path):
    line = cli_error(["generate", "--prompt", "x", "--model-source", "checkpoint", "--model-path", str(odd_checkpoint),
                      "--shape", "16x1088x1", "--out", str(tmp_path / "v.mp4")], capsys)
    assert "checkpoint transformer DiT's rope_max_seq_len is 64" in line and "width <= 1024" in line
    accepted = settings_from({"model_source": "checkpoint", "model_path": str(odd_checkpoint), "shapes": "16x1024x1"})
    assert accepted.shapes[0].width == 1024  # past the tiny model's 512, within this checkpoint's table


@pytest.mark.unit
def test_the_odd_checkpoint_generates_a_video(odd_checkpoint, tmp_path):
    from harness.video import read_mp4

    out = tmp_path / "odd.mp4"
    assert main(["generate", "--prompt", "a cat walks on the grass", "--model-source", "checkpoint", "--model-path",
                 str(odd_checkpoint), "--shape", "32x48x5", "--steps", "2", "--out", str(out)]) == 0
    assert read_mp4(out).shape == (5, 32, 48, 3)


@pytest.mark.unit
def test_a_spec_starting_with_a_dash_gets_the_shape_error(capsys):
    line = cli_error(["shapes", "-480x832x81"], capsys)
    assert "shape -480x832x81" in line and "must be positive" in line


# --- the CLI's own options ---

@pytest.mark.unit
@pytest.mark.parametrize("argv, needle", [
    (["--steps", "0"], "--steps 0 must be a whole number from 1 to 1000"),
    (["--steps", "-1"], "--steps -1 must be a whole number from 1 to 1000"),
    (["--model-source", "proxy", "--proxy-layers", "0"], "--proxy-layers 0 must be a whole number >= 1"),
    (["--precision", "fp8", "--backend", "torch"], "has no fp8 path (it runs fp32, fp16, bf16); fp8 runs on "
                                                   "--backend torch-fp8"),
    (["--seed", str(2 ** 64)], "--seed 18446744073709551616 must be from 0 to 2**63 - 1"),
    (["--shape", "16x16x9,32x32x9"], "--shape '16x16x9,32x32x9': generate takes one shape"),
    (["--steps", "two"], "argument --steps: invalid int value: 'two'"),
])
def test_generate_refuses_bad_options(argv, needle, capsys, tmp_path):
    assert needle in cli_error(["generate", "--prompt", "x", "--out", str(tmp_path / "v.mp4"), *argv], capsys)


@pytest.mark.unit
@pytest.mark.parametrize("argv, needle", [
    (["generate", "--prompt", "x", "--out", "clip.avi"], "--out clip.avi: the video is written as H.264 in an mp4"),
    (["export", "--precision", "fp8", "--component", "vae_decoder"], "--precision fp8 quantizes the DiT experts only"),
    (["export", "--precision", "fp64"], "--precision: unknown precision 'fp64'"),
    (["build", "--opt-level", "9"], "--opt-level 9: TensorRT's builder optimization levels are 0 to 5"),
    (["build", "--precision", "fp8", "--fp8-recipe", "nvidia"], "--fp8-recipe nvidia keeps blocks 0-2"),
    (["shapes", "99999x99999x9"], "height 99999 exceeds 2048"),
    (["shapes", "16x16x1019"], "frames 1019 is not 4k+1: Wan's VAE needs 4k+1 frames; try 1017 or 1021"),
    (["shapes", "16x16x1022"], "frames 1022 exceeds 1021"),
    (["shapes", "16x16x9", "--steps", "99999999"], "--steps 99999999 must be a whole number from 1 to 1000"),
])
def test_a_command_refuses_what_it_would_ignore_or_choke_on(argv, needle, capsys, tmp_path):
    cache = ["--cache-dir", str(tmp_path)] if argv[0] in ("export", "build") else []
    assert needle in cli_error([*argv, *cache], capsys)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the command gets as far as building a session (and with it, a model)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a Session was built: the bad path was not refused up front")

    monkeypatch.setattr("harness.session.Session", refuse)


@pytest.mark.unit
def test_generate_into_an_existing_folder_is_refused_and_leaves_nothing(capsys, tmp_path, no_model):
    line = cli_error(["generate", "--prompt", "x", "--out", str(tmp_path)], capsys)
    assert "is a folder" in line and list(tmp_path.iterdir()) == []


READ_ONLY = 0o555


@pytest.mark.unit
@pytest.mark.parametrize("out, needle", [
    ("a-file/video.mp4", "a-file is a file, not a folder; give another path"),
    ("a-file/deeper/video.mp4", "a-file is a file, not a folder; give another path"),
    # /proc exists and os.access calls it writable for root, yet no folder can be made in it.
    ("/proc/wan-nowhere/video.mp4", "cannot make a folder in /proc (No such file or directory); give a folder you "
                                    "can write to"),
    pytest.param("read-only/new/video.mp4", "read-only (Permission denied); give a folder you can write to",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")),
])
def test_generate_into_a_folder_it_cannot_write_is_one_line_before_any_model(out, needle, capsys, tmp_path,
                                                                              no_model):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "read-only").mkdir(mode=READ_ONLY)
    before = sorted(tmp_path.rglob("*"))
    line = cli_error(["generate", "--prompt", "x", "--out", str(tmp_path / out)], capsys)
    assert line.startswith(f"error: --out {tmp_path / out}: ") and needle in line, line
    assert sorted(tmp_path.rglob("*")) == before  # the probe left nothing behind


@pytest.mark.unit
def test_generate_makes_the_missing_folders_of_out(tmp_path):
    out = tmp_path / "new" / "deeper" / "video.mp4"
    assert main(["generate", "--prompt", "x", "--steps", "1", "--out", str(out)]) == 0
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["video.mp4"]


@pytest.mark.unit
def test_a_long_prompt_is_truncated_with_one_warning(caplog):
    from harness.models import load_model
    from harness.pipeline import tokenize

    model = load_model("tiny")
    prompt = " ".join(["a cat walks on the grass"] * 1000)  # 5,000 words
    with caplog.at_level(logging.WARNING, logger="harness.pipeline"):
        for _ in range(3):
            ids, _ = tokenize(model, [prompt, "a cat"], "cpu")
    (record,) = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert ids.shape[1] == 512 and "512 tokens" in record.getMessage() and "dropped" in record.getMessage()


@pytest.mark.unit
def test_ort_cpu_refusing_bf16_names_the_op_and_type(tmp_path):
    from engines.onnxruntime import OnnxRuntime, refusal
    from harness.backends import BackendOptions
    from harness.components import make_component
    from harness.models import load_model

    component = make_component(load_model("tiny", dtype=torch.bfloat16), "vae_decoder")
    with pytest.raises(BackendUnavailable, match=r"ONNX Runtime CPU does not implement Conv for tensor\(bfloat16\)"):
        OnnxRuntime(BackendOptions(cache_dir=tmp_path)).build(component, Case("vae_decoder", SHAPE, "bf16"))
    ort_words = "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Mul(14) node with name 'm'"
    assert refusal(ort_words, ["CPUExecutionProvider"], tmp_path / "g.onnx") == (
        "ONNX Runtime CPU does not implement Mul (opset 14) for this graph's tensor types (node m)")


# --- whole pytest sessions and bench: one usage error, before any case ---

@pytest.mark.parametrize("option, needle", [
    ("--backends=foo", "--backends: unknown backend 'foo'"),
    ("--candidate=foo", "--candidate: unknown backend 'foo'"),
    ("--precisions=fp4", "--precisions: unknown precision 'fp4'"),
    ("--model-source=proxy --proxy-layers=0", "--proxy-layers 0 must be a whole number >= 1"),
    ("--proxy-layers=3", "--proxy-layers is read by --model-source proxy only"),
    ("--steps=-1", "--steps -1 must be a whole number from 1 to 1000"),
    ("--perf-rounds=0", "--perf-rounds 0 must be a whole number >= 1"),
    ("--shapes=16x528x1", "rope_max_seq_len is 32"),
    ("--engine-weights=none", "--engine-weights 'none': choose one of stripped, full, inputs"),
    ("--fp8-scales=dynamic", "--fp8-scales 'dynamic': choose one of row, static"),
    ("--backends=torch,onnxruntime --fp8-scales=static",
     "--fp8-scales static: no backend among --backends torch,onnxruntime reads it; add one of torch-fp8"),
    ("--backends=torch,onnxruntime --compile-scope=forward",
     "--compile-scope forward: no backend among --backends torch,onnxruntime reads it; add one of inductor"),
    ("--compile-scope=model", "--compile-scope 'model': choose one of blocks, forward"),
    ("--fp8-recipe=middle", "--fp8-recipe 'middle': choose one of all-blocks, nvidia"),
    ("--backends=torch --fp8-recipe=nvidia", "--fp8-recipe nvidia: no backend among --backends torch reads it; add "
                                             "one of torch-fp8, modelopt, tensorrt, tensorrt_rtx"),
    ("--model-source=proxy --proxy-layers=6 --fp8-recipe=nvidia", "an expert of 6 layers would quantize nothing; "
                                                                  "use --fp8-recipe all-blocks"),
    ("--backends=torch,onnxruntime --precisions=fp8", "--precisions fp8: no backend among --backends"),
    ("--scale-layers=-3", "--scale-layers -3 must be a whole number >= 1"),
    ("--model-path=/nowhere", "--model-path is read by --model-source checkpoint only"),
    # /proc exists and os.access calls it writable for root, yet mkdir fails: only making a folder proves it.
    ("--results-dir=/proc/wan-results", "--results-dir /proc/wan-results: cannot make a folder in /proc"),
    ("--cache-dir=/proc/wan-cache", "--cache-dir /proc/wan-cache: cannot make a folder in /proc"),
])
def test_a_bad_option_stops_pytest_once(tmp_path, option, needle):
    assert_one_usage_error(pytest_session(tmp_path, "-m", "parity", *option.split()), needle)


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "harness", "bench", f"--results-dir={tmp_path / 'results'}",
                f"--cache-dir={tmp_path / 'cache'}", *args])


@pytest.mark.parametrize("late", [["--steps", "0"], ["--shapes=32x32x9"]])
def test_bench_refuses_run_options_after_the_separator(tmp_path, late):
    # After --, a run option would override the one bench checked, unchecked, and its summary path would be wrong.
    proc = bench(tmp_path, "--", *late)
    assert proc.returncode == 2 and f"{late[0]} comes after --" in proc.stderr, proc.stdout + proc.stderr
    assert "passed" not in proc.stdout and "summary" not in proc.stdout and not (tmp_path / "results").exists()


def test_bench_takes_checkpoint_options_as_its_own(tiny_checkpoint, tmp_path):
    proc = bench(tmp_path, "--model-source", "checkpoint", f"--model-path={tiny_checkpoint}", "--shapes", "32x48x5",
                 "--backends", "torch,onnxruntime", "--", "-k", "parity and text_encoder and fp32")
    summary = tmp_path / "results" / "run-bad-input" / "summary.md"
    assert proc.returncode == 0 and f"summary: {summary}" in proc.stdout, proc.stdout[-3000:] + proc.stderr
    text = summary.read_text()
    assert "| text_encoder-checkpoint-32x48x5-fp32-b1 | onnxruntime |" in text
    header = next(line for line in text.splitlines() if line.startswith("| case"))  # the parity table's
    assert " case_peak_host_gib |" in header and "| verdict " in header  # each case's peak beside its verdict
    # The TorchScript export of the text encoder warns about aten::index; pytest.ini filters it.
    assert "warnings summary" not in proc.stdout and "Warning:" not in proc.stdout + proc.stderr


def test_bench_with_no_rows_prints_no_summary_path(tmp_path):
    proc = bench(tmp_path, "--backends", "torch", "--", "-k", "no_case_has_this_name")
    assert "no rows were recorded" in proc.stdout and "summary:" not in proc.stdout
    assert not (tmp_path / "results" / "run-bad-input" / "summary.md").exists()


def test_export_labels_cases_and_table_with_the_checkpoint_and_shape(tiny_checkpoint, tmp_path):
    proc = pytest_session(tmp_path, "-m", "export", "--model-source=checkpoint", f"--model-path={tiny_checkpoint}",
                          "--shapes=32x48x5", "--precisions=fp32", "-k", "test_export_check_and_trt_build and "
                          "text_encoder", "-v", "cases/test_export.py")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "text_encoder-checkpoint-32x48x5-fp32-b1" in proc.stdout
    table = (tmp_path / "results" / "run-bad-input" / "export-cpu.md").read_text()
    assert table.startswith("# ONNX export and TensorRT-RTX build (checkpoint source, 32x48x5)")
    assert "| text_encoder | fp32 | static |" in table and "| text_encoder | fp32 | dynamic |" in table


def _nan_weights(expert: str):
    """A checkpoint whose `expert` computes NaN: its output projection's weights are NaN, and nothing checks values
    before they run."""
    return _edit_tensors(f"{expert}/diffusion_pytorch_model.safetensors",
                         lambda s: s.update({"proj_out.weight": torch.full_like(s["proj_out.weight"], math.nan)}))


@pytest.mark.unit
def test_nan_weights_stop_generate_at_the_step_and_expert_in_one_line(wrong_checkpoint, capsys, tmp_path):
    """Not an all-black video and exit 0: the low-noise expert first runs at step 3 of 4 (t = 999, 900 | 750, 500)."""
    folder = wrong_checkpoint(_nan_weights("transformer_2"))
    out = tmp_path / "v.mp4"
    code = main(["generate", "--prompt", "x", "--model-source", "checkpoint", "--model-path", str(folder),
                 "--shape", "16x16x9", "--steps", "4", "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # after the progress bar's lines
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: the denoising loop's latents became non-finite at step 3 (of 4) after the "
                                "transformer_2 expert (t=750): "), err
    assert not out.exists()


def test_nan_weights_fail_a_loop_case_with_its_one_line(wrong_checkpoint, tmp_path):
    folder = wrong_checkpoint(_nan_weights("transformer"))
    proc = pytest_session(tmp_path, "-m", "parity", "--model-source=checkpoint", f"--model-path={folder}",
                          "--shapes=16x16x9", "--backends=torch", "--precisions=fp32,bf16", "--steps=2",
                          "-k", "test_denoising_loop_parity", "cases/test_parity.py")
    output = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED and "1 failed" in output, output[-3000:]
    report = re.search(r"_ test_denoising_loop_parity\[torch-bf16\] _+\n(.*?)\n=+ short test summary", output, re.S)
    assert report and report[1].startswith("error: the denoising loop's latents became non-finite at step 1 (of 2) "
                                           "after the transformer expert (t=999): "), output[-3000:]
    assert "\n" not in report[1] and "Traceback" not in output, report[1]  # the one line, no traceback


@pytest.mark.perf
def test_a_nan_expert_gets_no_speed_up(wrong_checkpoint, tmp_path):
    """Timing a model that computes NaN would report a speed-up of garbage: the perf case fails instead."""
    folder = wrong_checkpoint(_nan_weights("transformer"))
    proc = pytest_session(tmp_path, "-m", "perf", "--model-source=checkpoint", f"--model-path={folder}",
                          "--shapes=16x16x9", "--backends=torch,onnxruntime", "--precisions=fp32", "--perf-rounds=1",
                          "-k", "test_speed and transformer and not transformer_2")
    output = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED and "1 failed" in output, output[-3000:]
    assert "non-finite values; no time is recorded" in output, output[-3000:]
