"""SALMONN: audio -> speech embeddings -> LLM text, with the official module tree.

    speech_encoder      transformers WhisperEncoder (frozen)
    beats               salmonn.beats.Beats (frozen)
    ln_speech, ln_audio LayerNorms on each encoder's output (trained)
    speech_Qformer      window-level Q-Former (trained)
    speech_query_tokens (1, Q, C) learned queries (trained)
    speech_llama_proj   Linear C -> D (trained)
    llama_model         peft PeftModel around a LlamaForCausalLM, LoRA on q_proj/v_proj (trained)

The encoders run once per window (`encode`); the LLM then answers any number of prompts about
the same embeddings (`generate`, `generate_tasks`) in batched, left-padded generation.
Loading lives in `salmonn.checkpoint`; this module only computes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import GenerationSettings, SalmonnConfig
from .features import beats_fbank, whisper_log_mel
from .prompts import Request, Task, answers_by_task, split_prompt, task_requests
from .qformer import WindowQformer
from .text import clean_text

logger = logging.getLogger(__name__)

# Engines call the tokenizer from several threads (a vLLM engine's callers); a fast tokenizer
# refuses concurrent use ("Already borrowed") when a call changes its settings. Held for
# microseconds per prompt or answer.
_TOKENIZER_LOCK = threading.Lock()

FINISH_STOP = "stop"  # the model emitted EOS
FINISH_LENGTH = "length"  # max_new_tokens reached


@dataclass(frozen=True)
class Generation:
    """One answer. `token_ids` are the generated tokens without EOS."""

    text: str  # control characters other than newline and tab removed (salmonn.text)
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" | "length"
    dropped_controls: int = 0  # control characters the decoded tokens held, not in `text`

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Precision:
    """Dtypes the model runs in. See `resolve_precision`."""

    encoder_dtype: torch.dtype  # Whisper, BEATs, LayerNorms, Q-Former, projection
    llm_dtype: torch.dtype  # LLaMA base weights
    lora_dtype: torch.dtype  # LoRA A/B weights
    autocast_dtype: torch.dtype | None = None  # CUDA autocast around everything (official: fp16)
    fbank_dtype: torch.dtype = torch.float32  # precision of the BEATs fbank (official: float64)
    attn_implementation: str = "sdpa"  # HF attention for Whisper and LLaMA (official: eager)


def resolve_precision(numerics: str, device: torch.device | str, dtype: torch.dtype | None = None) -> Precision:
    """auto: bf16 on CUDA, fp32 elsewhere; fp32/bf16: everything in that dtype; official: the
    reference numerics (fp16 LLM weights, fp32 encoders and LoRA, fp16 autocast), CUDA only.
    `dtype`, if given, overrides auto/fp32/bf16."""
    device = torch.device(device)
    if numerics == "official":
        if device.type != "cuda":
            raise ValueError("numerics='official' runs under CUDA fp16 autocast and needs a CUDA device")
        if dtype is not None:
            raise ValueError("numerics='official' fixes its own dtypes; do not pass dtype")
        return Precision(
            encoder_dtype=torch.float32,
            llm_dtype=torch.float16,
            lora_dtype=torch.float32,
            autocast_dtype=torch.float16,
            fbank_dtype=torch.float64,
            attn_implementation="eager",
        )
    if dtype is None:
        if numerics == "fp32":
            dtype = torch.float32
        elif numerics == "bf16":
            dtype = torch.bfloat16
        else:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Precision(encoder_dtype=dtype, llm_dtype=dtype, lora_dtype=dtype)


def finish_generation(tokenizer: Any, ids: Sequence[int], eos: int) -> Generation:
    """A `Generation` from an engine's generated ids (EOS and what follows it cut off): every
    engine decodes through here, so the same ids give the same text whichever engine made them."""
    ids = list(ids)
    if eos in ids:
        ids, reason = ids[: ids.index(eos)], FINISH_STOP
    else:
        reason = FINISH_LENGTH
    with _TOKENIZER_LOCK:
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
    text, dropped = clean_text(decoded)
    return Generation(text=text.strip(), token_ids=tuple(ids), finish_reason=reason, dropped_controls=dropped)


class EngineDeadError(RuntimeError):
    """A generation engine stopped working (its own fault, not a request's): every later call fails
    too, so the process should build a new one (an actor is restarted). Never an out-of-memory
    error in the sense of `is_out_of_memory`, even when running out of memory killed it."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an accelerator running out of memory (a batch too big for it), as
    opposed to a fault of the input or the model."""
    if isinstance(err, EngineDeadError):
        return False  # a smaller batch will not bring a dead engine back
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def lora_layers(llama_model: nn.Module) -> list[Any]:
    """The peft LoraLayer modules inside ``llama_model``."""
    from peft.tuners.lora import LoraLayer

    return [m for m in llama_model.modules() if isinstance(m, LoraLayer)]


def place(model: Salmonn, device: torch.device | str, precision: Precision) -> Salmonn:
    """Move the model to `device` with the dtypes of `precision` (LoRA may differ from the LLM)."""
    model.precision = precision
    for name, module in model.named_children():
        if name != "llama_model":
            module.to(device=device, dtype=precision.encoder_dtype)
    model.speech_query_tokens = nn.Parameter(
        model.speech_query_tokens.detach().to(device, precision.encoder_dtype), requires_grad=False
    )
    # LLM: cast parameters only. Module.to(dtype) would also round the fp32 rotary inv_freq
    # buffer; and LoRA keeps its own dtype (fp32 in the official numerics). Tensors left on the
    # meta device (an embeddings-only LLM's layers) stay there.
    with torch.no_grad():
        for name, param in model.llama_model.named_parameters():
            if not param.is_meta:
                param.data = param.data.to(device, precision.lora_dtype if ".lora_" in name else precision.llm_dtype)
        for module in model.llama_model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if not buffer.is_meta:
                    setattr(module, name, buffer.to(device))  # dtype unchanged
    return model.eval().requires_grad_(False)


class Salmonn(nn.Module):
    """The SALMONN model. Build it with `salmonn.checkpoint.build_salmonn` or `salmonn.tiny.build_tiny`."""

    def __init__(
        self,
        config: SalmonnConfig,
        *,
        speech_encoder: nn.Module,
        beats: nn.Module,
        llama_model: nn.Module,
        tokenizer=None,
        precision: Precision | None = None,
    ):
        super().__init__()
        self.config = config
        self.precision = precision or Precision(torch.float32, torch.float32, torch.float32)
        self.tokenizer = tokenizer  # needed by generate; None for meta-device builds
        q = config.qformer
        self.speech_encoder = speech_encoder
        self.ln_speech = nn.LayerNorm(config.whisper.d_model)
        self.beats = beats
        self.ln_audio = nn.LayerNorm(config.beats.encoder_embed_dim)
        self.speech_Qformer = WindowQformer(q)
        self.speech_query_tokens = nn.Parameter(torch.zeros(1, q.num_queries, q.hidden))
        nn.init.normal_(self.speech_query_tokens, std=0.02)
        self.speech_llama_proj = nn.Linear(q.hidden, config.llm.hidden)
        # the peft PeftModel: typed Any (get_base_model, generate are not nn.Module methods)
        self.llama_model: Any = llama_model

    # --- properties --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.speech_llama_proj.weight.device

    @property
    def model_id(self) -> str:
        return self.config.model_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 2

    @property
    def has_full_llm(self) -> bool:
        """Whether the LLM has all its weights (False for an embeddings-only build)."""
        return not any(p.is_meta for p in self.llama_model.parameters())

    @property
    def llm(self) -> Any:
        """The LlamaForCausalLM inside peft (LoRA layers injected, not merged)."""
        return self.llama_model.get_base_model()

    def _autocast(self):
        if self.precision.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.autocast_dtype)

    # --- audio -> speech embeddings -----------------------------------------------------------
    @torch.inference_mode()
    def encode(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Speech embeddings (B, W*Q, D) for 16 kHz mono float32 windows (B, N) of true `lengths`.

        Clips are cut to 30 s; clips under 1 s are zero-padded to 1 s. Each encoder runs once
        on the whole batch. Every clip gives `config.speech_tokens` vectors (88 official).
        """
        return self.encode_features(*self.features(waveforms, lengths))

    @torch.inference_mode()
    def encode_with_whisper(
        self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode`, and Whisper's own encoder output (B, 1500, Cw) before `ln_speech`: what
        Whisper's decoder reads (`salmonn.whisper_text`), from the same single encoder pass."""
        return self.encode_features_with_whisper(*self.features(waveforms, lengths))

    def features(
        self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Whisper log-mel (B, 80, 3000), BEATs fbank (B, F, 128), true fbank frames (B,)) on the
        model's device. Outside autocast: the official front ends run in fp32/fp64."""
        wav = waveforms.to(self.device, torch.float32)
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=self.device)
        mel = whisper_log_mel(wav, lengths, n_mels=self.config.whisper.n_mels)
        fbank, frames = beats_fbank(wav, lengths, n_mels=self.config.beats.n_mels, dtype=self.precision.fbank_dtype)
        return mel, fbank, frames

    @torch.inference_mode()
    def encode_features(
        self, mel: torch.Tensor, fbank: torch.Tensor, frames: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Both encoders, LayerNorms, windowed Q-Former and projection -> (B, W*Q, D).

        `frames` are the true fbank frame counts of right-padded clips (None: no padding)."""
        return self.encode_features_with_whisper(mel, fbank, frames)[0]

    @torch.inference_mode()
    def encode_features_with_whisper(
        self, mel: torch.Tensor, fbank: torch.Tensor, frames: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(speech embeddings (B, W*Q, D), Whisper's encoder output (B, 1500, Cw) before `ln_speech`)."""
        dtype = self.precision.encoder_dtype
        with self._autocast():
            whisper_out = self.speech_encoder(mel.to(dtype)).last_hidden_state  # (B, 1500, Cw)
            speech = self.ln_speech(whisper_out)
            audio, padding = self.beats(fbank.to(dtype), frames)  # (B, Tb, Cb), (B, Tb)
            audio = self.ln_audio(audio).masked_fill(padding[..., None], 0.0)  # as if zero-padded alone
            x = join_streams(speech, audio)  # (B, T, Cw + Cb)
            windows = split_windows(x, self.config.frames_per_window)  # (B*W, K, C)
            query = self.speech_query_tokens.expand(windows.shape[0], -1, -1)  # (B*W, Q, Cq)
            out = self.speech_Qformer(query.to(windows.dtype), windows)  # (B*W, Q, Cq)
            embeds = self.speech_llama_proj(out)  # (B*W, Q, D)
        return embeds.reshape(x.shape[0], -1, embeds.shape[-1]), whisper_out  # (B, W*Q, D), (B, 1500, Cw)

    # --- speech embeddings + prompts -> text --------------------------------------------------
    def prompt_parts(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The text embeddings around the speech rows for `prompt`: ((Lb, D), (La, D)).

        [BOS] + tok("USER: <Speech>") before, tok("</Speech> {prompt}\\nASSISTANT:") after, each
        text part tokenized on its own without special tokens (official prompt_wrap).
        """
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer (meta-device build?)")
        embed_tokens = self.llm.get_input_embeddings()
        device = embed_tokens.weight.device
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else 1
        before, after = split_prompt(prompt)
        with _TOKENIZER_LOCK:
            ids_before = [bos, *self.tokenizer(before, add_special_tokens=False).input_ids]
            ids_after = self.tokenizer(after, add_special_tokens=False).input_ids
        return (
            embed_tokens(torch.tensor(ids_before, device=device)),  # (Lb, D)
            embed_tokens(torch.tensor(ids_after, device=device)),  # (La, D)
        )

    @torch.inference_mode()
    def prompt_rows(self, speech_embeds: torch.Tensor, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Each row's LLM input without padding: [(L_i, D)], the rows `prompt_inputs` pads.

        Row i is prompt_parts(prompts[i])[0] + speech_embeds[i] (W*Q, D) + prompt_parts(prompts[i])[1];
        each distinct prompt is tokenized and embedded once.
        """
        if speech_embeds.shape[0] != len(prompts):
            raise ValueError(f"{speech_embeds.shape[0]} speech rows but {len(prompts)} prompts")
        weight = self.llm.get_input_embeddings().weight
        speech_embeds = speech_embeds.to(weight.device, weight.dtype)
        parts = {prompt: self.prompt_parts(prompt) for prompt in dict.fromkeys(prompts)}
        return [torch.cat([parts[p][0], speech, parts[p][1]]) for p, speech in zip(prompts, speech_embeds)]

    def prompt_inputs(self, speech_embeds: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM inputs (B, L, D) and attention mask (B, L), left-padded.

        Row i is [BOS] + tok("USER: <Speech>") + speech_embeds[i] + tok("</Speech> {prompt}\\nASSISTANT:"),
        each text part tokenized on its own without special tokens (official prompt_wrap); the
        same rows as `prompt_rows`, here padded on the left.
        """
        if speech_embeds.shape[0] != len(prompts):
            raise ValueError(f"{speech_embeds.shape[0]} speech rows but {len(prompts)} prompts")
        weight = self.llm.get_input_embeddings().weight
        device, dtype = weight.device, weight.dtype
        # Rows that share a prompt share its text embeddings: tokenize and embed each distinct
        # prompt once, then fill all of its rows with a few indexed copies (no per-row loop).
        rows_of: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            rows_of.setdefault(prompt, []).append(i)
        parts = {prompt: self.prompt_parts(prompt) for prompt in rows_of}
        n, s, d = speech_embeds.shape
        length = max(b.shape[0] + s + a.shape[0] for b, a in parts.values())
        embeds = torch.zeros(n, length, d, device=device, dtype=dtype)  # (B, L, D)
        mask = torch.zeros(n, length, device=device, dtype=torch.long)  # (B, L)
        speech_embeds = speech_embeds.to(device, dtype)
        for prompt, rows in rows_of.items():
            before, after = parts[prompt]
            start = length - (before.shape[0] + s + after.shape[0])  # left padding of these rows
            mid, end = start + before.shape[0], start + before.shape[0] + s
            contiguous = rows[-1] - rows[0] + 1 == len(rows)  # generate_tasks' rows are task-major
            idx = slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=device)
            embeds[idx, start:mid] = before  # broadcast over the rows
            embeds[idx, mid:end] = speech_embeds[idx]
            embeds[idx, end:] = after
            mask[idx, start:] = 1
        return embeds, mask

    @contextlib.contextmanager
    def lora_scale(self, scale: float) -> Iterator[None]:
        """Set peft's LoRA scaling for the duration of a call, then restore it.

        No weights are copied or merged; scale 0 is exactly the bare LLM (the LoRA term is
        multiplied by 0.0 and added).
        """
        layers = lora_layers(self.llama_model)
        saved = [dict(layer.scaling) for layer in layers]
        try:
            for layer in layers:
                for adapter in layer.scaling:
                    layer.scaling[adapter] = float(scale)
            yield
        finally:
            for layer, scaling in zip(layers, saved):
                layer.scaling.update(scaling)

    def _generation_config(self, settings: GenerationSettings):
        from transformers import GenerationConfig

        tok = self.tokenizer
        eos = self.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.unk_token_id or 0)
        beam = settings.num_beams > 1
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            num_beams=settings.num_beams,
            do_sample=False,
            repetition_penalty=settings.repetition_penalty,
            length_penalty=settings.length_penalty if beam else 1.0,
            early_stopping=False,
            bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else 1,
            eos_token_id=eos,
            pad_token_id=pad,
            use_cache=True,
        )

    @torch.inference_mode()
    def generate(
        self,
        speech_embeds: torch.Tensor,
        prompts: Sequence[str],
        settings: GenerationSettings = GenerationSettings(),
        *,
        exact_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """Answer prompts[i] about speech_embeds[i] (B, W*Q, D), all rows in one batched call.

        `exact_new_tokens` (benchmarks: answers of set lengths, the same on every engine): row i
        generates exactly that many tokens, EOS suppressed (`settings.max_new_tokens` is ignored);
        a row that is done waits, padded, for the batch's longest, as static batches do.
        """
        if len(prompts) == 0:
            return []
        if not self.has_full_llm:
            raise RuntimeError("this model's LLM holds only its input embeddings (llm='embeddings'): "
                               "generate with a VllmEngine, or load the full LLM")
        embeds, mask = self.prompt_inputs(speech_embeds, prompts)
        config = self._generation_config(settings)
        extra: dict[str, Any] = {}
        if exact_new_tokens is not None:
            if len(exact_new_tokens) != len(prompts) or min(exact_new_tokens) < 1:
                raise ValueError("exact_new_tokens needs one length >= 1 per prompt")
            config.max_new_tokens = max(exact_new_tokens)
            config.suppress_tokens = [config.eos_token_id]   # rows stop at their length, never at EOS
            extra["stopping_criteria"] = [_row_lengths(exact_new_tokens)]
        with self.lora_scale(settings.lora_scale), self._autocast():
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config, **extra)
        # with inputs_embeds only, HF returns just the new tokens: (B, <= max_new_tokens)
        if exact_new_tokens is not None:
            return [finish_generation(self.tokenizer, row[:n], -1)
                    for row, n in zip(out.tolist(), exact_new_tokens, strict=True)]
        return [self._finish(row, config.eos_token_id) for row in out.tolist()]

    def _finish(self, ids: list[int], eos: int) -> Generation:
        return finish_generation(self.tokenizer, ids, eos)

    def generate_requests(self, requests: Sequence[Request]) -> list[Generation]:
        """One Generation per request, in request order: requests with equal settings (and speech
        length) share one left-padded `generate` call, in order of first appearance."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.settings, tuple(r.speech.shape), r.exact_new_tokens is None), []).append(i)
        out: dict[int, Generation] = {}
        for (settings, _, free), rows in groups.items():
            speech = torch.stack([requests[i].speech for i in rows])  # (R, W*Q, D)
            exact = None if free else [int(requests[i].exact_new_tokens or 0) for i in rows]
            generations = self.generate(speech, [requests[i].prompt for i in rows], settings, exact_new_tokens=exact)
            out.update(zip(rows, generations, strict=True))
        return [out[i] for i in range(len(requests))]

    def generate_tasks(self, speech_embeds: torch.Tensor, tasks: Sequence[Task]) -> dict[str, list[Generation]]:
        """Run every task on every row of speech_embeds (B, W*Q, D) (`task_requests`).

        Tasks with equal settings share one batched generate call (B x tasks rows).
        Returns {task name: [Generation per row]} in the order of `tasks`.
        """
        requests = task_requests(speech_embeds, tasks)
        return answers_by_task(tasks, requests, self.generate_requests(requests))

    def run_tasks(
        self, waveforms: torch.Tensor, lengths: torch.Tensor | None, tasks: Sequence[Task]
    ) -> dict[str, list[Generation]]:
        """encode once, then generate_tasks."""
        return self.generate_tasks(self.encode(waveforms, lengths), tasks)


def _row_lengths(lengths: Sequence[int]) -> Any:
    """A transformers stopping criterion: row i of the batch is done after `lengths[i]` new tokens
    (with `inputs_embeds` only, the `input_ids` HF passes hold the new tokens alone)."""
    from transformers import StoppingCriteria

    class RowLengths(StoppingCriteria):
        def __init__(self) -> None:
            self.lengths = torch.tensor(list(lengths))

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            return input_ids.shape[1] >= self.lengths.to(input_ids.device)   # (B,) bool

    return RowLengths()


def join_streams(speech: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    """Zero-pad the shorter stream on time, then concatenate channels (Whisper first)."""
    t = max(speech.shape[1], audio.shape[1])
    speech = F.pad(speech, (0, 0, 0, t - speech.shape[1]))  # (B, T, Cw)
    audio = F.pad(audio, (0, 0, 0, t - audio.shape[1]))  # (B, T, Cb)
    return torch.cat([speech, audio.to(speech.dtype)], dim=-1)  # (B, T, Cw + Cb)


def split_windows(x: torch.Tensor, frames_per_window: int) -> torch.Tensor:
    """(B, T, C) -> (B*W, K, C) non-overlapping windows; W = (T - K) // K + 1, the tail is dropped.

    Same tensor as the official F.unfold / view / permute sequence with kernel = stride = K.
    """
    b, t, c = x.shape
    k = frames_per_window
    w = (t - k) // k + 1
    return x[:, : w * k].reshape(b * w, k, c)
