"""Model configuration: one frozen dataclass per part, presets as plain data.

A preset names the part files and gives the dimensions of the official model. When a model is
loaded from files, every width and depth is re-derived from the files themselves (see
`salmonn.checkpoint`), so the dimensions here matter only for meta-device builds (parameter
counts, speech-token geometry) and for the random `tiny` model.

This module imports no torch: configs can be built and inspected anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# --- audio geometry (fixed by Whisper) ---------------------------------------------------------
SAMPLE_RATE = 16_000  # Hz; both encoders take 16 kHz mono
CHUNK_S = 30  # Whisper's context in seconds
CHUNK_SAMPLES = CHUNK_S * SAMPLE_RATE  # 480_000 samples per Whisper input
ENCODER_FRAMES = 1500  # Whisper encoder frames per 30 s (20 ms each)
MIN_SAMPLES = SAMPLE_RATE  # clips shorter than 1 s are zero-padded to 1 s (official 2024 code)

NUMERICS = ("auto", "fp32", "bf16", "official")


@dataclass(frozen=True)
class WhisperDims:
    """Whisper encoder dimensions (HF `WhisperConfig` names in comments)."""

    d_model: int = 1280  # d_model
    layers: int = 32  # encoder_layers
    heads: int = 20  # encoder_attention_heads
    ffn_dim: int = 5120  # encoder_ffn_dim
    n_mels: int = 80  # num_mel_bins
    n_frames: int = ENCODER_FRAMES  # max_source_positions

    def to_hf(self, **extra: Any):
        """A `transformers.WhisperConfig` with these encoder dims (decoder dims from `extra`)."""
        from transformers import WhisperConfig

        return WhisperConfig(
            d_model=self.d_model,
            encoder_layers=self.layers,
            encoder_attention_heads=self.heads,
            encoder_ffn_dim=self.ffn_dim,
            num_mel_bins=self.n_mels,
            max_source_positions=self.n_frames,
            **extra,
        )

    @classmethod
    def from_hf(cls, cfg) -> WhisperDims:
        return cls(
            d_model=cfg.d_model,
            layers=cfg.encoder_layers,
            heads=cfg.encoder_attention_heads,
            ffn_dim=cfg.encoder_ffn_dim,
            n_mels=cfg.num_mel_bins,
            n_frames=cfg.max_source_positions,
        )


@dataclass(frozen=True)
class BeatsConfig:
    """BEATs configuration, field names as in the official checkpoint's `cfg` dict.

    Defaults are the official code's defaults; `from_dict(ckpt["cfg"])` applies a checkpoint's
    values. Dropout fields are kept for a faithful round trip but unused (inference only).
    """

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False
    finetuned_model: bool = False
    predictor_dropout: float = 0.1
    predictor_class: int = 527
    n_mels: int = 128  # fbank bins (fixed by the official preprocess, not in the official cfg)

    def __post_init__(self) -> None:
        if self.activation_fn != "gelu":
            raise ValueError(f"BEATs activation_fn={self.activation_fn!r} is not supported (only 'gelu')")
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("BEATs: deep_norm and layer_norm_first are mutually exclusive")
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError("BEATs: encoder_embed_dim must be divisible by encoder_attention_heads")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> BeatsConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            logger.debug("BEATs cfg keys without effect here: %s", unknown)
        return cls(**{k: v for k, v in cfg.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def freq_patches(self) -> int:
        """Patches along the mel axis (8 for 128 bins and 16x16 patches)."""
        return self.n_mels // self.input_patch_size


@dataclass(frozen=True)
class QformerDims:
    """Window-level Q-Former (BLIP-2 BERT with cross-attention in every layer)."""

    layers: int = 2
    hidden: int = 768
    heads: int = 12
    ffn_dim: int = 3072
    encoder_width: int = 1280 + 768  # Whisper channels + BEATs channels
    num_queries: int = 1
    max_positions: int = 512  # only sizes the `position_ids` buffer kept in the checkpoint
    ln_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError("Q-Former: hidden must be divisible by heads")


@dataclass(frozen=True)
class LlmDims:
    """LLaMA-family decoder (HF `LlamaConfig` names in comments)."""

    hidden: int = 5120  # hidden_size
    layers: int = 40  # num_hidden_layers
    heads: int = 40  # num_attention_heads
    ffn_dim: int = 13824  # intermediate_size
    vocab_size: int = 32000
    max_positions: int = 2048  # max_position_embeddings
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def to_hf(self, **extra: Any):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.ffn_dim,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
            **extra,
        )

    @classmethod
    def from_hf(cls, cfg) -> LlmDims:
        return cls(
            hidden=cfg.hidden_size,
            layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads,
            ffn_dim=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            max_positions=cfg.max_position_embeddings,
            rms_norm_eps=cfg.rms_norm_eps,
            initializer_range=cfg.initializer_range,
        )


@dataclass(frozen=True)
class LoraDims:
    """LoRA on the LLM (peft 0.3.0 defaults for llama: q_proj and v_proj)."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    @property
    def scale(self) -> float:
        """peft's scaling = alpha / r (4.0 official)."""
        return self.alpha / self.r


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings for one generate call. Official decode config: num_beams=4."""

    max_new_tokens: int = 200
    num_beams: int = 1  # greedy is the fast default; the official decode uses 4
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    lora_scale: float = 4.0  # peft scaling alpha/r; lower = the paper's "activation" discount

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.num_beams < 1:
            raise ValueError("num_beams must be >= 1")
        if self.lora_scale < 0:
            raise ValueError("lora_scale must be >= 0")


@dataclass(frozen=True)
class SalmonnConfig:
    """Everything needed to build or load a SALMONN model.

    Part paths are a local path or (Whisper, LLM) a hub id. Relative file names that do not exist
    in the working directory are looked up under `weights_dir` (default: $SALMONN_WEIGHTS_DIR or
    ~/.cache/salmonn).
    """

    name: str
    model_id: str
    whisper: WhisperDims = field(default_factory=WhisperDims)
    beats: BeatsConfig = field(default_factory=BeatsConfig)
    qformer: QformerDims = field(default_factory=QformerDims)
    llm: LlmDims = field(default_factory=LlmDims)
    lora: LoraDims = field(default_factory=LoraDims)
    window_s: float = 0.333333  # second_per_window = second_stride
    whisper_path: str | None = None
    beats_path: str | None = None
    llm_path: str | None = None
    checkpoint_path: str | None = None
    weights_dir: str | None = None
    numerics: str = "auto"  # auto: bf16 on GPU, fp32 on CPU | fp32 | bf16 | official (CUDA only)

    def __post_init__(self) -> None:
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        want = self.whisper.d_model + self.beats.encoder_embed_dim
        if self.qformer.encoder_width != want:
            raise ValueError(
                f"Q-Former encoder_width {self.qformer.encoder_width} != Whisper d_model "
                f"{self.whisper.d_model} + BEATs width {self.beats.encoder_embed_dim}"
            )
        if self.frames_per_window < 1 or self.frames_per_window > self.whisper.n_frames:
            raise ValueError(f"window_s={self.window_s} gives {self.frames_per_window} frames per window")

    # --- speech-token geometry, from the config alone ------------------------------------------
    @property
    def frames_per_window(self) -> int:
        """Encoder frames per Q-Former window: round(1500 * 0.333333 / 30) = 17."""
        return round(ENCODER_FRAMES * self.window_s / CHUNK_S)

    @property
    def windows_per_clip(self) -> int:
        """Non-overlapping windows over the 1500 frames: (1500 - 17) // 17 + 1 = 88."""
        k = self.frames_per_window
        return (self.whisper.n_frames - k) // k + 1

    @property
    def speech_tokens(self) -> int:
        """LLM input vectors per clip of any length <= 30 s (88 for the official model)."""
        return self.windows_per_clip * self.qformer.num_queries

    # --- presets -----------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> SalmonnConfig:
        """A preset ("salmonn-13b", "salmonn-7b", "tiny") with field overrides applied."""
        try:
            base = _PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(_PRESETS)}") from None
        return dataclasses.replace(base, **overrides)


