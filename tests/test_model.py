"""The tiny model end to end: encode geometry, batched == single, encoders once, LoRA scale; tasks
into requests (one function for every generator), the engine factory and the HF-or-vLLM rule, and
the vLLM engine's memory plan (a pure function: no vLLM needed here)."""

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

    def spy(speech_embeds, prompts, settings, **kwargs):
        seen.append((speech_embeds.shape[0], settings))
        return original(speech_embeds, prompts, settings, **kwargs)

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


# --- tasks -> requests, one function for every generator ---------------------------------------
def test_task_requests_task_major_with_the_speech_gate(embeds):
    from salmonn.prompts import answers_by_task, task_requests

    a, b = GenerationSettings(max_new_tokens=3), GenerationSettings(max_new_tokens=3, num_beams=2)
    tasks = [Task("x", PROMPTS[0], a), Task("y", PROMPTS[1], b), Task("z", PROMPTS[2], a)]
    everything = task_requests(embeds[:3], tasks)
    assert [(r.task, r.row) for r in everything] == [(t, i) for t in "xyz" for i in range(3)]
    assert all(torch.equal(r.speech, embeds[r.row]) for r in everything)
    assert [(r.prompt, r.settings) for r in everything[3:6]] == [(PROMPTS[1], b)] * 3
    gated = task_requests(embeds[:3], tasks, [tasks, [tasks[1]], []])   # row 2: nothing
    assert [(r.task, r.row) for r in gated] == [("x", 0), ("y", 0), ("y", 1), ("z", 0)]
    assert answers_by_task(tasks, gated, ["x0", "y0", "y1", "z0"]) == {"x": ["x0"], "y": ["y0", "y1"], "z": ["z0"]}
    assert answers_by_task(tasks, [], []) == {"x": [], "y": [], "z": []}
    with pytest.raises(ValueError, match="unique"):
        task_requests(embeds, [tasks[0], tasks[0]])
    with pytest.raises(ValueError, match="row_tasks"):
        task_requests(embeds[:3], tasks, [tasks])


def test_model_engine_and_requests_give_the_same_answers(tiny_model, embeds):
    """Salmonn.generate_tasks, HfEngine.generate_tasks and HfEngine.generate on task_requests are
    one path: same answers, and the HF engine batches tasks of equal settings together."""
    from salmonn.engines import build_engine, task_requests

    a, b = GenerationSettings(max_new_tokens=5), GenerationSettings(max_new_tokens=5, lora_scale=0.0)
    tasks = [Task("x", PROMPTS[0], a), Task("y", PROMPTS[1], b), Task("z", PROMPTS[2], a)]
    engine = build_engine("hf", tiny_model, tasks)
    want = tiny_model.generate_tasks(embeds[:3], tasks)
    assert engine.generate_tasks(embeds[:3], tasks) == want
    requests = task_requests(embeds[:3], tasks)
    assert engine.generate(requests) == [g for t in "xyz" for g in want[t]]
    assert engine.generated_tokens == 2 * sum(g.n_tokens for gens in want.values() for g in gens)
    alone = {t.name: [tiny_model.generate(embeds[i : i + 1], [t.prompt], t.settings)[0] for i in range(3)]
             for t in tasks}
    assert want == alone
    with pytest.raises(TypeError, match="no options"):
        build_engine("hf", tiny_model, tasks, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="engine must be one of"):
        build_engine("vllm2", tiny_model, tasks)


def test_one_rule_says_what_runs_on_hf():
    from salmonn.engines import llm_weights, runs_on_hf

    greedy, beams, penalty = (GenerationSettings(), GenerationSettings(num_beams=4),
                              GenerationSettings(repetition_penalty=1.2))
    assert not runs_on_hf(greedy) and runs_on_hf(beams) and runs_on_hf(penalty)
    assert runs_on_hf(beams, penalty_on_vllm=True) and not runs_on_hf(penalty, penalty_on_vllm=True)
    # the predictor asks the same rule before the engine exists (the model runner is not known)
    assert llm_weights("vllm", [Task("a", PROMPTS[0], greedy)]) == "embeddings"
    assert llm_weights("vllm", [Task("a", PROMPTS[0], greedy), Task("b", PROMPTS[1], penalty)]) == "full"
    assert llm_weights("vllm", [Task("a", PROMPTS[0], beams)]) == "full"
    assert llm_weights("hf", [Task("a", PROMPTS[0], greedy)]) == "full"
    with pytest.raises(ValueError, match="engine must be one of"):
        llm_weights("auto", [])


