"""The tiny model end to end: encode geometry, batched == single, encoders once, LoRA scale."""

from __future__ import annotations

import collections

import pytest
import torch

from salmonn import GenerationSettings, Task
from salmonn.prompts import split_prompt
from tests.model_fixtures import CLIP_SECONDS, make_clip, pad_batch

PROMPTS = (
    "Please describe the audio.",
    "Recognize the speech and give me the transcription.",
    "Describe the emotion of the speaker in one word.",
)


def _tasks(settings: GenerationSettings) -> list[Task]:
    return [Task(name=f"t{i}", prompt=p, settings=settings) for i, p in enumerate(PROMPTS)]


def test_encode_geometry(tiny_model, embeds):
    assert embeds.shape == (len(CLIP_SECONDS), 88, tiny_model.config.llm.hidden)
    long = tiny_model.encode(make_clip(45.0, 0)[None])  # cut to 30 s
    assert long.shape == (1, 88, tiny_model.config.llm.hidden)


def test_batched_encode_equals_single(embeds, single_embeds):
    for i, single in enumerate(single_embeds):
        torch.testing.assert_close(embeds[i : i + 1], single, rtol=0, atol=1e-5, msg=f"clip {i}")


def test_beats_sees_the_unpadded_clip(tiny_model):
    clip = make_clip(7.3, 4)
    padded = torch.nn.functional.pad(clip, (0, 480000 - clip.numel()))[None]
    alone = tiny_model.encode(clip[None])
    as_window = tiny_model.encode(padded, torch.tensor([clip.numel()]))
    as_30s_audio = tiny_model.encode(padded)  # the zeros count as audio: BEATs sees 30 s
    torch.testing.assert_close(as_window, alone, rtol=0, atol=1e-5)
    assert not torch.allclose(as_30s_audio, alone, atol=1e-3)


def test_prompt_layout(tiny_model, embeds):
    tok = tiny_model.tokenizer
    inputs, mask = tiny_model.prompt_inputs(embeds[:2], [PROMPTS[0], PROMPTS[1]])
    table = tiny_model.llm.get_input_embeddings().weight
    for row, prompt in enumerate(PROMPTS[:2]):
        before, after = split_prompt(prompt)
        ids_before = [1, *tok(before, add_special_tokens=False).input_ids]
        ids_after = tok(after, add_special_tokens=False).input_ids
        assert tok.convert_ids_to_tokens(ids_after)[0].startswith("▁")  # sentencepiece dummy prefix, as official
        n = len(ids_before) + 88 + len(ids_after)
        assert mask[row].sum() == n and not mask[row, : mask.shape[1] - n].any()  # left padding
        x = inputs[row, mask.shape[1] - n :]
        assert torch.equal(x[: len(ids_before)], table[ids_before])
        assert torch.equal(x[len(ids_before) : len(ids_before) + 88], embeds[row])
        assert torch.equal(x[len(ids_before) + 88 :], table[ids_after])


@pytest.mark.parametrize("num_beams", [1, 4])
def test_batched_generation_equals_single(tiny_model, embeds, single_embeds, num_beams):
    """Windows encoded together and generated as one left-padded batch == each alone, token for token."""
    settings = GenerationSettings(max_new_tokens=10, num_beams=num_beams)
    batched = tiny_model.generate_tasks(embeds, _tasks(settings))  # 6 windows x 3 prompts, one call
    outputs = set()
    for i, alone in enumerate(single_embeds):
        for t, prompt in enumerate(PROMPTS):
            (single,) = tiny_model.generate(alone, [prompt], settings)
            assert batched[f"t{t}"][i] == single, f"window {i}, prompt {t}, beams {num_beams}"
            outputs.add(single.token_ids)
    assert len(outputs) > 6, "the tiny model should not answer everything alike"


def test_sequences_stop_individually(tiny_model, embeds):
    """Make EOS likely (EOS takes the logit row of a frequent token): rows stop at different steps."""
    settings = GenerationSettings(max_new_tokens=12)
    first = tiny_model.generate_tasks(embeds, _tasks(settings))
    counts = collections.Counter(t for gens in first.values() for g in gens for t in g.token_ids)
    frequent = counts.most_common(1)[0][0]
    head = tiny_model.llm.get_output_embeddings().weight
    saved = head[2].clone()
    try:
        with torch.no_grad():
            head[2] = head[frequent] * 1.05
        batched = tiny_model.generate_tasks(embeds, _tasks(settings))
        reasons = {g.finish_reason for gens in batched.values() for g in gens}
        assert reasons == {"stop", "length"}
        lengths = {g.n_tokens for gens in batched.values() for g in gens if g.finish_reason == "stop"}
        assert len(lengths) > 1, "rows should stop at different steps"
        for t, prompt in enumerate(PROMPTS):
            for i in range(embeds.shape[0]):
                (single,) = tiny_model.generate(embeds[i : i + 1], [prompt], settings)
                assert batched[f"t{t}"][i] == single
                assert 2 not in single.token_ids
                if single.finish_reason == "length":
                    assert single.n_tokens == settings.max_new_tokens
    finally:
        with torch.no_grad():
            head[2] = saved


def test_text_is_decoded_without_special_tokens(tiny_model, embeds):
    (g,) = tiny_model.generate(embeds[:1], [PROMPTS[0]], GenerationSettings(max_new_tokens=6))
    assert g.text == tiny_model.tokenizer.decode(list(g.token_ids), skip_special_tokens=True).strip()


