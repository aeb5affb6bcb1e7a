"""The `tiny` preset: a random SALMONN of the official structure, for tests and the demo.

Its outputs are meaningless (model_id "tiny-random"). The tokenizer is a small sentencepiece BPE
model in Vicuna's format (byte fallback, BOS 1, EOS 2, UNK 0), trained on an in-code corpus,
cached on disk and loaded through the same `AutoTokenizer` path a real Vicuna directory uses.

    model = build_tiny(seed=0)                 # in memory
    config = write_tiny_parts(directory)       # the same model as official-format part files
    model = build_salmonn(config, "cpu")       # ... loaded back through the real loaders
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .beats import Beats
from .checkpoint import clean_generation_config, load_tokenizer, official_state_dict, wrap_lora
from .config import PARTS_FILE, SalmonnConfig, config_from_parts_dir
from .model import Salmonn, lora_layers, place, resolve_precision
from .prompts import OFFICIAL_PROMPTS, TEMPLATE

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "SALMONN_CACHE_DIR"
TOKENIZER_VOCAB = 512

_CORPUS = [
    *(TEMPLATE.format(p) for p in OFFICIAL_PROMPTS.values()),
    "A man is speaking while music plays in the background.",
    "A woman speaks calmly about the weather, then a dog barks twice.",
    "Birds are chirping and wind is blowing through the trees.",
    "The speaker sounds happy. The speaker sounds sad. The speaker sounds angry. Neutral.",
    "Thank you for calling, how can I help you today?",
    "Cars pass by on a busy street while people talk and laugh.",
    "An electric guitar plays a slow melody with drums and bass.",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9",
]
_TOKENIZER_ARGS: dict[str, Any] = dict(
    vocab_size=TOKENIZER_VOCAB,
    model_type="bpe",
    byte_fallback=True,
    character_coverage=1.0,
    split_digits=True,
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    num_threads=1,
    hard_vocab_limit=False,
    minloglevel=2,
)
# Vicuna's tokenizer_config.json, minus the model-specific length
_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 2048,
    "sp_model_kwargs": {},
}


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path(tempfile.gettempdir()) / "salmonn-cache")


def tiny_tokenizer_dir() -> Path:
    """A directory with tokenizer.model + tokenizer_config.json (trained once, then cached)."""
    digest = hashlib.sha256(json.dumps([_CORPUS, _TOKENIZER_ARGS, _TOKENIZER_CONFIG]).encode()).hexdigest()[:12]
    target = _cache_dir() / f"tiny-tokenizer-{digest}"
    if (target / "tokenizer.model").is_file():
        return target
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS * 4), model_writer=model, **_TOKENIZER_ARGS)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tok-"))
    (staging / "tokenizer.model").write_bytes(model.getvalue())
    (staging / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2))
    return _publish(staging, target, "trained tiny tokenizer")


def _publish(staging: Path, target: Path, what: str) -> Path:
    """Move the cache entry written in ``staging`` to ``target`` (atomic; a concurrent writer may
    have won, which is fine)."""
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("%s in %s", what, target)
    return target


def build_tiny(
    seed: int = 0,
    *,
    config: SalmonnConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Salmonn:
    """A random SALMONN of the tiny preset, the same for the same seed.

    LoRA B is randomised too (peft initialises it to zero), so the LoRA scale changes outputs.
    The global RNG state is left untouched.
    """
    from transformers import LlamaForCausalLM
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = config or SalmonnConfig.from_name("tiny")
    tokenizer = load_tokenizer(tiny_tokenizer_dir())
    config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, vocab_size=len(tokenizer)))
    precision = resolve_precision(config.numerics, device, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        whisper_config, llm_config = config.whisper.to_hf(), config.llm.to_hf()
        whisper_config._attn_implementation = llm_config._attn_implementation = precision.attn_implementation
        whisper = WhisperEncoder(whisper_config)
        beats = Beats(config.beats)
        llm = LlamaForCausalLM(llm_config)
        clean_generation_config(llm)
        llama_model = wrap_lora(llm, config.lora)
        for layer in lora_layers(llama_model):
            for b in layer.lora_B.values():
                torch.nn.init.normal_(b.weight, std=0.05)
        model = Salmonn(
            config, speech_encoder=whisper, beats=beats, llama_model=llama_model, tokenizer=tokenizer
        )
        # random LayerNorm affines, so a checkpoint round trip is a real test
        for ln in (model.ln_speech, model.ln_audio):
            torch.nn.init.normal_(ln.weight, mean=1.0, std=0.1)
            torch.nn.init.normal_(ln.bias, std=0.1)
    return place(model, device, precision)


def write_tiny_parts(directory: str | os.PathLike, seed: int = 0) -> SalmonnConfig:
    """Write `build_tiny(seed)` as official-format part files; return the config that loads them.

        whisper/      HF Whisper directory: the encoder, a random tiny decoder, its tokenizer files
        beats.pt      {'cfg': dict, 'model': state dict}
        llm/          HF LlamaForCausalLM directory + Vicuna-style tokenizer files
        salmonn.pth   {'model': trained tensors + official leftovers, 'optimizer': {}, 'epoch': 0}
        salmonn_parts.json
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = build_tiny(seed)
    cfg = model.config

    # the whole Whisper folder users have: the encoder, the tiny random decoder with its tokenizer
    # (what salmonn.whisper_text reads for timed text)
    write_tiny_whisper(directory / "whisper", seed, encoder=model.speech_encoder)

    torch.save({"cfg": cfg.beats.to_dict(), "model": model.beats.state_dict()}, directory / "beats.pt")

    # the base LLM without adapters: peft's `base_layer` holds the original weight
    base_state = {
        k.replace(".base_layer.", "."): v for k, v in model.llm.state_dict().items() if ".lora_" not in k
    }
    llm = LlamaForCausalLM(cfg.llm.to_hf())
    llm.load_state_dict(base_state, strict=True)
    # sampling defaults in the file, as Vicuna's generation_config.json has; the loader ignores them
    llm.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True, temperature=0.9, top_p=0.6
    )
    llm.save_pretrained(directory / "llm")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tiny_tokenizer_dir() / name, directory / "llm" / name)

    torch.save({"model": official_state_dict(model), "optimizer": {}, "epoch": 0}, directory / "salmonn.pth")
    spec = {
        "preset": "tiny",
        "model_id": cfg.model_id,
        "whisper": "whisper",
        "beats": "beats.pt",
        "llm": "llm",
        "checkpoint": "salmonn.pth",
    }
    (directory / PARTS_FILE).write_text(json.dumps(spec, indent=2))
    logger.info("wrote tiny SALMONN parts to %s", directory)
    return config_from_parts_dir(directory)


