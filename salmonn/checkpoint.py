"""Loading SALMONN from its part files; the SALMONN checkpoint key map; safetensors conversion.

Parts (each a local path; Whisper and the LLM may also be hub ids):

    Whisper  HF directory (config.json + weights); only the encoder's tensors are read
    BEATs    official .pt {'cfg': dict, 'model': state dict} or its .safetensors conversion
    LLM      HF directory with tokenizer files (Vicuna)
    SALMONN  official .pth {'model': trained tensors, 'optimizer', ...} or its .safetensors

Every width and depth comes from the files (Whisper config, BEATs cfg, LLM config, Q-Former
shapes in the SALMONN checkpoint); a preset only names the files. Large parts are built on the
meta device and materialised from their state dicts, so each weight is held once.

    python -m salmonn.checkpoint convert SRC DST     # official pickle -> .safetensors
    python -m salmonn.checkpoint count [PRESET ...]   # parameter counts (meta-device build)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .beats import Beats
from .config import BeatsConfig, LlmDims, LoraDims, QformerDims, SalmonnConfig, WhisperDims
from .model import Salmonn, lora_layers, place, resolve_precision

logger = logging.getLogger(__name__)

# --- the SALMONN checkpoint key map (written down once) -------------------------------------------
# Module prefixes whose every tensor (parameters and buffers) the SALMONN checkpoint provides.
TRAINED_PREFIXES = ("speech_Qformer.", "speech_query_tokens", "speech_llama_proj.", "ln_speech.", "ln_audio.")
# ... plus the LoRA adapters inside the LLM (peft module path, adapter name "default").
LORA_KEY = re.compile(
    r"^llama_model\.base_model\.model\.model\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.default\.weight$"
)
# Keys the official checkpoints carry that are harmless and ignored: BEATs' relative-position
# table shared from layer 0 (frozen values, listed under every layer by state_dict) and the HF
# 4.28 LLaMA rotary buffers (recomputed by transformers).
LEFTOVER_KEYS = (
    re.compile(r"^beats\.encoder\.layers\.\d+\.self_attn\.relative_attention_bias\.weight$"),
    re.compile(r"^llama_model\..*\.rotary_emb\.inv_freq$"),
)
# Buffers in the key map that hold no learned values: loaded when present, not required (whether
# the official files carry them is inferred from the official code and the files' sizes).
OPTIONAL_KEYS = frozenset({"speech_Qformer.bert.embeddings.position_ids"})

WEIGHTS_DIR_ENV = "SALMONN_WEIGHTS_DIR"
BEATS_CFG_METADATA = "beats_cfg"  # safetensors metadata key holding the BEATs cfg as JSON


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


def is_checkpoint_key(key: str) -> bool:
    return key.startswith(TRAINED_PREFIXES) or LORA_KEY.match(key) is not None


def is_leftover_key(key: str) -> bool:
    return any(p.match(key) for p in LEFTOVER_KEYS)


def checkpoint_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Every key the SALMONN checkpoint must provide for `model`, with its shape."""
    return {k: v.shape for k, v in model.state_dict().items() if is_checkpoint_key(k)}


def official_state_dict(model: Salmonn) -> dict[str, torch.Tensor]:
    """The `['model']` entry the official 2024 training code would save for `model`.

    Official rule: state_dict minus parameters with requires_grad False. That keeps the trained
    parts plus entries absent from named_parameters(): buffers and the BEATs shared bias under
    layers 1..N. The HF 4.28 per-layer rotary inv_freq buffers are added as the official files
    have them.
    """
    sd = model.state_dict()
    out = {k: v for k, v in sd.items() if is_checkpoint_key(k) or (k.startswith("beats.") and is_leftover_key(k))}
    out.pop("beats.encoder.layers.0.self_attn.relative_attention_bias.weight", None)  # a named parameter
    llm = model.config.llm
    head_dim = llm.hidden // llm.heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    for i in range(llm.layers):
        out[f"llama_model.base_model.model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    return {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone() for k, v in out.items()
    }


