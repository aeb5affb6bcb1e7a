"""Whisper's decoder on the encoder output SALMONN already computes: transcript, language, word times.

SALMONN's speech encoder is Whisper-large-v2's encoder, frozen; the Whisper folder it is loaded
from holds the decoder too. Fed the encoder output *before* SALMONN's `ln_speech` (B, 1500, C),
the decoder gives, per 30-s window:

    detect_language  the language, from one decoder step on <|startoftranscript|>
    transcribe       Whisper's own transcript with timestamp segments (batched greedy decoding
                     with openai-whisper's logit rules), faster-whisper's hallucination figures
                     (avg_logprob, compression_ratio, no_speech_prob) and word times
    align            word times for any text (SALMONN's transcript), re-tokenised with Whisper's
                     tokenizer and teacher-forced through the decoder

Word times follow openai-whisper (`salmonn.timing` holds the steps). `num_frames` is each
window's real length in log-mel frames (10 ms: samples // 160), as in openai-whisper and
faster-whisper; the alignment only looks at the num_frames // 2 encoder frames of real audio.

    text = WhisperText.from_pretrained(whisper_dir, device="cuda", dtype=torch.bfloat16)
    text = WhisperText.tiny(seed=0)          # random, offline, the official token ids

A predictor holding, for a batch of windows, Whisper's encoder output `enc` (B, 1500, C) taken
*before* `ln_speech`, each window's real sample count, start time and the VAD's speech spans:

    frames = [mel_frames(n) for n in samples]
    languages = text.detect_language(enc)                        # [(code, probability)]
    codes = [code for code, _ in languages]
    whisper = text.transcribe(enc, frames, codes)                # [WhisperSegment]
    salmonn = text.align(enc, frames, salmonn_texts, codes)      # [[Word]], window times
    words = place_words(salmonn[i], start_s[i], spans)           # absolute, inside speech

The decoder costs ~0.9B parameters (1.8 GB in bf16); `transcribe` holds the cross-attention keys
and values of every window (32 layers x 2 x 1500 x 1280: ~250 MB per window in bf16).
"""

from __future__ import annotations

import inspect
import json
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .timing import (
    MEL_FRAMES_PER_SECOND,
    Word,
    WordTiming,
    add_word_timestamps,
    alignment_matrix,
    is_anomalous,
    word_timings,
)

logger = logging.getLogger(__name__)

# (decoder layer, head) pairs whose cross-attention follows the audio, decoded from
# openai-whisper's `_ALIGNMENT_HEADS["large-v2"]`. Older local copies of the hub folder lack them
# in generation_config.json, so they are written down here.
WHISPER_LARGE_V2_ALIGNMENT_HEADS: tuple[tuple[int, int], ...] = (
    (10, 12), (13, 17), (16, 11), (16, 12), (16, 13), (17, 15), (17, 16), (18, 4), (18, 11), (18, 19),
    (19, 11), (21, 2), (21, 3), (22, 3), (22, 9), (22, 12), (23, 5), (23, 7), (23, 13), (25, 5),
    (26, 1), (26, 12), (27, 15),
)  # fmt: skip
# Whisper-large-v2's decoder shape; a folder of this shape gets the heads above.
_LARGE_V2 = {"d_model": 1280, "decoder_layers": 32, "decoder_attention_heads": 20, "vocab_size": 51865}

# The 99 languages of the multilingual vocabulary, in token order (<|en|> = 50259, ...).
LANGUAGES: tuple[str, ...] = (
    "en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv", "it", "id",
    "hi", "fi", "vi", "he", "uk", "el", "ms", "cs", "ro", "da", "hu", "ta", "no", "th", "ur", "hr", "bg",
    "lt", "la", "mi", "ml", "cy", "sk", "te", "fa", "lv", "bn", "sr", "az", "sl", "kn", "et", "mk", "br",
    "eu", "is", "hy", "ne", "mn", "bs", "kk", "sq", "sw", "gl", "mr", "pa", "si", "km", "sn", "yo", "so",
    "af", "oc", "ka", "be", "tg", "sd", "gu", "am", "yi", "lo", "uz", "fo", "ht", "ps", "tk", "nn", "mt",
    "sa", "lb", "my", "bo", "tl", "mg", "as", "tt", "haw", "ln", "ha", "ba", "jw", "su",
)  # fmt: skip
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})  # words split on characters