# --- Whisper's decoder and tokenizer for timed text (salmonn.whisper_text) ----------------------------
WHISPER_VOCAB = 51865  # multilingual: 50257 text tokens, specials from 50257, timestamps 50364..51864
# Decoder of the tiny Whisper: its width is the tiny encoder's (config.whisper.d_model); openai fixes
# the MLP at 4 x d_model; 448 positions as the official model.
TINY_WHISPER_DECODER: dict[str, Any] = dict(
    decoder_layers=4, decoder_attention_heads=4, decoder_ffn_dim=256, max_target_positions=448
)
_WHISPER_WORDS = (
    "the quick brown fox jumps over lazy dog hello world thank you for watching speech music weather "
    "today tomorrow people talk laugh street cars birds wind trees calmly speaks woman man"
).split()


def _whisper_special_tokens() -> list[str]:
    from .whisper_text import LANGUAGES

    return [
        "<|endoftext|>", "<|startoftranscript|>", *(f"<|{c}|>" for c in LANGUAGES), "<|translate|>",
        "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>",
    ]  # fmt: skip


def tiny_whisper_tokenizer_dir() -> Path:
    """A Whisper tokenizer with the official multilingual layout, written offline and cached.

    Text tokens 0..50256: the 256 byte-level tokens, whole-word merges for a few words, then
    fillers (" ab", " abc", ...) that decode as words but are never produced by encoding;
    <|endoftext|> 50257, <|startoftranscript|> 50258, the 99 languages 50259..50357, <|translate|>,
    <|transcribe|>, <|startoflm|>, <|startofprev|>, <|nocaptions|>, <|notimestamps|> 50363 and
    the timestamps <|0.00|>..<|30.00|> 50364..51864."""
    import itertools
    import string

    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    from .whisper_text import BYTE_ALPHABET

    specials = _whisper_special_tokens()
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    digest = hashlib.sha256(json.dumps([_WHISPER_WORDS, specials, WHISPER_VOCAB, 2]).encode()).hexdigest()[:12]
    target = _cache_dir() / f"tiny-whisper-tokenizer-{digest}"
    if (target / "tokenizer_config.json").is_file():
        return target
    space = BYTE_ALPHABET[ord(" ")]
    vocab: dict[str, int] = {}
    for b in sorted(BYTE_ALPHABET, key=lambda b: (not (33 <= b <= 126 or 161 <= b <= 255 and b != 173), b)):
        vocab[BYTE_ALPHABET[b]] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _WHISPER_WORDS:
        piece = space
        for ch in word:
            if piece + ch not in vocab:
                merges.append((piece, ch))
                vocab[piece + ch] = len(vocab)
            piece += ch
    n_text = WHISPER_VOCAB - len(specials) - len(timestamps)  # 50257
    fillers = ("".join(p) for n in itertools.count(2) for p in itertools.product(string.ascii_lowercase, repeat=n))
    for filler in fillers:
        if len(vocab) >= n_text:
            break
        vocab.setdefault(space + filler, len(vocab))
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in timestamps])
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|0.00|>"])
    if ids != [50257, 50258, 50363, 50364] or len(tokenizer) != WHISPER_VOCAB:
        raise RuntimeError(f"tiny Whisper tokenizer has the wrong layout: {ids}, {len(tokenizer)} tokens")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".wtok-"))
    tokenizer.save_pretrained(str(staging))
    # ... and the files of the hub's openai/whisper-large-v2, which older local copies load from
    # (no tokenizer.json there): vocab.json, merges.txt, added_tokens.json, special_tokens_map.json
    (staging / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": n_text}, ensure_ascii=False))
    (staging / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    added = {t: n_text + i for i, t in enumerate([*specials, *timestamps]) if i > 0}
    (staging / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False))
    eot = "<|endoftext|>"
    (staging / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot})
    )
    return _publish(staging, target, "wrote tiny Whisper tokenizer")