def load_salmonn_checkpoint(
    model: Salmonn, source: str | os.PathLike | Mapping[str, torch.Tensor], *, name: str | None = None
) -> None:
    """Load the SALMONN checkpoint strictly into `model` (in place, keeping the model's dtypes).

    Every expected key must be present with its shape; any key that is neither expected nor a
    known leftover fails, named. Leftovers are ignored.
    """
    state = read_state_dict(source)[0] if not isinstance(source, Mapping) else source
    where = name or (str(source) if not isinstance(source, Mapping) else "state dict")
    expected = checkpoint_shapes(model)
    missing = sorted(set(expected) - set(state) - OPTIONAL_KEYS)
    unexpected = sorted(k for k in state if k not in expected and not is_leftover_key(k))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in state and state[k].shape != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if wrong:
        hint = ""
        if any(k.startswith("speech_llama_proj.") for k in wrong):
            hint = (
                " (speech_llama_proj must match the LLM width: 13B pairs with Vicuna-13B v1.1, 7B with Vicuna-7B v1.5)"
            )
        problems.append(f"shape mismatches: {'; '.join(wrong)}{hint}")
    if problems:
        raise CheckpointError(f"SALMONN checkpoint {where} does not fit the model: " + " | ".join(problems))
    targets = model.state_dict(keep_vars=True)
    loaded = [k for k in expected if k in state]
    with torch.no_grad():
        for key in loaded:
            targets[key].copy_(state[key])
    ignored = len(state) - len(loaded)
    logger.info("loaded %d SALMONN tensors from %s (%d known leftovers ignored)", len(loaded), where, ignored)


# --- reading files --------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, extras) from an official pickle or a .safetensors file.

    Pickles load with weights_only=True (`trust_pickle` lifts that, for converting a file from a
    trusted source that holds more than tensors and plain data); a dict with a 'model' entry
    yields that entry, and its 'cfg' (BEATs) is returned in extras. Safetensors return their
    metadata as extras, with the BEATs cfg decoded from JSON under 'cfg'.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
        extras: dict = dict(meta)
        if BEATS_CFG_METADATA in meta:
            extras["cfg"] = json.loads(meta[BEATS_CFG_METADATA])
        return state, extras
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} not found")
    weights_only = not trust_pickle
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError as err:  # legacy (non-zip) pickles cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} cannot be read with torch.load(weights_only=True): {err}. If the file comes from a "
            f"trusted source, convert it once: "
            f"python -m salmonn.checkpoint convert --trust-pickle {path} OUT.safetensors"
        ) from err
    if isinstance(obj, Mapping) and "model" in obj:
        extras = {k: v for k, v in obj.items() if k == "cfg"}
        return dict(obj["model"]), extras
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), {}
    raise CheckpointError(f"{path}: expected a state dict or a dict with a 'model' entry")


def _weights_dir(config: SalmonnConfig) -> Path:
    default = Path.home() / ".cache" / "salmonn"
    return Path(config.weights_dir or os.environ.get(WEIGHTS_DIR_ENV) or default).expanduser()


def resolve_file(path: str | None, config: SalmonnConfig, what: str) -> Path:
    """A local part file: `path` as given, else under the weights dir."""
    if not path:
        raise FileNotFoundError(f"{what}: no path configured (config {config.name!r})")
    tried = [Path(path).expanduser().absolute()]
    if not Path(path).expanduser().is_absolute():
        tried.append(_weights_dir(config) / path)
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{what} file {path!r} not found; looked for: {', '.join(str(p) for p in tried)}")


def resolve_hf(path: str | None, config: SalmonnConfig, what: str) -> Path | str:
    """A local HF model directory (`path` as given, or under the weights dir by full or last
    part), else `path` itself when it is shaped like a hub id ("org/name")."""
    if not path:
        raise FileNotFoundError(f"{what}: no path configured (config {config.name!r})")
    tried = [Path(path).expanduser().absolute()]
    if not Path(path).expanduser().is_absolute():
        tried += [_weights_dir(config) / path, _weights_dir(config) / Path(path).name]
    for candidate in tried:
        if (candidate / "config.json").is_file():
            return candidate
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not Path(path).exists():
        return path
    looked = ", ".join(str(p) for p in tried)
    raise FileNotFoundError(f"{what} {path!r} not found: no directory with config.json at {looked}")