_OFFICIAL_BEATS = BeatsConfig(
    input_patch_size=16,
    deep_norm=True,
    layer_norm_first=False,
    relative_position_embedding=True,
    num_buckets=320,
    max_distance=800,
    gru_rel_pos=True,
    conv_bias=False,
    finetuned_model=True,
    predictor_class=527,
)
BEATS_FILE = "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"  # the official BEATs checkpoint
PARTS_FILE = "salmonn_parts.json"  # in a parts directory: names its part files (see config_from_parts_dir)

_PRESETS: dict[str, SalmonnConfig] = {
    "salmonn-13b": SalmonnConfig(
        name="salmonn-13b",
        model_id="salmonn-13b",
        beats=_OFFICIAL_BEATS,
        llm=LlmDims(hidden=5120, layers=40, heads=40, ffn_dim=13824, max_positions=2048, rms_norm_eps=1e-6),
        whisper_path="openai/whisper-large-v2",
        beats_path=BEATS_FILE,
        llm_path="lmsys/vicuna-13b-v1.1",
        checkpoint_path="salmonn_v1.pth",
    ),
    "salmonn-7b": SalmonnConfig(
        name="salmonn-7b",
        model_id="salmonn-7b",
        beats=_OFFICIAL_BEATS,
        llm=LlmDims(hidden=4096, layers=32, heads=32, ffn_dim=11008, max_positions=4096, rms_norm_eps=1e-5),
        whisper_path="openai/whisper-large-v2",
        beats_path=BEATS_FILE,
        llm_path="lmsys/vicuna-7b-v1.5",
        checkpoint_path="salmonn_7b_v0.pth",
    ),
    # Same structure and audio geometry (80 mels, 128 fbank bins, 16x16 patches, 1500 frames,
    # 17-frame windows, 88 queries), tiny widths. Random weights: outputs are meaningless.
    # Q-Former heads are 64 wide as in BERT, so the loader can derive heads = hidden // 64.
    # LLM heads are 32 wide: vLLM's CPU attention takes head_dim in {32, 64, 80, ...}, not 16.
    "tiny": SalmonnConfig(
        name="tiny",
        model_id="tiny-random",
        whisper=WhisperDims(d_model=64, layers=2, heads=2, ffn_dim=128),
        beats=dataclasses.replace(
            _OFFICIAL_BEATS,
            embed_dim=32,
            encoder_layers=2,
            encoder_embed_dim=48,
            encoder_ffn_embed_dim=96,
            encoder_attention_heads=2,
        ),
        qformer=QformerDims(layers=2, hidden=128, heads=2, ffn_dim=256, encoder_width=64 + 48),
        llm=LlmDims(hidden=64, layers=2, heads=2, ffn_dim=128, vocab_size=512, initializer_range=0.3),
    ),
}

PRESETS = tuple(_PRESETS)


def config_from_parts_dir(directory: str | Path, base: SalmonnConfig | None = None) -> SalmonnConfig:
    """A config for a directory of parts described by its salmonn_parts.json.

    The spec names the parts relative to the directory: ``{"preset": ..., "model_id": ...,
    "whisper": DIR, "beats": FILE, "llm": DIR, "checkpoint": FILE}``; the preset gives the defaults.
    """
    directory = Path(directory)
    spec_file = directory / PARTS_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(f"{spec_file} not found: not a SALMONN parts directory")
    spec = json.loads(spec_file.read_text())
    base = base or SalmonnConfig.from_name(spec.get("preset", "salmonn-13b"))
    return dataclasses.replace(
        base,
        model_id=spec.get("model_id", base.model_id),
        whisper_path=str(directory / spec["whisper"]),
        beats_path=str(directory / spec["beats"]),
        llm_path=str(directory / spec["llm"]),
        checkpoint_path=str(directory / spec["checkpoint"]),
    )
