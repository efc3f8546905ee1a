"""The disk cache (harness/cache.py): damaged entries are rebuilt, a killed writer's folder is swept, a damaged
manifest is never served, and a cache folder that cannot be one is a harness error."""
from __future__ import annotations

import json
import logging
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

from engines.tensorrt import engine_spec, profile_from
from harness.cache import MANIFEST, DiskCache, entry_key, file_sha256, spec_hash, sweep_temp_folders
from harness.export import OPSET, default_exporter, export_case, export_spec
from harness.case import Case
from harness.errors import HarnessError
from harness.settings import settings_from
from harness.shapes import parse_shape

from tests.helpers import REPO, cli_error

SHAPE = parse_shape("16x16x9")


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


# --- hits, truncation and key changes of the export and engine caches ---

@pytest.mark.export
def test_second_export_is_a_cache_hit(tiny, tmp_path):
    case, component = tiny
    cache = DiskCache(tmp_path)
    first = export_case(component(), case, cache)
    second = export_case(component(), case, cache)
    assert cache.outcomes("onnx", first.key) == ["miss", "hit"]
    assert second.hit and second.path == first.path and second.fetch_s < first.fetch_s


@pytest.mark.export
def test_truncated_cache_file_is_rebuilt(tiny, tmp_path, caplog):
    case, component = tiny
    cache = DiskCache(tmp_path)
    graph = export_case(component(), case, cache)
    data = graph.path.read_bytes()
    graph.path.write_bytes(data[: len(data) // 3])  # truncated on purpose
    with caplog.at_level(logging.WARNING, logger="harness.cache"):
        again = export_case(component(), case, cache)
    assert cache.outcomes("onnx", graph.key) == ["miss", "rebuild"]
    assert "rebuilding" in caplog.text and "bytes, expected" in caplog.text
    assert again.path.read_bytes() == data


@pytest.mark.export
def test_engine_cache_hit_and_key_changes(tiny, tmp_path):
    from engines.tensorrt import TensorRTRTXBuilder

    case, component = tiny
    cache = DiskCache(tmp_path)
    builder = TensorRTRTXBuilder(cache=cache)
    graph, first = builder.build(component(), case)
    _, second = builder.build(component(), case)
    assert cache.outcomes("engines", first.key) == ["miss", "hit"] and second.hit
    inputs = component().inputs(case)
    names = component().input_names
    static = profile_from(names, [inputs])
    wider = profile_from(names, [inputs, tuple(t[:, :64] for t in inputs)])
    base = engine_spec("tensorrt_rtx", "1.7.1.116", graph.fingerprint, [static])
    fp16 = case.with_precision("fp16")
    fp16_fingerprint = spec_hash(export_spec(component("fp16"), fp16, "tiny-weights", OPSET, default_exporter(fp16),
                                             component("fp16").inputs(fp16)))
    assert fp16_fingerprint != spec_hash(export_spec(component(), case, "tiny-weights", OPSET, default_exporter(case),
                                                     inputs))
    variants = [engine_spec("tensorrt_rtx", "1.7.1.116", graph.fingerprint, [wider]),
                engine_spec("tensorrt_rtx", "1.8.0.0", graph.fingerprint, [static]),
                engine_spec("tensorrt_rtx", "1.7.1.116", fp16_fingerprint, [static])]
    keys = {entry_key(case.id, spec) for spec in [base, *variants]}
    assert len(keys) == 4, "profile, TensorRT version and precision must each change the engine key"
    assert static.static and not wider.static