def _hub_error(what: str, repo_id: str, config: SalmonnConfig, err: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} {repo_id!r}: no local directory (looked in the working directory and {_weights_dir(config)}) "
        f"and loading it from the hub failed: {err}"
    )


def _download_whisper(repo_id: str, config: SalmonnConfig) -> Path:
    """Config + weights of a hub Whisper (safetensors if the repo has them, else .bin)."""
    from huggingface_hub import snapshot_download

    try:
        # merges.txt: the tokenizer of Whisper's decoder (salmonn.whisper_text) besides the *.json
        directory = Path(snapshot_download(repo_id, allow_patterns=["*.json", "merges.txt", "model*.safetensors*"]))
        try:
            _hf_weight_files(directory)
        except FileNotFoundError:
            directory = Path(snapshot_download(repo_id, allow_patterns=["*.json", "merges.txt", "pytorch_model*.bin*"]))
        return directory
    except Exception as err:  # hub unreachable, offline, unknown id...
        raise _hub_error("Whisper", repo_id, config, err) from err


def _hf_weight_files(directory: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [directory / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or index) in {directory}")


def _read_prefixed(files: list[Path], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors whose key starts with one of `prefixes`, prefix stripped; others are not read."""
    out: dict[str, torch.Tensor] = {}

    def strip(key: str) -> str | None:
        for p in prefixes:
            if key.startswith(p):
                return key[len(p) :]
        return None

    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if (name := strip(key)) is not None:
                        out[name] = f.get_tensor(key)
        else:
            for key, value in torch.load(file, map_location="cpu", weights_only=True, mmap=True).items():
                if (name := strip(key)) is not None:
                    out[name] = value
    return out


def _materialise(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load a meta-device module strictly from `state` (assign: no second copy)."""
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{what}: missing keys {result.missing_keys or '[]'}; unexpected keys {result.unexpected_keys or '[]'}"
        )
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: tensors not materialised: {left}")


# --- the parts ------------------------------------------------------------------------------------
def load_whisper_half(directory: Path, half: str, *, attn_implementation: str) -> tuple[nn.Module, Any]:
    """(WhisperEncoder or WhisperDecoder, its WhisperConfig) from an HF Whisper directory, reading
    only that half's tensors (``half``: "encoder" or "decoder"), strictly, on the CPU."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperDecoder, WhisperEncoder

    module_cls = {"encoder": WhisperEncoder, "decoder": WhisperDecoder}[half]
    cfg = WhisperConfig.from_pretrained(directory)
    cfg._attn_implementation = attn_implementation
    state = _read_prefixed(_hf_weight_files(directory), (f"model.{half}.", f"{half}."))
    if not state:
        raise CheckpointError(f"Whisper weights in {directory} hold no {half} tensors")
    with torch.device("meta"):
        module: nn.Module = module_cls(cfg)
    _materialise(module, state, f"Whisper {half} ({directory})")
    return module, cfg


def load_whisper_encoder(directory: Path, *, device, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """WhisperEncoder from an HF Whisper directory, reading only the encoder's tensors."""
    encoder, _ = load_whisper_half(directory, "encoder", attn_implementation=attn_implementation)
    return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_beats(path: Path, *, device, dtype: torch.dtype) -> Beats:
    """BEATs from the official .pt (cfg + model) or its safetensors conversion, strictly."""
    state, extras = read_state_dict(path)
    if "cfg" not in extras:
        raise CheckpointError(f"BEATs file {path} has no 'cfg' (expected the official {{'cfg','model'}} layout)")
    cfg = BeatsConfig.from_dict(extras["cfg"])
    with torch.device("meta"):
        beats = Beats(cfg)
    _materialise(beats, state, f"BEATs ({path})")
    beats.encoder.tie_relative_bias()  # assign=True gave each layer its own tensor
    return beats.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_tokenizer(directory: str | Path):
    """The LLM tokenizer from its directory (Vicuna: sentencepiece tokenizer.model)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def load_llm(directory: Path | str, *, device, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """LlamaForCausalLM from an HF directory or hub id (transformers' own low-memory loading)."""
    from transformers import LlamaForCausalLM

    device = torch.device(device)
    kwargs: dict[str, Any] = {"device_map": {"": device}} if device.type == "cuda" else {}
    llm = LlamaForCausalLM.from_pretrained(
        str(directory), dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    clean_generation_config(llm)
    return llm.to(device).eval().requires_grad_(False)


def load_llm_embeddings(directory: Path, *, device, dtype: torch.dtype):
    """LlamaForCausalLM whose input-embedding table alone is real: the decoder layers, the norm
    and the LM head stay on the meta device (no memory). Enough to build prompt embeddings for
    an engine that holds the LLM itself (vLLM); reads only `model.embed_tokens.weight`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    state = _read_prefixed(_hf_weight_files(directory), ("model.embed_tokens.",))
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig.from_pretrained(directory))
    _materialise(llm.model.embed_tokens, state, f"LLM input embeddings ({directory})")
    llm.model.embed_tokens.to(device=device, dtype=dtype)
    clean_generation_config(llm)
    return llm.eval().requires_grad_(False)


def _download_llm(repo_id: str, config: SalmonnConfig) -> Path:
    """Config, tokenizer and weights of a hub LLM (safetensors if the repo has them, else .bin)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "tokenizer.model"]
    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=[*patterns, "model*.safetensors*"]))
        try:
            _hf_weight_files(directory)
        except FileNotFoundError:
            directory = Path(snapshot_download(repo_id, allow_patterns=[*patterns, "pytorch_model*.bin*"]))
        return directory
    except Exception as err:  # hub unreachable, offline, unknown id...
        raise _hub_error("LLM", repo_id, config, err) from err


