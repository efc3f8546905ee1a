"""Calibrated static scales through one cache (harness/calibration.py), with the real torch-fp8 observers and ModelOpt
on the tiny model: a hit runs no eager loop, a damaged entry is rebuilt with one log line, the key follows what the
scales depend on, the two backends' entries stay apart, and `harness calibrate` fills the cache or exits 2.

The tiny DiT runs at 128x128x9: quantized cases need it there (harness/thresholds.toml [parity.int8]). Its linears
are 24 wide, none fit for torch-fp8's fp8 matmuls, so torch-fp8's entry for it holds no scales; the observers
themselves are proved in tests/test_backends.py.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import shutil

import pytest
import torch

import harness.components
import harness.models
from engines import modelopt, torch_fp8
from harness.cache import DiskCache, entry_key
from harness.calibration import CALIBRATIONS, calibration_entry
from harness.case import Case
from harness.components import dit_component, make_component, seeded_loop
from harness.models import TINY_TRANSFORMER, load_expert, load_model, random_fingerprint
from harness.results import RunRecorder
from harness.session import Session
from harness.settings import settings_from
from harness.shapes import parse_shape
from tests.helpers import cli_error

pytestmark = pytest.mark.unit
SHAPE = parse_shape("128x128x9")
CASE = Case("transformer", SHAPE, "fp8")


@pytest.fixture(autouse=True)
def modelopt_ready():
    reason = modelopt.modelopt_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def loops(monkeypatch) -> list:
    """Every eager loop capture, counted (one capture serves both experts)."""
    made = []
    real = harness.components.capture_loop

    def counted(*args, **kwargs):
        made.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(harness.components, "capture_loop", counted)
    return made


def expert(name: str = "transformer"):
    """An expert of a fresh tiny bf16 model: nothing of an earlier test's loop is remembered for it."""
    return make_component(load_model("tiny", dtype=torch.bfloat16), name)


@pytest.mark.parametrize("calibrate", [modelopt.calibrate, torch_fp8.calibrate], ids=["modelopt", "torch-fp8"])
def test_a_second_calibration_is_a_hit_and_runs_no_loop(calibrate, loops, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="harness.calibration"):
        first = calibrate(expert(), CASE, DiskCache(tmp_path))
        assert len(loops) == 1 and not first.hit and "cache miss" in caplog.text
        again = calibrate(expert(), CASE, DiskCache(tmp_path))  # a new session: a new model, a new cache object
    assert len(loops) == 1, "a hit ran the eager loop"
    assert again.hit and again.path == first.path and "cache hit" in caplog.text
    assert CALIBRATIONS[-1].outcome == "hit" and CALIBRATIONS[-1].made_s == first.value["made_s"]
    assert again.value["scales"].keys() == first.value["scales"].keys()


