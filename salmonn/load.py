"""One entry point for callers: a ready model from a preset name or a directory of parts.

Imports both builders (``checkpoint`` for real parts, ``tiny`` for the random test model), which
import neither this module nor each other's callers, so there is no import cycle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from .checkpoint import _download_whisper, build_salmonn, resolve_hf
from .config import PARTS_FILE, SalmonnConfig, config_from_parts_dir
from .model import Salmonn
from .tiny import build_tiny, build_tiny_whisper_text
from .whisper_text import WhisperText

__all__ = ["config_from_parts_dir", "load_model", "load_whisper_text", "model_id_for"]


def load_model(
    model: str = "tiny",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    llm: str = "full",
    **overrides: Any,
) -> Salmonn:
    """A ready model from a preset name ("tiny", "salmonn-13b", "salmonn-7b") or a parts directory.

    `llm`: "full", or "embeddings" for a model whose LLM holds only its input embeddings (for a
    `salmonn.engines.VllmEngine`; see `build_salmonn`). The in-memory "tiny" is always full.
    `overrides` are SalmonnConfig fields (numerics, weights_dir, checkpoint_path, ...).
    """
    if model == "tiny":
        return build_tiny(config=SalmonnConfig.from_name("tiny", **overrides), device=device or "cpu", dtype=dtype)
    if Path(model).is_dir():
        config = dataclasses.replace(config_from_parts_dir(model), **overrides)
    else:
        config = SalmonnConfig.from_name(model, **overrides)
    return build_salmonn(config, device=device, dtype=dtype, llm=llm)


def model_id_for(model: str) -> str:
    """The model_id that `load_model(model)` will report, without loading anything."""
    if Path(model).is_dir() and (Path(model) / PARTS_FILE).is_file():
        return config_from_parts_dir(model).model_id
    return SalmonnConfig.from_name(model).model_id


def load_whisper_text(model: Salmonn) -> WhisperText:
    """Whisper's decoder for ``model``'s speech encoder (timed text: language, Whisper's transcript,
    word timings; ``salmonn.whisper_text``), read from the same Whisper folder the encoder came from
    (its decoder, ``proj_out``, tokenizer files). The in-memory tiny preset gets the tiny random
    decoder and the offline tokenizer."""
    config = model.config
    dtype = model.precision.encoder_dtype
    if config.whisper_path is None:     # the in-memory "tiny"
        return build_tiny_whisper_text(0, config=config, device=model.device, dtype=dtype)
    src = resolve_hf(config.whisper_path, config, "Whisper")
    directory = src if isinstance(src, Path) else _download_whisper(src, config)
    return WhisperText.from_pretrained(directory, device=model.device, dtype=dtype)