def save_llm(model: Salmonn, directory: str | os.PathLike) -> Path:
    """Write the model's base LLM (without LoRA) and its tokenizer as an HF directory, the form
    vLLM loads (for models built in memory, such as `salmonn.tiny.build_tiny`)."""
    from transformers import LlamaForCausalLM

    if not model.has_full_llm:
        raise ValueError("save_llm needs the full LLM (this model holds only its input embeddings)")
    directory = Path(directory)
    state = {k.replace(".base_layer.", "."): v for k, v in model.llm.state_dict().items() if ".lora_" not in k}
    with torch.device("meta"):
        llm = LlamaForCausalLM(model.llm.config)
    llm.load_state_dict(state, strict=True, assign=True)
    llm.generation_config = model.llm.generation_config
    llm.save_pretrained(directory)
    model.tokenizer.save_pretrained(directory)
    return directory


def clean_generation_config(llm: Any) -> None:
    """Keep only the special-token ids of the LLM's own generation config (Vicuna's carries
    sampling defaults); every decode setting comes from GenerationSettings."""
    from transformers import GenerationConfig

    old = llm.generation_config
    llm.generation_config = GenerationConfig(
        bos_token_id=old.bos_token_id if old.bos_token_id is not None else 1,
        eos_token_id=old.eos_token_id if old.eos_token_id is not None else 2,
        pad_token_id=old.pad_token_id if old.pad_token_id is not None else 0,
    )


def wrap_lora(llm: nn.Module, lora: LoraDims) -> nn.Module:
    """peft LoRA around the LLM, keys `base_model.model.model.layers.{i}.self_attn.*.lora_[AB].default.weight`."""
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        inference_mode=True,
    )
    with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(llm, peft_config).eval()