def truncate(entry, other) -> None:
    scales = entry / "scales.pt"
    scales.write_bytes(scales.read_bytes()[: scales.stat().st_size // 2])


def same_size_garbage(entry, other) -> None:
    scales = entry / "scales.pt"
    scales.write_bytes(bytes(255 - b for b in scales.read_bytes()))


def another_models(entry, other) -> None:
    """The folder of another model's entry (another init recipe), copied in under this entry's name."""
    shutil.rmtree(entry)
    shutil.copytree(other, entry)


@pytest.mark.parametrize("damage, reason", [(truncate, "bytes, expected"), (same_size_garbage, "has sha256"),
                                            (another_models, "written for another spec")])
def test_a_damaged_entry_is_rebuilt_with_one_log_line(damage, reason, monkeypatch, tmp_path, caplog):
    cache = DiskCache(tmp_path)
    first = modelopt.calibrate(expert(), CASE, cache)
    monkeypatch.setattr(harness.models, "INIT_RECIPE", "another-init")
    other = modelopt.calibrate(expert(), CASE, cache)
    monkeypatch.undo()
    assert other.path != first.path
    damage(first.path, other.path)
    with caplog.at_level(logging.WARNING):
        again = modelopt.calibrate(expert(), CASE, cache)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("harness")]
    assert len(warnings) == 1 and reason in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert cache.outcomes("calibration", first.path.name) == ["miss", "rebuild"] and not again.hit
    assert CALIBRATIONS[-1].outcome == "rebuild"
    assert modelopt.calibrate(expert(), CASE, cache).hit, "the rebuilt entry serves the next lookup"


def key(component, case=CASE, settings=None, prompts=None) -> str:
    return entry_key(*calibration_entry("modelopt-fp8", component, case, settings or {"recipe": "all-blocks"}, prompts))


def test_the_key_follows_shape_prompts_recipe_and_init_recipe_without_running_the_loop(loops, monkeypatch):
    component = expert()
    base = key(component)
    assert key(expert()) == base, "another build of the same model has the same key"
    assert key(component, dataclasses.replace(CASE, shape=parse_shape("64x64x9"))) != base
    assert key(component, prompts=1) != base and key(component, prompts=3) == base, "3 is every calibration prompt"
    assert key(component, settings={"recipe": "nvidia"}) != base
    assert key(expert("transformer_2")) != base
    monkeypatch.setattr(harness.models, "INIT_RECIPE", "seeded-normal-next")
    assert key(expert()) != base, "the init recipe is read where the model's fingerprints are made"
    assert loops == [], "a key needs no loop"


def test_the_recipe_and_the_prompts_reach_the_key_through_the_backends(tmp_path):
    """An 8-layer tiny-width expert (the nvidia recipe keeps blocks 0-2 and 5-7 high) on seeded stand-in calls."""
    eight = load_expert(8, device="cpu", dtype=torch.bfloat16, config=TINY_TRANSFORMER)
    component = dit_component(eight, random_fingerprint({**TINY_TRANSFORMER, "num_layers": 8}, 0))
    component = dataclasses.replace(component, loop_inputs=seeded_loop(component, 2))
    cache = DiskCache(tmp_path)
    entries = {(recipe, prompts): modelopt.calibrate(component, CASE, cache, recipe=recipe, prompts=prompts).path
               for recipe in ("all-blocks", "nvidia") for prompts in (1, 3)}
    assert len(set(entries.values())) == 4


def test_torch_fp8_and_modelopt_keep_entries_of_their_own(tmp_path):
    component, cache = expert(), DiskCache(tmp_path)
    fp8 = torch_fp8.calibrate(component, CASE, cache)
    simulated = modelopt.calibrate(component, CASE, cache)
    assert fp8.path != simulated.path
    assert fp8.path.name.startswith("torch-fp8-static-") and simulated.path.name.startswith("modelopt-fp8-")
    assert fp8.value["scales"] == {}, "the tiny DiT's linears are 24 wide: none runs fp8 matmuls"
    assert set(simulated.value["scales"]) == {"modelopt_state", "buffers"}
    assert torch_fp8.calibrate(component, CASE, cache).hit and modelopt.calibrate(component, CASE, cache).hit


def test_fewer_prompts_calibrate_on_fewer_calls(tmp_path):
    component, cache = expert(), DiskCache(tmp_path)
    one, every = (modelopt.calibrate(component, CASE, cache, prompts=p).value for p in (1, None))
    assert (one["prompts"], every["prompts"]) == (1, 3) and every["forwards"] == 3 * one["forwards"]


def test_a_case_that_calibrated_records_the_time_with_hit_or_miss(tmp_path):
    settings = settings_from({"backends": "torch,modelopt", "precisions": "fp8", "shapes": "128x128x9",
                              "device": "cpu", "cache_dir": str(tmp_path / "cache"), "results_dir": str(tmp_path)})
    for outcome in ("miss", "hit"):
        recorder = RunRecorder(tmp_path, f"run-{outcome}")
        session = Session(settings, recorder)
        session.record("parity", CASE, "modelopt", session.parity("modelopt", CASE))
        rows = {r["metric"]: r for r in csv.DictReader((recorder.path / "parity.csv").open())}
        assert float(rows["calibration_s_transformer"]["value"]) > 0
        assert f"modelopt-fp8: cache {outcome}" in rows["calibration_s_transformer"]["note"]


@pytest.mark.parametrize("argv, needle", [
    (["--backends", "torch"], "calibrate no static scales"),
    (["--backends", "torch,modelopt", "--precisions", "bf16"], "calibrate no static scales"),
    (["--backends", "modelopt", "--calibration-prompts", "4"], "--calibration-prompts 4: choose one of 3, 2, 1"),
    (["--backends", "torch", "--calibration-prompts", "1"], "no backend among --backends torch reads it"),
    (["--backends", "modelopt", "--shapes", "100x100x9"], "multiple of 16"),
])
def test_calibrate_exits_2_on_bad_input(argv, needle, tmp_path, capsys):
    assert needle in cli_error(["calibrate", "--cache-dir", str(tmp_path), *argv], capsys)


def test_calibrate_fills_the_cache_and_says_hit_or_miss(tmp_path, capsys):
    from harness.__main__ import main

    argv = ["calibrate", "--backends", "modelopt,tensorrt_rtx", "--precisions", "fp8", "--shapes", "128x128x9",
            "--calibration-prompts", "1", "--cache-dir", str(tmp_path)]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()
    assert main(argv) == 0
    second = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in first[:2]] == ["miss", "miss"], first
    assert [line.split()[0] for line in second[:2]] == ["hit", "hit"], second
    assert all("(for modelopt, tensorrt_rtx)" in line and "-p1-" in line for line in first[:2])
    assert len(list((tmp_path / "calibration").iterdir())) == 2