TIME_PRECISION_S = 0.02  # one timestamp token step
SAMPLE_LEN = 224  # openai's sample_len: n_text_ctx // 2 new tokens at most
MAX_INITIAL_TIMESTAMP_S = 1.0  # the first timestamp is at most this (openai, faster-whisper)
SOT_LEN = 3  # <|startoftranscript|> <|lang|> <|transcribe|>

# faster-whisper's thresholds against hallucination, and the names of what failed (the values of
# schemas.vocabulary's FINISH_NO_SPEECH_PROB, FINISH_REPETITIVE, FINISH_LOW_LOGPROB)
LOGPROB_THRESHOLD = -1.0
COMPRESSION_RATIO_THRESHOLD = 2.4
NO_SPEECH_THRESHOLD = 0.6
FAILED_NO_SPEECH = "no_speech_prob"  # no_speech_prob > 0.6 and avg_logprob < -1.0: silence (faster-whisper drops it)
FAILED_COMPRESSION = "repetitive"  # compression_ratio > 2.4: the text repeats itself
FAILED_LOGPROB = "low_logprob"  # avg_logprob < -1.0: an unlikely transcript (faster-whisper would retry)

# The tokenizer files of an HF Whisper folder (tokenizer.json is optional)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of Whisper's special tokens (multilingual: <|endoftext|> 50257 ... timestamps from 50364)."""

    eot: int
    sot: int
    translate: int
    transcribe: int
    sot_lm: int
    sot_prev: int
    no_speech: int
    no_timestamps: int
    languages: tuple[tuple[str, int], ...]  # (code, id) in token order

    @property
    def timestamp_begin(self) -> int:
        """<|0.00|>; each later id is 20 ms more (as transformers: <|notimestamps|> + 1)."""
        return self.no_timestamps + 1

    def language_id(self, code: str) -> int:
        for c, i in self.languages:
            if c == code:
                return i
        raise ValueError(f"unknown Whisper language {code!r}; known: {[c for c, _ in self.languages]}")

    @classmethod
    def from_vocab(cls, vocab: dict[str, int]) -> SpecialTokens:
        def get(*names: str) -> int:
            for name in names:
                if name in vocab:
                    return vocab[name]
            raise ValueError(f"the Whisper tokenizer has none of {names}")

        specials = cls(
            eot=get("<|endoftext|>"),
            sot=get("<|startoftranscript|>"),
            translate=get("<|translate|>"),
            transcribe=get("<|transcribe|>"),
            sot_lm=get("<|startoflm|>"),
            sot_prev=get("<|startofprev|>"),
            no_speech=get("<|nospeech|>", "<|nocaptions|>"),
            no_timestamps=get("<|notimestamps|>"),
            languages=tuple((c, vocab[f"<|{c}|>"]) for c in (*LANGUAGES, "yue") if f"<|{c}|>" in vocab),
        )
        if not specials.languages:
            raise ValueError("the Whisper tokenizer has no language tokens (an English-only model?)")
        return specials


@dataclass(frozen=True)
class TimedText:
    """One of Whisper's timestamp segments: seconds from the window's start."""

    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True)
class WhisperSegment:
    """Whisper's answer for one window. Times are seconds from the window's start."""

    language: str
    text: str  # the whole window's text, stripped
    tokens: tuple[int, ...]  # generated ids, timestamps included, without <|endoftext|>
    segments: tuple[TimedText, ...]  # the timestamp segments (adjusted by the word times, as openai does)
    words: tuple[Word, ...]  # openai's clamps applied; `place_words` makes them absolute
    avg_logprob: float  # sum of the chosen tokens' log-probabilities (EOT included) / (tokens + 1)
    compression_ratio: float  # len(utf-8 text) / len(zlib(text))
    no_speech_prob: float  # P(<|nospeech|>) after <|startoftranscript|>
    failed: str | None  # FAILED_NO_SPEECH | FAILED_COMPRESSION | FAILED_LOGPROB | None
    anomalous: bool  # openai's word anomaly test on the first 8 words (hallucination around silence)
    finished: bool  # False: max_new_tokens reached before <|endoftext|>