def test_three_tasks_run_each_encoder_once_per_window(tiny_model, clips):
    calls = collections.defaultdict(list)
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: calls[name].append(args[0].shape[0]))
        for name, module in [
            ("whisper", tiny_model.speech_encoder),
            ("beats", tiny_model.beats),
            ("qformer", tiny_model.speech_Qformer),
        ]
    ]
    try:
        wav, lengths = pad_batch(clips)
        results = tiny_model.run_tasks(wav, lengths, _tasks(GenerationSettings(max_new_tokens=4)))
    finally:
        for h in hooks:
            h.remove()
    n = len(clips)
    assert calls["whisper"] == [n] and calls["beats"] == [n]  # one pass, one row per window
    assert calls["qformer"] == [n * 88]
    assert {k: len(v) for k, v in results.items()} == {"t0": n, "t1": n, "t2": n}


def test_tasks_with_different_settings_are_grouped(tiny_model, embeds, monkeypatch):
    seen = []
    original = tiny_model.generate

    def spy(speech_embeds, prompts, settings):
        seen.append((speech_embeds.shape[0], settings))
        return original(speech_embeds, prompts, settings)

    monkeypatch.setattr(tiny_model, "generate", spy)
    a, b = GenerationSettings(max_new_tokens=3), GenerationSettings(max_new_tokens=3, lora_scale=2.0)
    tasks = [Task("x", PROMPTS[0], a), Task("y", PROMPTS[1], b), Task("z", PROMPTS[2], a)]
    out = tiny_model.generate_tasks(embeds, tasks)
    assert list(out) == ["x", "y", "z"]
    assert seen == [(2 * embeds.shape[0], a), (embeds.shape[0], b)]
    with pytest.raises(ValueError, match="unique"):
        tiny_model.generate_tasks(embeds, [tasks[0], tasks[0]])


def _logits(model, embeds):
    inputs, mask = model.prompt_inputs(embeds, [PROMPTS[0]] * embeds.shape[0])
    with torch.inference_mode():
        return model.llm(inputs_embeds=inputs, attention_mask=mask).logits


def test_lora_scale(tiny_model, embeds):
    e = embeds[:3]
    scales_before = [dict(m.scaling) for m in _lora_layers(tiny_model)]
    with tiny_model.llama_model.disable_adapter():
        bare = _logits(tiny_model, e)
    with tiny_model.lora_scale(0.0):
        zero = _logits(tiny_model, e)
    assert torch.equal(zero, bare), "LoRA scale 0 must be exactly the LLM without adapters"
    full = _logits(tiny_model, e)
    assert not torch.allclose(full, bare, atol=1e-3), "the tiny LoRA weights must matter"
    with tiny_model.lora_scale(2.0):
        half = _logits(tiny_model, e)
    assert not torch.allclose(half, full, atol=1e-3)
    assert torch.equal(_logits(tiny_model, e), full), "the scale must be restored after the call"
    assert [dict(m.scaling) for m in _lora_layers(tiny_model)] == scales_before

    settings = GenerationSettings(max_new_tokens=8)
    default = tiny_model.generate(e, [PROMPTS[0]] * 3, settings)
    at_zero = tiny_model.generate(e, [PROMPTS[0]] * 3, GenerationSettings(max_new_tokens=8, lora_scale=0.0))
    with tiny_model.llama_model.disable_adapter():
        without = tiny_model.generate(e, [PROMPTS[0]] * 3, settings)
    assert at_zero == without
    assert at_zero != default
    assert tiny_model.generate(e, [PROMPTS[0]] * 3, settings) == default


def _lora_layers(model):
    from salmonn.model import lora_layers

    return lora_layers(model.llama_model)


def test_tokenizer_matches_sentencepiece(tiny_model):
    """The HF tokenizer (the path Vicuna's tokenizer.model takes) gives sentencepiece's own ids."""
    import sentencepiece as spm

    from salmonn.prompts import OFFICIAL_PROMPTS
    from salmonn.tiny import tiny_tokenizer_dir

    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir() / "tokenizer.model"))
    tok = tiny_model.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    for prompt in OFFICIAL_PROMPTS.values():
        for part in split_prompt(prompt):
            assert tok(part, add_special_tokens=False).input_ids == sp.encode(part), part


def test_bf16_runs_and_stays_close(tiny_model):
    """The GPU default dtype, exercised on CPU: same structure, embeddings close to fp32."""
    from salmonn import build_tiny

    model = build_tiny(seed=0, dtype=torch.bfloat16)
    assert model.llm.model.rotary_emb.inv_freq.dtype == torch.float32  # not rounded to bf16
    clip = make_clip(3.0, 7)[None]
    e16 = model.encode(clip)
    assert e16.dtype == torch.bfloat16 and e16.shape == (1, 88, model.config.llm.hidden)
    e32 = tiny_model.encode(clip)
    cos = torch.nn.functional.cosine_similarity(e16.float().flatten(), e32.flatten(), dim=0)
    assert cos > 0.99
    (g,) = model.generate(e16, [PROMPTS[0]], GenerationSettings(max_new_tokens=4))
    assert g.n_tokens == 4 or g.finish_reason == "stop"
