"""Configs, speech-token geometry and parameter counts, without weights."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from salmonn import (
    PRESETS,
    GenerationSettings,
    SalmonnConfig,
    build_meta,
    count_parameters,
    model_id_for,
    resolve_precision,
)
from salmonn.prompts import TEMPLATE, builtin_task, default_tasks, split_prompt

log = logging.getLogger(__name__)

# trainable parameters of the official checkpoints: at 12 bytes each (an fp32 weight and two AdamW
# moments) they give 400.0 MB and 362.2 MB, the sizes of salmonn_v1.pth and salmonn_7b_v0.pth
OFFICIAL_TRAINED = {"salmonn-13b": 33_332_992, "salmonn-7b": 30_186_240}


@pytest.mark.parametrize("preset", PRESETS)
def test_speech_tokens_from_config(preset):
    config = SalmonnConfig.from_name(preset)
    assert config.frames_per_window == 17
    assert config.windows_per_clip == 88
    assert config.speech_tokens == 88


@pytest.mark.parametrize(("preset", "hidden"), [("salmonn-13b", 5120), ("salmonn-7b", 4096)])
def test_full_size_shapes_on_meta_device(preset, hidden):
    """The full-size encoders, Q-Former and projection run on meta tensors: 30 s -> 88 x D."""
    model = build_meta(SalmonnConfig.from_name(preset))
    mel = torch.empty(2, 80, 3000, device="meta")  # Whisper input, always 30 s
    fbank = torch.empty(2, 2998, 128, device="meta")  # BEATs fbank of 30 s: 1 + (480000 - 400) // 160 frames
    embeds = model.encode_features(mel, fbank)
    assert embeds.shape == (2, 88, hidden)
    short = model.encode_features(mel, torch.empty(2, 98, 128, device="meta"))  # BEATs sees a 1 s clip
    assert short.shape == (2, 88, hidden)


def test_presets_and_overrides():
    c13 = SalmonnConfig.from_name("salmonn-13b")
    assert (c13.llm.hidden, c13.llm.layers, c13.llm.heads, c13.llm.ffn_dim, c13.llm.vocab_size) == (5120, 40, 40, 13824, 32000)
    assert (c13.whisper.d_model, c13.whisper.layers, c13.whisper.heads, c13.whisper.n_mels) == (1280, 32, 20, 80)
    b = c13.beats
    assert (b.embed_dim, b.encoder_layers, b.encoder_embed_dim, b.encoder_ffn_embed_dim) == (512, 12, 768, 3072)
    assert (b.num_buckets, b.max_distance, b.gru_rel_pos, b.deep_norm, b.layer_norm_first) == (320, 800, True, True, False)
    assert (c13.qformer.layers, c13.qformer.hidden, c13.qformer.encoder_width, c13.qformer.num_queries) == (2, 768, 2048, 1)
    assert c13.lora.scale == 4.0 and c13.lora.targets == ("q_proj", "v_proj")
    assert c13.llm_path == "lmsys/vicuna-13b-v1.1" and c13.checkpoint_path == "salmonn_v1.pth"
    c7 = SalmonnConfig.from_name("salmonn-7b", checkpoint_path="/x/7b.pth")
    assert (c7.llm.hidden, c7.llm.layers, c7.llm.ffn_dim) == (4096, 32, 11008)
    assert c7.llm_path == "lmsys/vicuna-7b-v1.5" and c7.checkpoint_path == "/x/7b.pth"
    assert SalmonnConfig.from_name("tiny").model_id == "tiny-random" == model_id_for("tiny")
    with pytest.raises(ValueError, match="unknown preset"):
        SalmonnConfig.from_name("salmonn-70b")
    with pytest.raises(ValueError, match="numerics"):
        SalmonnConfig.from_name("tiny", numerics="fp8")


def test_generation_defaults():
    s = GenerationSettings()
    assert (s.max_new_tokens, s.num_beams, s.repetition_penalty, s.length_penalty, s.lora_scale) == (200, 1, 1.0, 1.0, 4.0)


def test_official_numerics_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("official", "cpu")
    assert resolve_precision("auto", "cpu").llm_dtype.is_floating_point


@pytest.mark.parametrize("preset", ["salmonn-13b", "salmonn-7b"])
def test_full_size_parameter_counts(preset):
    counts = count_parameters(SalmonnConfig.from_name(preset))
    log.info("%s parameters: %s", preset, counts)
    print(f"\n{preset}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    assert counts["trained"] == OFFICIAL_TRAINED[preset]
    assert counts["whisper_encoder"] == 636_784_640  # whisper-large-v2 encoder
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("trained", "total"))


def test_prompts():
    assert TEMPLATE == "USER: <Speech><SpeechHere></Speech> {}\nASSISTANT:"
    assert builtin_task("caption").prompt == "Please describe the audio."
    assert builtin_task("transcribe").prompt == "Recognize the speech and give me the transcription."
    assert builtin_task("emotion").prompt == "Describe the emotion of the speaker in one word."
    assert [t.name for t in default_tasks()] == ["caption", "transcribe", "emotion"]
    assert split_prompt(" Please describe the audio. ") == ("USER: <Speech>", "</Speech> Please describe the audio.\nASSISTANT:")


def test_salmonn_imports_no_ray():
    code = "import sys, salmonn, salmonn.checkpoint, salmonn.tiny; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
