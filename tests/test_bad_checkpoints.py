"""A damaged or wrong checkpoint folder: one line naming the file or tensor, before any case runs; NaN weights
stop generate, a loop case and a perf case in one line."""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from harness.__main__ import main
from harness.errors import HarnessError

from tests.helpers import assert_one_usage_error, cli_error, pytest_session


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


# Each component's weights file and the tensor whose first value turns NaN, and the start of the line that names it:
# the low-noise expert first runs at step 3 of 4 (t = 999, 900 | 750, 500).
NAN_WEIGHTS = {
    "text_encoder": ("text_encoder/model.safetensors", "encoder.final_layer_norm.weight",
                     "error: the text encoder produced non-finite values (NaN or Inf): "),
    "transformer": ("transformer/diffusion_pytorch_model.safetensors", "proj_out.weight",
                    "error: the transformer expert produced non-finite values (NaN or Inf) at step 1 (of 4, t=999): "),
    "transformer_2": ("transformer_2/diffusion_pytorch_model.safetensors", "proj_out.weight",
                      "error: the transformer_2 expert produced non-finite values (NaN or Inf) at step 3 (of 4, "
                      "t=750): "),
    "vae": ("vae/diffusion_pytorch_model.safetensors", "decoder.conv_out.weight",
            "error: the VAE decoder produced non-finite values (NaN or Inf): "),
}


def _nan_weights(component: str):
    """A checkpoint whose `component` computes NaN: one value of one of its weights is NaN, and nothing checks values
    before they run."""
    relative, name, _ = NAN_WEIGHTS[component]
    return _edit_tensors(relative, lambda s: s[name].view(-1).__setitem__(0, math.nan))


@pytest.mark.unit
@pytest.mark.parametrize("component", NAN_WEIGHTS)
def test_nan_weights_stop_generate_at_the_component_in_one_line(wrong_checkpoint, capsys, tmp_path, component):
    """Not an all-black video and exit 0: the line names the component that made the NaN, and no file is written."""
    folder = wrong_checkpoint(_nan_weights(component))
    out = tmp_path / "v.mp4"
    code = main(["generate", "--prompt", "x", "--model-source", "checkpoint", "--model-path", str(folder),
                 "--shape", "16x16x9", "--steps", "4", "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # after the progress bar's lines
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(NAN_WEIGHTS[component][2]), err
    assert not out.exists()


def test_nan_weights_fail_a_loop_case_with_its_one_line(wrong_checkpoint, tmp_path):
    folder = wrong_checkpoint(_nan_weights("transformer"))
    proc = pytest_session(tmp_path, "-m", "parity", "--model-source=checkpoint", f"--model-path={folder}",
                          "--shapes=16x16x9", "--backends=torch", "--precisions=fp32,bf16", "--steps=2",
                          "-k", "test_denoising_loop_parity", "cases/test_parity.py")
    output = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED and "1 failed" in output, output[-3000:]
    report = re.search(r"_ test_denoising_loop_parity\[torch-bf16\] _+\n(.*?)\n=+ short test summary", output, re.S)
    assert report and report[1].startswith("error: the transformer expert produced non-finite values (NaN or Inf) at "
                                           "step 1 (of 2, t=999): "), output[-3000:]
    assert "\n" not in report[1] and "Traceback" not in output, report[1]  # the one line, no traceback


def test_a_session_stopped_by_its_first_failure_is_no_whole_run(wrong_checkpoint, tmp_path):
    """-x after the NaN expert's parity case, the first of four: its rows are in the run folder, which says the run
    was cut short, so that nobody reads the three cases that never ran as passed."""
    from harness.results import SessionEnd, session_end

    folder = wrong_checkpoint(_nan_weights("transformer"))
    proc = pytest_session(tmp_path, "-x", "-m", "parity", "--model-source=checkpoint", f"--model-path={folder}",
                          "--shapes=16x16x9", "--backends=torch", "--precisions=fp32", "-k", "test_component_parity",
                          "cases/test_parity.py")
    run = tmp_path / "results" / "run-bad-input"
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED and "1 failed" in proc.stdout, proc.stdout[-3000:]
    assert session_end(run) == SessionEnd(1, 4, 1)
    assert "**Interrupted after 1 of 4 cases** (pytest exit status 1)" in (run / "summary.md").read_text()


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
