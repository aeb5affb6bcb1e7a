"""SALMONN audio LLM in plain PyTorch + transformers + peft (no Ray).

    import salmonn

    model = salmonn.load_model("tiny")            # or "salmonn-13b", "salmonn-7b", a parts directory
    embeds = model.encode(waveforms, lengths)     # (B, 88, D): both encoders run once per window
    answers = model.generate_tasks(embeds, salmonn.default_tasks())   # {task: [Generation per window]}

Names are imported from their submodules on first use, so `import salmonn` stays light and
`python -m salmonn.checkpoint` runs its module only once.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "checkpoint": (
        "CheckpointError",
        "build_meta",
        "build_salmonn",
        "convert_to_safetensors",
        "count_parameters",
        "load_salmonn_checkpoint",
        "save_llm",
    ),
    "config": (
        "BEATS_FILE",
        "PARTS_FILE",
        "PRESETS",
        "SAMPLE_RATE",
        "BeatsConfig",
        "GenerationSettings",
        "LlmDims",
        "LoraDims",
        "QformerDims",
        "SalmonnConfig",
        "WhisperDims",
        "config_from_parts_dir",
    ),
    "engines": ("Engine", "HfEngine", "Request", "VllmEngine", "build_engine"),
    "load": ("load_model", "load_whisper_text", "model_id_for"),
    "model": ("EngineDeadError", "Generation", "Precision", "Salmonn", "is_out_of_memory", "resolve_precision"),
    "prompts": ("BUILTIN_TASKS", "OFFICIAL_PROMPTS", "TEMPLATE", "WHISPER_TASK", "Task", "builtin_task",
                "default_tasks"),
    "tiny": ("build_tiny", "write_tiny_parts"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'salmonn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