def tiny_whisper_config(config: SalmonnConfig | None = None):
    """A full WhisperConfig: the tiny encoder's dims, TINY_WHISPER_DECODER and the official ids."""
    config = config or SalmonnConfig.from_name("tiny")
    return config.whisper.to_hf(
        **TINY_WHISPER_DECODER,
        vocab_size=WHISPER_VOCAB,
        pad_token_id=50257,
        bos_token_id=50257,
        eos_token_id=50257,
        decoder_start_token_id=50258,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )


def build_tiny_whisper_text(
    seed: int = 0,
    *,
    config: SalmonnConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
):
    """A random `WhisperText` for the tiny preset (same for the same seed; global RNG untouched).

    Weights are drawn with std 0.1: wide enough that attention is not uniform, narrow enough
    that it does not saturate (DTW paths then tie)."""
    from transformers.models.whisper.modeling_whisper import WhisperDecoder

    from .whisper_text import WhisperText, default_alignment_heads, load_whisper_tokenizer

    cfg = tiny_whisper_config(config)
    cfg._attn_implementation = "eager"
    tokenizer = load_whisper_tokenizer(tiny_whisper_tokenizer_dir())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = WhisperDecoder(cfg)
        with torch.no_grad():
            for name, param in decoder.named_parameters():
                if name.endswith("weight") and param.dim() == 2:
                    torch.nn.init.normal_(param, std=0.1)
    heads = default_alignment_heads(cfg.decoder_layers, cfg.decoder_attention_heads)
    model = WhisperText(decoder, tokenizer, heads)
    dtype = dtype or resolve_precision("auto", device).encoder_dtype
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def write_tiny_whisper(
    directory: str | os.PathLike, seed: int = 0, *, encoder: torch.nn.Module | None = None
) -> Path:
    """An HF Whisper folder (config, model.safetensors, tokenizer files) holding the tiny SALMONN's
    encoder (`build_tiny(seed)`'s, or `encoder`) and `build_tiny_whisper_text(seed)`'s decoder:
    what `load_whisper_encoder` and `WhisperText.from_pretrained` both read."""
    from transformers import WhisperForConditionalGeneration

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if encoder is None:
        encoder = build_tiny(seed).speech_encoder
    text = build_tiny_whisper_text(seed, dtype=torch.float32)
    whisper = WhisperForConditionalGeneration(tiny_whisper_config())
    whisper.model.encoder.load_state_dict(encoder.state_dict())
    whisper.model.decoder.load_state_dict(text.decoder.state_dict())
    whisper.save_pretrained(directory)
    for f in tiny_whisper_tokenizer_dir().iterdir():
        if f.is_file():
            shutil.copy(f, directory / f.name)
    logger.info("wrote tiny Whisper (encoder + decoder + tokenizer) to %s", directory)
    return directory