# --- the vLLM engine's memory --------------------------------------------------------------------
GIB = 1 << 30


def _need(weights_gib: float, per_token: int, max_model_len: int = 2048, max_num_seqs: int = 256):
    from salmonn.engines.memory import LlmFootprint

    return LlmFootprint(weights_bytes=int(weights_gib * GIB), kv_bytes_per_token=per_token,
                        max_model_len=max_model_len, max_num_seqs=max_num_seqs)


def test_cpu_memory_needs_no_share_of_the_machine():
    """The machine where `--engine vllm` failed every run: 21.67 of 23.59 GiB available, vLLM's
    default wanting 0.92 x 23.59 = 21.7 GiB. The plan sets the KV cache, vLLM's share check is
    skipped, and it holds with 3 GiB more taken by something else."""
    from salmonn.engines.memory import plan_memory

    tiny = _need(0.01, per_token=2 * 2 * 64 * 4)   # 2 layers x K,V x 64 wide x fp32
    for available in (21.67, 18.67):
        plan = plan_memory("cpu", total_bytes=int(23.59 * GIB), available_bytes=int(available * GIB), need=tiny)
        assert plan.engine_args() == {"kv_cache_memory_bytes": plan.kv_cache_bytes}
        assert plan.kv_cache_bytes == 256 * 2048 * 1024 == tiny.kv_default_bytes   # 0.5 GiB: wanted, and fits
        assert plan.gpu_memory_utilization is None and not plan.asked
    # a 7B in bf16 on a 64 GiB machine: the wanted 256 GiB is capped at half of what is left
    seven = _need(12.6, per_token=2 * 32 * 4096 * 2)
    plan = plan_memory("cpu", total_bytes=64 * GIB, available_bytes=60 * GIB, need=seven)
    left = 60 * GIB - (1 << 30) - seven.weights_bytes
    assert plan.kv_cache_bytes <= left // 2 and plan.kv_cache_bytes > left // 2 - (1 << 20)
    assert plan.kv_cache_bytes >= seven.kv_min_bytes
    # little left: the minimum (one max-length sequence in whole blocks) rather than a failure
    plan = plan_memory("cpu", total_bytes=64 * GIB, available_bytes=int(14.8 * GIB), need=seven)
    assert plan.kv_cache_bytes == seven.kv_min_bytes == 2048 * 2 * 32 * 4096 * 2


