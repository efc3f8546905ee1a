"""The fp8 sensitivity report (harness/sensitivity.py): each layer family and each block of a quantized DiT expert
fp8 alone, through the `modelopt` backend's simulation (fake quantization, any device), on the held-out loop's
inputs, against the eager bf16 expert; a ranked CSV and a plot per expert in the run folder.

The measurement case runs when the run asks for it (modelopt among --backends, fp8 among --precisions), at the
run's shapes and --fp8-recipe; at the tiny source's 16x16x9 (3 tokens) static scales from the calibration prompts do
not cover the held-out ones, so ask for 128x128x9 there. The structure case always runs, on the tiny source.
"""
from __future__ import annotations

import csv
import dataclasses
import functools

import pytest

from harness.case import DIT_COMPONENTS, Case
from harness.recipes import block_index
from harness.sensitivity import FAMILIES, Sensitivity, family_of, matmul_flops, measure
from harness.session import Session
from harness.settings import settings_from
from harness.shapes import parse_shape

pytestmark = pytest.mark.sensitivity


def report(session: Session, case: Case) -> Sensitivity:
    """The sensitivity of `case` (an fp8 DiT expert) under the session's --fp8-recipe, on every held-out loop call."""
    from engines.modelopt import enabled_quantizers, quantized_module, quantizing_only
    from harness.cache import DiskCache

    session.backend("modelopt")  # unavailable (ModelOpt not importable): skips with why
    options = session.settings.backend_options
    recipe = options.fp8_recipe
    component = session.component(case)
    module, _ = quantized_module(component, case, DiskCache(session.settings.cache_dir), recipe=recipe,
                                 prompts=options.calibration_prompts)
    count = len(session.held_out_loop(case))
    calls = [session.inputs(case, seed, loop=True) for seed in range(count)]
    eager = [session.output("torch", case.with_precision("bf16"), seed, loop=True) for seed in range(count)]
    return measure(module, functools.partial(quantizing_only, module), enabled_quantizers(module), calls, eager,
                   matmul_flops(component.module, calls[0]), f"{case.id}, --fp8-recipe {recipe}")


def check(sensitivity: Sensitivity, calls: int) -> None:
    """What every report holds: zero error with nothing quantized, a nonzero one for the recipe and each family,
    every quantizer in one family and one block, each ranked list in order."""
    none, every = sensitivity.part("none"), sensitivity.part("all")
    assert none.errors == (0.0,) * calls, "with every quantizer off the ModelOpt copy must compute the eager forward"
    assert len(every.errors) == calls and every.mean > 0
    families = [p for p in sensitivity.parts if p.kind == "family"]
    blocks = [p for p in sensitivity.parts if p.kind == "block"]
    assert families and all(p.mean > 0 for p in families), [(p.name, p.mean) for p in families]
    assert sum(p.quantizers for p in families) == sum(p.quantizers for p in blocks) == every.quantizers
    for ranked in (families, blocks):
        assert [p.mean for p in ranked] == sorted((p.mean for p in ranked), reverse=True)
    assert all(0 < p.flop_share <= every.flop_share <= 1 and p.est_slowdown_if_bf16 > 0 for p in families + blocks)
    assert sensitivity.est_matmul_speedup > 1


@pytest.mark.parametrize("component", DIT_COMPONENTS)
def test_fp8_sensitivity_report(component, shape, session):
    s = session.settings
    if "modelopt" not in s.backends or "fp8" not in s.precisions:
        pytest.skip("the sensitivity report runs the modelopt backend's fp8 simulation: add modelopt to --backends "
                    "and fp8 to --precisions (e.g. --backends torch,modelopt --precisions fp8)")
    case = Case(component, shape, "fp8", source=s.source)
    sensitivity = report(session, case)
    check(sensitivity, len(sensitivity.timesteps))
    sensitivity.write(session.recorder.path, f"sensitivity-{case.id}")
    session.record("parity", dataclasses.replace(case, variant="sensitivity"), "modelopt", sensitivity)


def test_the_tiny_report_ranks_every_family_and_block_and_writes_its_table_and_plot(session, tmp_path):
    """On the tiny source at 128x128x9: ModelOpt quantizes every linear of the width-24 DiT (torch-fp8 none of
    them), so all four families and both blocks show, each with its own error."""
    tiny = Session(settings_from({"backends": "torch,modelopt", "precisions": "fp8", "shapes": "128x128x9",
                                  "device": "cpu", "cache_dir": str(session.settings.cache_dir)}))
    case = Case("transformer", parse_shape("128x128x9"), "fp8")
    sensitivity = report(tiny, case)
    check(sensitivity, 8)  # 2 held-out prompts x 2 steps of this expert x 2 CFG branches
    assert sorted(sensitivity.timesteps) == [900] * 4 + [999] * 4
    assert {p.name for p in sensitivity.parts if p.kind == "family"} == set(FAMILIES)
    assert {p.name for p in sensitivity.parts if p.kind == "block"} == {"block 0", "block 1"}
    assert family_of("transformer.blocks.1.attn1.softmax_quantizer") == "self_attn_fp8"
    assert block_index("transformer.blocks.1.attn2.to_k.input_quantizer") == 1
    table, plot = sensitivity.write(tmp_path, "sensitivity")
    rows = list(csv.DictReader(table.open()))
    assert [r["part"] for r in rows[:2]] == ["none", "all"] and len(rows) == 2 + len(FAMILIES) + 2
    assert {"rel_l2_t999", "rel_l2_t900", "matmul_flop_share", "estimated_slowdown_if_bf16"} <= rows[0].keys()
    assert [r["rank"] for r in rows[2:]] == ["1", "2", "3", "4", "1", "2"]
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert set(sensitivity.metrics()) >= {"sens_all_rel_l2", "sens_ffn_rel_l2", "sens_worst_block"}