def mel_frames(n_samples: int) -> int:
    """`num_frames` of a window of `n_samples` real 16-kHz samples: log-mel frames of 10 ms (hop
    160), at most 3000 (30 s)."""
    return min(int(n_samples), 480_000) // 160


def compression_ratio(text: str) -> float:
    """Bytes of `text` over bytes of its zlib compression (faster-whisper, openai-whisper)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def failure_reason(avg_logprob: float, compression: float, no_speech_prob: float) -> str | None:
    """Why faster-whisper would not accept a window's answer, or None.

    Silence first (no_speech_prob above 0.6 with avg_logprob below -1.0: faster-whisper drops
    the window's text), then a compression ratio above 2.4, then avg_logprob below -1.0 (where
    faster-whisper would retry at a higher temperature)."""
    if no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOGPROB_THRESHOLD:
        return FAILED_NO_SPEECH
    if compression > COMPRESSION_RATIO_THRESHOLD:
        return FAILED_COMPRESSION
    if avg_logprob < LOGPROB_THRESHOLD:
        return FAILED_LOGPROB
    return None


def split_segments(
    tokens: Sequence[int], timestamp_begin: int, duration_s: float
) -> list[tuple[float, float, list[int]]]:
    """(start_s, end_s, text tokens) of each timestamp segment of one window's generated tokens.

    "<|t0|> text <|t1|><|t1|> text <|t2|>": a segment runs from a timestamp to the next one.
    Text before any timestamp starts at 0; text after the last timestamp (the window ended
    mid-segment: openai would decode again from there, our windows are fixed) ends at the
    window's real duration. Times are clamped to [0, duration_s]."""
    out: list[tuple[float, float, list[int]]] = []
    start: float | None = None
    text: list[int] = []
    for tok in tokens:
        if tok >= timestamp_begin:
            t = min(round((tok - timestamp_begin) * TIME_PRECISION_S, 2), duration_s)
            if text:
                begin = start if start is not None else 0.0
                out.append((begin, max(t, begin), text))
                text, start = [], None
            else:
                start = t
        else:
            text.append(tok)
    if text:
        begin = start if start is not None else 0.0
        out.append((begin, max(duration_s, begin), text))
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (the vocab files' spelling)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_ALPHABET = _bytes_to_unicode()


def _cache_kwarg() -> str:
    """The KV-cache argument of WhisperDecoder.forward (`cache` in transformers >= 5.2x, before
    that `past_key_values`)."""
    from transformers.models.whisper.modeling_whisper import WhisperDecoder

    params = inspect.signature(WhisperDecoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class WhisperText(nn.Module):
    """Whisper's decoder (its output projection is the token embedding, tied) with its tokenizer
    and alignment heads. Build with `from_pretrained` or `tiny`."""

    def __init__(self, decoder: nn.Module, tokenizer: Any, alignment_heads: Sequence[tuple[int, int]]):
        super().__init__()
        self.decoder: Any = decoder  # transformers WhisperDecoder (Any: its config and layers are typed loosely)
        self.tokenizer = tokenizer
        cfg: Any = decoder.config
        heads = tuple(sorted({(int(layer), int(head)) for layer, head in alignment_heads}))
        bad = [h for h in heads if not (0 <= h[0] < cfg.decoder_layers and 0 <= h[1] < cfg.decoder_attention_heads)]
        if not heads or bad:
            raise ValueError(f"alignment heads {bad or '(none)'} do not fit a decoder of "
                             f"{cfg.decoder_layers} layers x {cfg.decoder_attention_heads} heads")
        self.alignment_heads = heads
        vocab = tokenizer.get_vocab()
        self.special = SpecialTokens.from_vocab(vocab)
        self._cache_kw = _cache_kwarg()
        decode_byte = {c: b for b, c in BYTE_ALPHABET.items()}
        eot = self.special.eot
        self._token_bytes: list[bytes] = [b""] * eot
        self._special_text: dict[int, str] = {}
        for token, i in vocab.items():
            if i < eot:
                self._token_bytes[i] = bytes(decode_byte[c] for c in token) if all(
                    c in decode_byte for c in token) else token.encode()
            else:
                self._special_text[i] = token
        # openai's SuppressTokens("-1"): symbols that are not speech, the task and prompt tokens and
        # <|nospeech|> (<|notimestamps|> goes with the timestamp rules)
        s = self.special
        self._suppress = sorted({*self._non_speech_tokens(), s.transcribe, s.translate, s.sot, s.sot_prev, s.sot_lm,
                                 s.no_speech})
        self._suppress_blank = [*self.encode(" "), eot]  # openai's SuppressBlank, first step only

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        whisper_dir: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        alignment_heads: Sequence[tuple[int, int]] | None = None,
        attn_implementation: str = "eager",
    ) -> WhisperText:
        """The decoder, tokenizer and alignment heads of an HF Whisper folder (the one SALMONN's
        encoder comes from); only the decoder's tensors are read. Alignment heads: as given, else
        the folder's generation_config.json, else Whisper-large-v2's for a folder of its shape,
        else every head of the second half of the decoder layers (openai's default)."""
        from .checkpoint import load_whisper_half

        directory = Path(whisper_dir).expanduser()
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory}: not an HF Whisper folder (no config.json)")
        decoder, cfg = load_whisper_half(directory, "decoder", attn_implementation=attn_implementation)
        tokenizer = load_whisper_tokenizer(directory)
        heads = alignment_heads if alignment_heads is not None else _folder_alignment_heads(directory, cfg)
        model = cls(decoder, tokenizer, heads)
        logger.info("loaded Whisper decoder (%d layers) and tokenizer from %s", cfg.decoder_layers, directory)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @classmethod
    def tiny(
        cls, seed: int = 0, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> WhisperText:
        """A random decoder of the tiny preset's width with the official special tokens (offline)."""
        from .tiny import build_tiny_whisper_text

        return build_tiny_whisper_text(seed, device=device, dtype=dtype)

    # --- properties --------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.decoder.embed_tokens.weight.dtype
        return dtype

    @property
    def max_text_tokens(self) -> int:
        """Text tokens `align` can time in one window (448 positions less the 5 around them)."""
        return int(self.decoder.config.max_target_positions) - SOT_LEN - 2

    # --- tokens <-> text -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Whisper's text tokens for `text` (no special tokens, even where the text spells one)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        return [i for i in ids if i < self.special.eot]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the text tokens among `ids` (bytes joined first: tiktoken's decoding)."""
        eot = self.special.eot
        return b"".join(self._token_bytes[i] for i in ids if i < eot).decode("utf-8", errors="replace")

    def _decode_with_specials(self, ids: Sequence[int]) -> str:
        eot = self.special.eot
        parts: list[str] = []
        run: list[bytes] = []
        for i in ids:
            if i < eot:
                run.append(self._token_bytes[i])
                continue
            parts.append(b"".join(run).decode("utf-8", errors="replace"))
            run = []
            parts.append(self._special_text.get(i, f"<|{i}|>"))
        parts.append(b"".join(run).decode("utf-8", errors="replace"))
        return "".join(parts)

    def _non_speech_tokens(self) -> set[int]:
        """openai's `non_speech_tokens`: single tokens for symbols and speaker-tag brackets."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        miscellaneous = set("♩♪♫♬♭♮♯")
        out = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(miscellaneous):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or (symbol in miscellaneous and tokens):
                    out.add(tokens[0])
        return out

    def split_to_word_tokens(self, tokens: Sequence[int], language: str) -> tuple[list[str], list[list[int]]]:
        """Words and their tokens (openai): on spaces and punctuation, or on whole characters for
        languages written without spaces."""
        subwords, subword_tokens = self._split_on_unicode(tokens)
        if language in NO_SPACE_LANGUAGES:
            return subwords, subword_tokens
        import string

        words: list[str] = []
        word_tokens: list[list[int]] = []
        for subword, toks in zip(subwords, subword_tokens):
            special = toks[0] >= self.special.eot
            if special or subword.startswith(" ") or subword.strip() in string.punctuation or not words:
                words.append(subword)
                word_tokens.append(list(toks))
            else:
                words[-1] += subword
                word_tokens[-1].extend(toks)
        return words, word_tokens

    def _split_on_unicode(self, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        """Tokens grouped so that each group decodes to whole characters."""
        full = self._decode_with_specials(tokens)
        replacement = "\ufffd"
        words: list[str] = []
        groups: list[list[int]] = []
        current: list[int] = []
        offset = 0
        for tok in tokens:
            current.append(tok)
            text = self._decode_with_specials(current)
            if replacement not in text or full[offset + text.index(replacement)] == replacement:
                words.append(text)
                groups.append(current)
                current = []
                offset += len(text)
        return words, groups

    # --- the decoder ---------------------------------------------------------------------------
    def _prepare(self, enc: torch.Tensor) -> torch.Tensor:
        if enc.dim() != 3 or enc.shape[-1] != self.decoder.config.d_model:
            raise ValueError(f"encoder output must be (B, T, {self.decoder.config.d_model}), got {tuple(enc.shape)}")
        return enc.to(self.device, self.dtype)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.decoder.embed_tokens.weight).float()  # (B, L, V); proj_out is tied

    def _hidden(self, ids: torch.Tensor, enc: torch.Tensor, cache: Any = None) -> torch.Tensor:
        kwargs = {self._cache_kw: cache, "use_cache": cache is not None}
        return self.decoder(input_ids=ids, encoder_hidden_states=enc, **kwargs).last_hidden_state  # (B, L, C)

    def _forward(self, ids: torch.Tensor, enc: torch.Tensor, cache: Any = None) -> torch.Tensor:
        return self._logits(self._hidden(ids, enc, cache))  # (B, L, V)

    def _languages(self, enc: torch.Tensor, language: str | Sequence[str] | None) -> list[str]:
        n = enc.shape[0]
        if language is None:
            return [code for code, _ in self.detect_language(enc)]
        codes = [language] * n if isinstance(language, str) else list(language)
        if len(codes) != n:
            raise ValueError(f"{n} windows but {len(codes)} languages")
        for code in set(codes):
            self.special.language_id(code)  # raises for an unknown code
        return codes

    @torch.inference_mode()
    def detect_language(self, enc: torch.Tensor) -> list[tuple[str, float]]:
        """(language code, probability) per window: one decoder step on <|startoftranscript|>,
        a softmax over the language tokens only (openai's `detect_language`)."""
        enc = self._prepare(enc)
        ids = torch.full((enc.shape[0], 1), self.special.sot, device=self.device)
        logits = self._forward(ids, enc)[:, 0]  # (B, V)
        codes = [c for c, _ in self.special.languages]
        lang_ids = torch.tensor([i for _, i in self.special.languages], device=self.device)
        probs = logits[:, lang_ids].softmax(dim=-1)  # (B, languages)
        best = probs.argmax(dim=-1)
        return [(codes[b], float(probs[r, b])) for r, b in enumerate(best.tolist())]

    @torch.inference_mode()
    def transcribe(
        self,
        enc: torch.Tensor,
        num_frames: Sequence[int],
        language: str | Sequence[str] | None = None,
        *,
        max_new_tokens: int = SAMPLE_LEN,
        word_timestamps: bool = True,
    ) -> list[WhisperSegment]:
        """Whisper's transcript of each window (greedy, timestamps on, batched).

        `enc` (B, 1500, C) is Whisper's encoder output before `ln_speech`; `num_frames` each
        window's real log-mel frames; `language` one code for all, one per window, or None to
        detect it per window. Words are timed by aligning the transcript's text tokens."""
        enc = self._prepare(enc)
        n = enc.shape[0]
        if len(num_frames) != n:
            raise ValueError(f"{n} windows but {len(num_frames)} frame counts")
        languages = self._languages(enc, language)
        tokens, sum_logprobs, no_speech, finished = self._generate(enc, languages, max_new_tokens)
        durations = [f / MEL_FRAMES_PER_SECOND for f in num_frames]
        eot, tb = self.special.eot, self.special.timestamp_begin
        pieces = [  # text tokens only (a special token among them, which greedy decoding allows, is dropped)
            [(a, b, [t for t in text if t < eot]) for a, b, text in split_segments(row, tb, d)]
            for row, d in zip(tokens, durations)
        ]
        text_rows = [[tok for _, _, text in segs for tok in text] for segs in pieces]
        timings = (
            self._word_timings(enc, num_frames, text_rows, languages) if word_timestamps else [[] for _ in range(n)]
        )
        out = []
        for r in range(n):
            text = self.decode(text_rows[r]).strip()
            avg = sum_logprobs[r] / (len(tokens[r]) + 1)
            ratio = compression_ratio(text)
            bounds = [(a, b) for a, b, _ in pieces[r]]
            words: list[Word] = []
            if timings[r]:
                per_segment, bounds = add_word_timestamps(timings[r], [(a, b, len(t)) for a, b, t in pieces[r]])
                words = [w for ws in per_segment for w in ws]
            segments = tuple(
                TimedText(float(a), float(b), self.decode(t).strip()) for (a, b), (_, _, t) in zip(bounds, pieces[r])
            )
            out.append(
                WhisperSegment(
                    language=languages[r],
                    text=text,
                    tokens=tuple(tokens[r]),
                    segments=segments,
                    words=tuple(words),
                    avg_logprob=avg,
                    compression_ratio=ratio,
                    no_speech_prob=no_speech[r],
                    failed=failure_reason(avg, ratio, no_speech[r]),
                    anomalous=is_anomalous(words),
                    finished=finished[r],
                )
            )
        return out

    def _generate(
        self, enc: torch.Tensor, languages: Sequence[str], max_new_tokens: int
    ) -> tuple[list[list[int]], list[float], list[float], list[bool]]:
        """Greedy decoding with openai's logit rules: (tokens without EOT, sum of chosen
        log-probabilities incl. EOT, no-speech probability, reached EOT) per window."""
        from transformers import DynamicCache, EncoderDecoderCache

        s = self.special
        n = enc.shape[0]
        max_new_tokens = min(max_new_tokens, int(self.decoder.config.max_target_positions) - SOT_LEN)
        prompt = torch.tensor([[s.sot, s.language_id(c), s.transcribe] for c in languages], device=self.device)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        logits = self._forward(prompt, enc, cache)  # (B, 3, V)
        no_speech = logits[:, 0].softmax(dim=-1)[:, s.no_speech].tolist()
        step_logits = logits[:, -1]
        suppress = torch.tensor(self._suppress, device=self.device)
        blank = torch.tensor(self._suppress_blank, device=self.device)
        tokens: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        sum_logprobs = torch.zeros(n, device=self.device)
        rows = torch.arange(n, device=self.device)
        for step in range(max_new_tokens):
            x = step_logits.clone()  # (B, V) float32
            if step == 0:
                x[:, blank] = -torch.inf
            x[:, suppress] = -torch.inf
            self._timestamp_rules(x, tokens)
            logprobs = x.log_softmax(dim=-1)
            nxt = x.argmax(dim=-1)  # (B,)
            live = torch.tensor([not d for d in done], device=self.device)
            sum_logprobs += logprobs[rows, nxt] * live
            nxt = torch.where(live, nxt, torch.full_like(nxt, s.eot))
            for r, tok in enumerate(nxt.tolist()):
                if done[r]:
                    continue
                if tok == s.eot:
                    done[r] = True
                else:
                    tokens[r].append(tok)
            if all(done):
                break
            step_logits = self._forward(nxt[:, None], enc, cache)[:, -1]
        return tokens, sum_logprobs.tolist(), no_speech, done

    def _timestamp_rules(self, logits: torch.Tensor, tokens: Sequence[Sequence[int]]) -> None:
        """openai's ApplyTimestampRules, in place on (B, V) logits given each row's tokens so far."""
        s = self.special
        tb = s.timestamp_begin
        logits[:, s.no_timestamps] = -torch.inf
        for r, seq in enumerate(tokens):
            last_ts = len(seq) >= 1 and seq[-1] >= tb
            penultimate_ts = len(seq) < 2 or seq[-2] >= tb
            if last_ts:
                if penultimate_ts:  # a pair just closed: text (or EOT) next
                    logits[r, tb:] = -torch.inf
                else:  # a segment just ended: another timestamp or EOT, no text
                    logits[r, : s.eot] = -torch.inf
            stamps = [t for t in seq if t >= tb]
            if stamps:  # timestamps never decrease, and a segment is never empty
                floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
                logits[r, tb:floor] = -torch.inf
            if not seq:  # the first token is a timestamp, at most 1 s in
                logits[r, :tb] = -torch.inf
                logits[r, tb + round(MAX_INITIAL_TIMESTAMP_S / TIME_PRECISION_S) + 1 :] = -torch.inf
        # a timestamp when all of them together are likelier than any one text token
        logprobs = logits.log_softmax(dim=-1)
        timestamp_lp = logprobs[:, tb:].logsumexp(dim=-1)
        text_lp = logprobs[:, :tb].max(dim=-1).values
        logits[:, :tb] = torch.where((timestamp_lp > text_lp)[:, None], -torch.inf, logits[:, :tb])

    # --- word times ----------------------------------------------------------------------------
    @torch.inference_mode()
    def align(
        self,
        enc: torch.Tensor,
        num_frames: Sequence[int],
        texts: Sequence[str],
        language: str | Sequence[str] | None,
    ) -> list[list[Word]]:
        """Word times for any text per window (SALMONN's transcript): seconds from the window's
        start, openai's clamps applied with the window's real audio as the one segment.

        A text is tokenised as Whisper writes it (a leading space); an empty text, or one of
        more than `max_text_tokens` Whisper tokens (a runaway repetition), gets no words."""
        enc = self._prepare(enc)
        n = enc.shape[0]
        if len(num_frames) != n or len(texts) != n:
            raise ValueError(f"{n} windows but {len(num_frames)} frame counts and {len(texts)} texts")
        languages = self._languages(enc, language)
        rows: list[list[int]] = []
        for text in texts:
            ids = self.encode(" " + text.strip()) if text.strip() else []
            if len(ids) > self.max_text_tokens:
                logger.warning("text of %d Whisper tokens is longer than %d: not timed", len(ids), self.max_text_tokens)
                ids = []
            rows.append(ids)
        timings = self._word_timings(enc, num_frames, rows, languages)
        out: list[list[Word]] = []
        for r in range(n):
            if not timings[r]:
                out.append([])
                continue
            words, _ = add_word_timestamps(timings[r], [(0.0, num_frames[r] / MEL_FRAMES_PER_SECOND, len(rows[r]))])
            out.append(words[0])
        return out

    def _word_timings(
        self, enc: torch.Tensor, num_frames: Sequence[int], rows: Sequence[Sequence[int]], languages: Sequence[str]
    ) -> list[list[WordTiming]]:
        """openai's `find_alignment` for each window with text tokens, in one batched pass."""
        s = self.special
        out: list[list[WordTiming]] = [[] for _ in rows]
        live = [r for r, ids in enumerate(rows) if ids]
        if not live:
            return out
        seqs = [[s.sot, s.language_id(languages[r]), s.transcribe, s.no_timestamps, *rows[r], s.eot] for r in live]
        width = max(len(q) for q in seqs)
        ids = torch.tensor([q + [s.eot] * (width - len(q)) for q in seqs], device=self.device)  # (B', L)
        enc_live = enc[live]  # (B', T, C)
        scores, hidden = self._cross_attention_scores(ids, enc_live)  # (B', H, L, T), (B', L, C)
        for b, r in enumerate(live):
            k = len(rows[r])
            text = torch.tensor(rows[r], device=self.device)
            # row i predicts text token i (the row of <|notimestamps|> the first); text tokens only
            logits = F.linear(hidden[b, SOT_LEN : SOT_LEN + k], self.decoder.embed_tokens.weight[: s.eot]).float()
            probs = logits.softmax(dim=-1)  # (k, eot)
            token_probs = probs[torch.arange(k, device=self.device), text].tolist()
            frames = max(2, min(int(num_frames[r]), 2 * enc.shape[1]))
            matrix = alignment_matrix(scores[b, :, : k + SOT_LEN + 2], frames)[SOT_LEN:-1]  # (k + 1, T')
            words, word_tokens = self.split_to_word_tokens([*rows[r], s.eot], languages[r])
            if len(word_tokens) <= 1:
                continue
            out[r] = word_timings(matrix, words[:-1], word_tokens[:-1], token_probs)
        return out

    def _cross_attention_scores(self, ids: torch.Tensor, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-softmax cross-attention scores q.k/sqrt(d) of the alignment heads (B, H, L, T) in
        float32, and the decoder's last hidden states (B, L, C), from one teacher-forced pass. The scores are recomputed
        from each alignment layer's query input (captured for this pass only) and the encoder
        output, so they are the same whatever attention implementation the decoder runs."""
        layers = sorted({layer for layer, _ in self.alignment_heads})
        inputs: dict[int, torch.Tensor] = {}

        def capture(layer: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                inputs[layer] = args[0] if args else kwargs["hidden_states"]

            return hook

        handles = [
            self.decoder.layers[layer].encoder_attn.register_forward_pre_hook(capture(layer), with_kwargs=True)
            for layer in layers
        ]
        try:
            hidden = self._hidden(ids, enc)
        finally:
            for h in handles:
                h.remove()
        b, length = ids.shape
        parts = []
        for layer in layers:
            attn = self.decoder.layers[layer].encoder_attn
            heads = [h for la, h in self.alignment_heads if la == layer]
            q = (attn.q_proj(inputs[layer]) * attn.scaling).view(b, length, attn.num_heads, attn.head_dim)
            k = attn.k_proj(enc).view(b, enc.shape[1], attn.num_heads, attn.head_dim)
            parts.append(torch.einsum("blhd,bthd->bhlt", q[:, :, heads].float(), k[:, :, heads].float()))
        return torch.cat(parts, dim=1), hidden


def load_whisper_tokenizer(directory: str | Path) -> Any:
    """The Whisper tokenizer of an HF Whisper folder (vocab.json + merges.txt, or tokenizer.json)."""
    from transformers import WhisperTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file() and not all(
        (directory / f).is_file() for f in ("vocab.json", "merges.txt")
    ):
        raise FileNotFoundError(
            f"{directory} has no Whisper tokenizer files (vocab.json + merges.txt or tokenizer.json): a Whisper "
            f"folder fetched for SALMONN's encoder alone. Fetch the whisper part again "
            f"(`salmonn-pipeline weights fetch PRESET --to DIR`) or copy {', '.join(TOKENIZER_FILES)} from the "
            f"hub's openai/whisper-large-v2 there."
        )
    return WhisperTokenizer.from_pretrained(str(directory))


def _folder_alignment_heads(directory: Path, cfg: Any) -> tuple[tuple[int, int], ...]:
    gen = directory / "generation_config.json"
    if gen.is_file():
        heads = json.loads(gen.read_text()).get("alignment_heads")
        if heads:
            return tuple((int(a), int(b)) for a, b in heads)
    if all(getattr(cfg, k, None) == v for k, v in _LARGE_V2.items()):
        return WHISPER_LARGE_V2_ALIGNMENT_HEADS
    return default_alignment_heads(cfg.decoder_layers, cfg.decoder_attention_heads)


def default_alignment_heads(layers: int, heads: int) -> tuple[tuple[int, int], ...]:
    """openai's default: every head of the second half of the decoder layers."""
    return tuple((layer, head) for layer in range(layers // 2, layers) for head in range(heads))