def test_memory_that_does_not_fit_is_one_clear_line():
    from salmonn.engines.memory import plan_memory

    seven = _need(12.6, per_token=2 * 32 * 4096 * 2)
    with pytest.raises(MemoryError) as info:
        plan_memory("cpu", total_bytes=16 * GIB, available_bytes=13 * GIB, need=seven)
    text = str(info.value)
    assert "\n" not in text and "weights 12.60 GiB" in text and "RAM available is 13.00 of 16.00 GiB" in text
    with pytest.raises(MemoryError, match="GPU memory free is 20.00 of 80.00 GiB"):
        plan_memory("cuda", total_bytes=80 * GIB, available_bytes=20 * GIB, need=_need(24.2, per_token=819200))
    # a size asked for is taken as asked, or refused when it cannot fit or cannot hold one sequence
    plan = plan_memory("cpu", total_bytes=24 * GIB, available_bytes=20 * GIB, need=seven, kv_cache_bytes=3 * GIB)
    assert plan.asked and plan.engine_args() == {"kv_cache_memory_bytes": 3 * GIB}
    with pytest.raises(MemoryError, match="KV cache 8.00 GiB"):
        plan_memory("cpu", total_bytes=24 * GIB, available_bytes=20 * GIB, need=seven, kv_cache_bytes=8 * GIB)
    with pytest.raises(MemoryError, match="less than one sequence of max_model_len=2048"):
        plan_memory("cpu", total_bytes=24 * GIB, available_bytes=20 * GIB, need=seven, kv_cache_bytes=GIB // 2)


def test_gpu_share_from_need_and_free_memory():
    from salmonn.engines.memory import GPU_ACTIVATION_BYTES, GPU_RESERVE_BYTES, plan_memory

    # 13B in fp16 on an 80 GiB GPU, 76 GiB free once the encoders are loaded: the KV cache it
    # wants (256 x 2048 tokens, 400 GiB) is capped by what is free less the encoders' reserve
    thirteen = _need(24.2, per_token=2 * 40 * 5120 * 2)
    plan = plan_memory("cuda", total_bytes=80 * GIB, available_bytes=76 * GIB, need=thirteen)
    budget = plan.gpu_memory_utilization * 80 * GIB
    assert plan.engine_args() == {"gpu_memory_utilization": plan.gpu_memory_utilization}
    assert 76 * GIB - GPU_RESERVE_BYTES - 0.001 * 80 * GIB <= budget <= 76 * GIB - GPU_RESERVE_BYTES
    assert budget >= thirteen.weights_bytes + thirteen.kv_min_bytes + GPU_ACTIVATION_BYTES
    # a small LLM takes what it needs, not the whole GPU: a second engine still fits beside it
    small = _need(1.0, per_token=2 * 16 * 2048 * 2, max_model_len=1024, max_num_seqs=64)
    plan = plan_memory("cuda", total_bytes=80 * GIB, available_bytes=76 * GIB, need=small)
    need = small.weights_bytes + small.kv_default_bytes + GPU_ACTIVATION_BYTES
    assert need - 0.001 * 80 * GIB <= plan.gpu_memory_utilization * 80 * GIB <= need
    assert plan.gpu_memory_utilization < 0.2


def test_asked_kv_cache_size(monkeypatch):
    from salmonn.engines.memory import KV_ENV, asked_kv_cache_bytes

    monkeypatch.delenv(KV_ENV, raising=False)
    assert asked_kv_cache_bytes("cpu") is None
    assert asked_kv_cache_bytes("cpu", {"kv_cache_memory_bytes": 5 << 20}) == 5 << 20
    monkeypatch.setenv(KV_ENV, "3")   # vLLM applies it over the engine argument on CPU
    assert asked_kv_cache_bytes("cpu", {"kv_cache_memory_bytes": 5 << 20}) == 3 * GIB
    assert asked_kv_cache_bytes("cuda") is None
    for bad in ("0", "1.5"):
        monkeypatch.setenv(KV_ENV, bad)
        with pytest.raises(ValueError, match=KV_ENV):
            asked_kv_cache_bytes("cpu")


def test_llm_footprint_of_the_tiny_model(tiny_model, tiny_parts):
    from salmonn.checkpoint import build_salmonn
    from salmonn.engines.memory import llm_footprint

    full = llm_footprint(tiny_model.llm, 4, max_model_len=None, max_num_seqs=256)
    dims = tiny_model.config.llm
    base = sum(p.numel() for n, p in tiny_model.llm.named_parameters() if ".lora_" not in n)
    assert full.weights_bytes == 4 * base and base > 2 * dims.vocab_size * dims.hidden
    assert full.kv_bytes_per_token == 2 * dims.layers * dims.hidden * 4
    assert full.max_model_len == dims.max_positions
    # an embeddings-only LLM (weights on the meta device) has the same footprint
    light = build_salmonn(tiny_parts[1], "cpu", llm="embeddings")
    assert not light.has_full_llm
    assert llm_footprint(light.llm, 4, max_model_len=None, max_num_seqs=256).weights_bytes == full.weights_bytes
    split = llm_footprint(tiny_model.llm, 2, max_model_len=512, max_num_seqs=8, tensor_parallel_size=2)
    assert split.weights_bytes == base and split.kv_bytes_per_token == dims.layers * dims.hidden * 2
    assert split.max_model_len == 512
