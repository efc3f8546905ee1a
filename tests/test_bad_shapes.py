"""Shapes a model cannot run: the loaded model's positional table decides, in one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.__main__ import main
from harness.settings import settings_from

from tests.helpers import cli_error


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