def qformer_dims_from_state_dict(state: Mapping[str, torch.Tensor], base: QformerDims) -> QformerDims:
    """Q-Former dims from checkpoint shapes. Heads are not stored: BERT's 64-wide heads are assumed."""
    prefix = "speech_Qformer.bert.encoder.layer."
    try:
        layers = 1 + max(int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix))
        hidden = state[prefix + "0.attention.self.query.weight"].shape[0]
        encoder_width = state[prefix + "0.crossattention.self.key.weight"].shape[1]
        ffn_dim = state[prefix + "0.intermediate_query.dense.weight"].shape[0]
        num_queries = state["speech_query_tokens"].shape[1]
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"SALMONN checkpoint lacks Q-Former tensors ({err})") from err
    position_ids = state.get("speech_Qformer.bert.embeddings.position_ids")
    max_positions = position_ids.shape[-1] if position_ids is not None else base.max_positions
    heads = base.heads if hidden == base.hidden else max(1, hidden // 64)
    return dataclasses.replace(
        base,
        layers=layers,
        hidden=hidden,
        heads=heads,
        ffn_dim=ffn_dim,
        encoder_width=encoder_width,
        num_queries=num_queries,
        max_positions=max_positions,
    )


def lora_dims_from_state_dict(state: Mapping[str, torch.Tensor], base: LoraDims) -> LoraDims:
    """LoRA rank and target modules from checkpoint keys; alpha (not stored) from `base`."""
    found = [(m.group(2), state[k].shape) for k in state if (m := LORA_KEY.match(k)) and m.group(3) == "A"]
    if not found:
        raise CheckpointError("SALMONN checkpoint holds no LoRA tensors (llama_model...lora_A.default.weight)")
    targets = tuple(sorted({name for name, _ in found}))
    return dataclasses.replace(base, r=found[0][1][0], targets=targets)


LLM_PARTS = ("full", "embeddings")


def build_salmonn(
    config: SalmonnConfig,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    llm: str = "full",
) -> Salmonn:
    """Load a full model from the part files named by `config`.

    device: default CUDA if available, else CPU. dtype: overrides the config's numerics
    (default bf16 on CUDA, fp32 on CPU; numerics='official' fixes its own dtypes).
    llm: "full", or "embeddings": only the LLM's input-embedding table and the LoRA weights are
    loaded, the decoder stays on the meta device (for a `salmonn.engines.VllmEngine`, which holds
    the LLM itself: 26 GB less on the GPU for 13B). Such a model encodes and builds prompt rows
    but cannot `generate`.
    """
    if llm not in LLM_PARTS:
        raise ValueError(f"llm must be one of {LLM_PARTS}, got {llm!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(config.numerics, device, dtype)
    # locate every local file before loading anything
    whisper_src = resolve_hf(config.whisper_path, config, "Whisper")
    beats_file = resolve_file(config.beats_path, config, "BEATs checkpoint")
    llm_src = resolve_hf(config.llm_path, config, "LLM")
    ckpt_file = resolve_file(config.checkpoint_path, config, "SALMONN checkpoint")

    ckpt, _ = read_state_dict(ckpt_file)
    whisper_dir = whisper_src if isinstance(whisper_src, Path) else _download_whisper(whisper_src, config)
    logger.info("loading Whisper encoder from %s", whisper_dir)
    whisper = load_whisper_encoder(
        whisper_dir, device=device, dtype=precision.encoder_dtype, attn_implementation=precision.attn_implementation
    )
    logger.info("loading BEATs from %s", beats_file)
    beats = load_beats(beats_file, device=device, dtype=precision.encoder_dtype)
    logger.info("loading LLM from %s", llm_src)
    try:
        if llm == "embeddings":
            llm_dir = llm_src if isinstance(llm_src, Path) else _download_llm(llm_src, config)
            llm_model = load_llm_embeddings(llm_dir, device=device, dtype=precision.llm_dtype)
        else:
            llm_model = load_llm(
                llm_src, device=device, dtype=precision.llm_dtype, attn_implementation=precision.attn_implementation
            )
        tokenizer = load_tokenizer(llm_src)
    except OSError as err:  # transformers' "not found" for hub ids and broken directories
        raise _hub_error("LLM", str(llm_src), config, err) from err

    try:
        derived = dataclasses.replace(
            config,
            whisper=WhisperDims.from_hf(whisper.config),
            beats=beats.cfg,
            llm=LlmDims.from_hf(llm_model.config),
            qformer=qformer_dims_from_state_dict(ckpt, config.qformer),
            lora=lora_dims_from_state_dict(ckpt, config.lora),
        )  # __post_init__ checks that the Q-Former's encoder width fits Whisper + BEATs
    except ValueError as err:
        raise CheckpointError(
            f"parts do not fit together ({whisper_dir}, {beats_file}, {llm_src}, {ckpt_file}): {err}"
        ) from err
    llama_model = wrap_lora(llm_model, derived.lora)
    if llm == "embeddings":  # LoRA layers were made on the meta device too: give them storage to load into
        for layer in lora_layers(llama_model):
            layer.lora_A.to_empty(device=device)
            layer.lora_B.to_empty(device=device)
    model = Salmonn(
        derived,
        speech_encoder=whisper,
        beats=beats,
        llama_model=llama_model,
        tokenizer=tokenizer,
        precision=precision,
    )
    place(model, device, precision)
    load_salmonn_checkpoint(model, ckpt, name=str(ckpt_file))
    logger.info("SALMONN %s ready on %s (%s)", derived.model_id, device, precision)
    return model


# --- meta-device builds: structure and parameter counts without weights ---------------------------
def build_meta(config: SalmonnConfig) -> Salmonn:
    """The full module tree on the meta device (no weights, no tokenizer)."""
    from transformers import LlamaForCausalLM
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    with torch.device("meta"):
        whisper = WhisperEncoder(config.whisper.to_hf())
        beats = Beats(config.beats)
        llama_model = wrap_lora(LlamaForCausalLM(config.llm.to_hf()), config.lora)
        return Salmonn(config, speech_encoder=whisper, beats=beats, llama_model=llama_model)


def count_parameters(config: SalmonnConfig) -> dict[str, int]:
    """Parameter counts per part from a meta-device build (shared tensors counted once)."""
    model = build_meta(config)

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    lora = sum(p.numel() for n, p in model.llama_model.named_parameters() if ".lora_" in n)
    counts = {
        "whisper_encoder": count(model.speech_encoder),
        "beats": count(model.beats),
        "qformer": count(model.speech_Qformer) + model.speech_query_tokens.numel(),
        "projection": count(model.speech_llama_proj),
        "layer_norms": count(model.ln_speech) + count(model.ln_audio),
        "llm": count(model.llama_model) - lora,
        "lora": lora,
    }
    counts["trained"] = counts["qformer"] + counts["projection"] + counts["layer_norms"] + lora
    counts["total"] = count(model)
    return counts


# --- conversion -------------------------------------------------------------------------------
def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike, *, trust_pickle: bool = False) -> Path:
    """Convert an official pickle (SALMONN .pth, BEATs .pt) to .safetensors.

    Only the `model` tensors are kept (optimizer state etc. are dropped); a BEATs `cfg` goes
    into the metadata as JSON. Shared tensors are written once per key.
    """
    from safetensors.torch import save_file

    state, extras = read_state_dict(src, trust_pickle=trust_pickle)
    metadata = {"format": "pt", "source": Path(src).name}
    if "cfg" in extras:
        metadata[BEATS_CFG_METADATA] = json.dumps(dict(extras["cfg"]), sort_keys=True)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(dst), metadata=metadata)
    logger.info("wrote %d tensors to %s", len(state), dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m salmonn.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="official .pth/.pt pickle -> .safetensors")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument(
        "--trust-pickle", action="store_true", help="allow arbitrary pickled objects (trusted files only)"
    )
    counts = sub.add_parser("count", help="parameter counts of presets (meta-device build)")
    counts.add_argument("presets", nargs="*", default=["salmonn-13b", "salmonn-7b"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "convert":
        convert_to_safetensors(args.src, args.dst, trust_pickle=args.trust_pickle)
    else:
        for name in args.presets:
            for part, n in count_parameters(SalmonnConfig.from_name(name)).items():
                sys.stdout.write(f"{name}\t{part}\t{n:,}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
