"""Checkpoint key map, strict loading, official-format part files, safetensors conversion."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import torch

import salmonn
from salmonn import CheckpointError, SalmonnConfig, build_meta, build_salmonn, build_tiny, load_salmonn_checkpoint
from salmonn.checkpoint import (
    checkpoint_shapes,
    convert_to_safetensors,
    load_beats,
    load_whisper_encoder,
    official_state_dict,
    read_state_dict,
)
from tests.model_fixtures import make_clip, pad_batch

LORA = re.compile(r"^llama_model\.base_model\.model\.model\.layers\.\d+\.self_attn\.(q_proj|v_proj)\.lora_[AB]\.default\.weight$")


@pytest.mark.parametrize(("preset", "n_layers", "hidden"), [("salmonn-13b", 40, 5120), ("salmonn-7b", 32, 4096)])
def test_full_size_key_map(preset, n_layers, hidden):
    shapes = checkpoint_shapes(build_meta(SalmonnConfig.from_name(preset)))
    qformer = [k for k in shapes if k.startswith("speech_Qformer.")]
    lora = [k for k in shapes if k.startswith("llama_model.")]
    assert len(qformer) == 55
    assert "speech_Qformer.bert.embeddings.position_ids" in shapes
    assert shapes["speech_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"] == (768, 2048)
    assert shapes["speech_Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"] == (3072, 768)
    assert shapes["speech_query_tokens"] == (1, 1, 768)
    assert shapes["speech_llama_proj.weight"] == (hidden, 768)
    assert shapes["ln_speech.weight"] == (1280,) and shapes["ln_audio.weight"] == (768,)
    assert len(lora) == 4 * n_layers and all(LORA.match(k) for k in lora)
    assert shapes["llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] == (8, hidden)
    assert shapes["llama_model.base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight"] == (hidden, 8)
    assert len(shapes) == 55 + 1 + 2 + 2 + 2 + 4 * n_layers


def test_round_trip_is_strict_and_exact(tiny_model):
    state = official_state_dict(tiny_model)
    # the official leftovers are in the file ...
    assert "beats.encoder.layers.1.self_attn.relative_attention_bias.weight" in state
    assert "llama_model.base_model.model.model.layers.0.self_attn.rotary_emb.inv_freq" in state
    other = build_tiny(seed=1)
    load_salmonn_checkpoint(other, state)  # ... and accepted
    for key in checkpoint_shapes(tiny_model):
        torch.testing.assert_close(other.state_dict()[key], tiny_model.state_dict()[key], rtol=0, atol=0, msg=key)


def test_renamed_missing_and_unexpected_keys_are_named(tiny_model):
    state = official_state_dict(tiny_model)
    renamed = dict(state)
    renamed["speech_llama_projection.weight"] = renamed.pop("speech_llama_proj.weight")
    with pytest.raises(CheckpointError, match=r"missing keys.*speech_llama_proj\.weight") as err:
        load_salmonn_checkpoint(build_tiny(seed=1), renamed)
    assert "unexpected keys (1): speech_llama_projection.weight" in str(err.value)

    missing = dict(state)
    del missing["llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"]
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.v_proj\.lora_B\.default\.weight"):
        load_salmonn_checkpoint(build_tiny(seed=1), missing)

    no_buffer = dict(state)
    del no_buffer["speech_Qformer.bert.embeddings.position_ids"]  # a buffer, not a learned value
    load_salmonn_checkpoint(build_tiny(seed=1), no_buffer)

    extra = dict(state, **{"beats.encoder.layers.0.fc1.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): beats\.encoder\.layers\.0\.fc1\.weight"):
        load_salmonn_checkpoint(build_tiny(seed=1), extra)

    wrong = dict(state, **{"speech_llama_proj.weight": torch.zeros(7, 128)})
    with pytest.raises(CheckpointError, match=r"speech_llama_proj\.weight: checkpoint \(7, 128\)"):
        load_salmonn_checkpoint(build_tiny(seed=1), wrong)


def test_official_pth_layout(tiny_parts):
    directory, config = tiny_parts
    obj = torch.load(config.checkpoint_path, map_location="cpu", weights_only=True)
    assert set(obj) == {"model", "optimizer", "epoch"}
    beats = torch.load(config.beats_path, map_location="cpu", weights_only=True)
    assert set(beats) == {"cfg", "model"} and beats["cfg"]["deep_norm"] is True
    assert all(f"encoder.layers.{i}.self_attn.relative_attention_bias.weight" in beats["model"] for i in range(2))


def test_parts_load_to_the_same_model(tiny_parts, tiny_model):
    _, config = tiny_parts
    loaded = build_salmonn(config, device="cpu")
    assert loaded.model_id == "tiny-random"
    assert loaded.config.qformer == tiny_model.config.qformer  # dims derived from the files
    assert loaded.config.beats == tiny_model.config.beats
    assert loaded.config.llm.hidden == tiny_model.config.llm.hidden
    wav, lengths = pad_batch([make_clip(30.0, 5), make_clip(2.2, 6)])
    a, b = tiny_model.encode(wav, lengths), loaded.encode(wav, lengths)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    settings = salmonn.GenerationSettings(max_new_tokens=8)
    prompts = ["Please describe the audio.", "Describe the emotion of the speaker in one word."]
    assert tiny_model.generate(a, prompts, settings) == loaded.generate(b, prompts, settings)


def test_whisper_from_conditional_generation_layout(tmp_path, tiny_model):
    """openai/whisper-* hub files use WhisperForConditionalGeneration keys (model.encoder.*)."""
    from transformers import WhisperForConditionalGeneration

    from salmonn.tiny import tiny_whisper_config

    full = WhisperForConditionalGeneration(tiny_whisper_config(tiny_model.config))
    full.model.encoder.load_state_dict(tiny_model.speech_encoder.state_dict())
    full.save_pretrained(tmp_path)
    encoder = load_whisper_encoder(tmp_path, device="cpu", dtype=torch.float32)
    for key, value in tiny_model.speech_encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key


def test_beats_load_is_strict(tmp_path, tiny_parts):
    _, config = tiny_parts
    obj = torch.load(config.beats_path, weights_only=True)
    beats = load_beats(config.beats_path, device="cpu", dtype=torch.float32)
    layers = beats.encoder.layers
    assert layers[1].self_attn.relative_attention_bias is layers[0].self_attn.relative_attention_bias
    del obj["model"]["encoder.layers.1.fc2.bias"]
    torch.save(obj, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.fc2\.bias"):
        load_beats(tmp_path / "broken.pt", device="cpu", dtype=torch.float32)


def test_safetensors_conversion_loads_the_same(tmp_path, tiny_parts, tiny_model):
    _, config = tiny_parts
    beats_st = convert_to_safetensors(config.beats_path, tmp_path / "beats.safetensors")
    # the command line does the same for the SALMONN checkpoint
    cmd = [sys.executable, "-m", "salmonn.checkpoint", "convert", config.checkpoint_path, str(tmp_path / "salmonn.safetensors")]
    subprocess.run(cmd, check=True, capture_output=True)
    state, extras = read_state_dict(beats_st)
    assert extras["cfg"] == torch.load(config.beats_path, weights_only=True)["cfg"]
    converted = dataclasses.replace(
        config, beats_path=str(beats_st), checkpoint_path=str(tmp_path / "salmonn.safetensors")
    )
    model = build_salmonn(converted, device="cpu")
    wav, lengths = pad_batch([make_clip(4.0, 9)])
    torch.testing.assert_close(model.encode(wav, lengths), tiny_model.encode(wav, lengths), rtol=0, atol=0)


def test_missing_file_names_file_and_place(tmp_path, tiny_parts):
    _, config = tiny_parts
    missing = dataclasses.replace(config, checkpoint_path="salmonn_v1.pth", weights_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        build_salmonn(missing, device="cpu")
    assert "salmonn_v1.pth" in str(err.value) and str(tmp_path) in str(err.value)
    no_llm = dataclasses.replace(config, llm_path=str(tmp_path / "vicuna"))
    with pytest.raises(FileNotFoundError, match="vicuna"):
        build_salmonn(no_llm, device="cpu")


def test_pickles_with_objects_need_explicit_trust(tmp_path, tiny_model):
    """weights_only=True refuses arbitrary objects; conversion can opt in for trusted files."""
    import argparse

    path = tmp_path / "with_args.pth"
    torch.save({"model": official_state_dict(tiny_model), "config": argparse.Namespace(lr=3e-5)}, path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        read_state_dict(path)
    out = convert_to_safetensors(path, tmp_path / "ok.safetensors", trust_pickle=True)
    load_salmonn_checkpoint(build_tiny(seed=1), out)


def test_load_model_entry_points(tiny_parts):
    directory, config = tiny_parts
    parts = str(directory / "parts")
    assert salmonn.model_id_for(parts) == "tiny-random"
    model = salmonn.load_model(parts, device="cpu")
    assert model.model_id == "tiny-random" and model.config.checkpoint_path == config.checkpoint_path
    assert salmonn.load_model("tiny", device="cpu").config.name == "tiny"
