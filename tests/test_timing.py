"""Timed text: Whisper's decoder on the shared encoder output, word times (salmonn.whisper_text,
salmonn.timing). A tiny random model with the official token ids; no download."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch

from salmonn import timing
from salmonn.timing import Word, WordTiming, place_words
from salmonn.whisper_text import (
    FAILED_COMPRESSION,
    FAILED_LOGPROB,
    FAILED_NO_SPEECH,
    LANGUAGES,
    WHISPER_LARGE_V2_ALIGNMENT_HEADS,
    WhisperText,
    compression_ratio,
    default_alignment_heads,
    failure_reason,
    mel_frames,
    split_segments,
)

PUNCTUATION = timing.PREPEND_PUNCTUATIONS + timing.APPEND_PUNCTUATIONS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matrices: extra threads only fight over the shared cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> WhisperText:
    return WhisperText.tiny(seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def enc() -> torch.Tensor:
    """Encoder output of the tiny preset's Whisper encoder on random log-mels (B=3)."""
    from salmonn.tiny import build_tiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        mel = torch.randn(3, 80, 3000)
    encoder = build_tiny(0, dtype=torch.float32).speech_encoder
    with torch.inference_mode():
        return encoder(mel).last_hidden_state  # (3, 1500, 64)


# --- the pure steps against transformers' pieces ---------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 5, 40), (3, 7, 4), (1, 3, 3), (2, 4, 1), (4, 9, 200)])
def test_median_filter_matches_transformers(shape):
    from transformers.models.whisper.generation_whisper import _median_filter

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    for width in (1, 3, 7):
        torch.testing.assert_close(timing.median_filter(x, width), _median_filter(x[None], width)[0], rtol=0, atol=0)
    with pytest.raises(ValueError):
        timing.median_filter(x, 4)


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (3, 5), (20, 150), (61, 400), (120, 90)])
def test_dtw_matches_transformers(shape):
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping

    rng = np.random.default_rng(sum(shape))
    for matrix in (
        rng.standard_normal(shape).astype(np.float32),
        rng.integers(0, 3, shape).astype(np.float32),  # many exact ties: the tie-breaking must agree
    ):
        want_text, want_time = _dynamic_time_warping(matrix)
        text, time = timing.dtw(matrix)
        np.testing.assert_array_equal(text, want_text)
        np.testing.assert_array_equal(time, want_time)
        assert text[0] == time[0] == 0 and text[-1] == shape[0] - 1 and time[-1] == shape[1] - 1
        assert np.all(np.diff(text) >= 0) and np.all(np.diff(time) >= 0)


def test_alignment_matrix_cuts_before_the_softmax():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 6, 1500, generator=g)
    other = scores.clone()
    other[:, :, 100:] = torch.randn(3, 6, 1400, generator=g) * 50  # frames past the real audio
    a = timing.alignment_matrix(scores, num_frames=200)  # 200 mel frames = 100 encoder frames
    assert a.shape == (6, 100)
    torch.testing.assert_close(a, timing.alignment_matrix(other, num_frames=200))
    # by hand: softmax over the real frames, z-score over tokens, median filter 7, mean over heads
    w = scores[:, :, :100].softmax(-1)
    w = (w - w.mean(-2, keepdim=True)) / w.std(-2, keepdim=True, unbiased=False)
    torch.testing.assert_close(a, timing.median_filter(w, 7).mean(0))


def _t(word, start, end, tokens=1, p=0.5):
    return WordTiming(word, list(range(tokens)), start, end, p)


def test_merge_punctuations():
    words = [_t(" \"", 0, 0.1), _t("Hello", 0.1, 0.5), _t(",", 0.5, 0.6), _t(" (", 0.6, 0.7),
             _t(" world", 0.7, 1.0), _t(")", 1.0, 1.1), _t(".", 1.1, 1.2), _t("\"", 1.2, 1.3)]
    merged = timing.merge_punctuations(words)
    assert [w.word for w in merged] == ["", " \"Hello,", "", "", " ( world).\"", "", "", ""]
    assert sum(len(w.tokens) for w in merged) == len(words)  # token counts still add up
    assert [(w.start, w.end) for w in merged] == [(w.start, w.end) for w in words]  # times untouched
    assert words[1].word == "Hello"  # a copy: the input is not changed


def test_add_word_timestamps_clamps():
    # median duration 0.2 s -> words next to a sentence end no longer than 0.4 s
    timings = [_t(" One", 0.0, 0.2), _t(" two", 0.2, 0.4), _t(".", 0.4, 1.4), _t(" Three", 1.4, 3.0),
               _t(" four", 3.0, 3.2)]
    words, bounds = timing.add_word_timestamps(timings, [(0.0, 3.2, 5)])
    got = [(w.word, w.start_s, w.end_s) for w in words[0]]
    assert got == [(" One", 0.0, 0.2), (" two.", 0.2, 0.4), (" Three", 2.6, 3.0), (" four", 3.0, 3.2)]
    assert bounds == [(0.0, 3.2)]
    # the first word after a long pause: no longer than twice the median
    timings = [_t(" a", 0.0, 4.0), _t(" b", 4.0, 4.2), _t(" c", 4.2, 4.4), _t(" d", 4.4, 4.6)]
    words, _ = timing.add_word_timestamps(timings, [(0.0, 4.6, 4)])
    assert (words[0][0].start_s, words[0][0].end_s) == pytest.approx((3.6, 4.0))
    # two segments: words are attributed by token counts; the segment's start wins over a long first word
    timings = [_t(" x", 0.0, 0.2), _t(" y", 0.2, 0.4, tokens=2), _t(" z", 0.4, 3.0), _t(" w", 3.0, 3.2)]
    words, bounds = timing.add_word_timestamps(timings, [(0.0, 0.4, 3), (2.6, 3.2, 2)], last_speech_s=0.0)
    assert [[w.word for w in ws] for ws in words] == [[" x", " y"], [" z", " w"]]
    assert words[1][0].start_s == pytest.approx(2.6) and bounds[1] == pytest.approx((2.6, 3.2))


def test_word_anomaly():
    good = [Word(f" w{i}", i * 0.4, i * 0.4 + 0.3, 0.9) for i in range(10)]
    bad = [Word(f" w{i}", i * 0.02, i * 0.02, 0.05) for i in range(10)]  # improbable, zero-length
    assert not timing.is_anomalous(good) and timing.is_anomalous(bad) and not timing.is_anomalous([])


# --- place_words: absolute times and the VAD --------------------------------------------------------
def _w(start, end, word=" w"):
    return Word(word, start, end, 0.5)


def test_place_words_without_spans_offsets_and_orders():
    words = [_w(0.0, 0.5), _w(0.4, 0.9), _w(0.9, 0.9)]
    for spans in (None, []):
        got = place_words(words, 60.0, spans)
        assert [(w.start_s, w.end_s) for w in got] == [(60.0, 60.5), (60.5, 60.9), (60.9, 60.9)]


def test_place_words_snaps_to_speech():
    spans = [(101.0, 103.0), (106.0, 108.0)]  # absolute; a 3-s pause between
    words = [
        _w(0.5, 1.5),  # starts in silence before the first span, reaches into it -> starts at 101.0
        _w(1.5, 2.5),  # inside speech: unchanged
        _w(2.8, 6.1),  # from span 1 across the pause, mostly before it -> ends at 103.0
        _w(4.0, 4.5),  # wholly in the pause, nearer span 1 (1.0 s vs 1.5 s) -> [102.5, 103.0], after the word before
        _w(5.5, 7.0),  # starts in the pause, reaches into span 2 -> starts at 106.0
        _w(7.0, 8.6),  # runs into the silence after the last span -> ends at 108.0
        _w(9.0, 9.2),  # after the last span, wholly in silence -> into span 2's end
    ]
    got = [(w.start_s, w.end_s) for w in place_words(words, 100.0, spans)]
    assert got == [(101.0, 101.5), (101.5, 102.5), (102.8, 103.0), (103.0, 103.0), (106.0, 107.0),
                   (107.0, 108.0), (108.0, 108.0)]


def test_place_words_mostly_after_a_pause_starts_after_it():
    # the first word after a pause, dragged back into the silence by DTW (faster-whisper #125)
    got = place_words([_w(1.6, 3.0)], 0.0, [(0.0, 2.0), (2.5, 4.0)])
    assert [(w.start_s, w.end_s) for w in got] == [(2.5, 3.0)]


def test_place_words_short_gaps_are_not_pauses():
    got = place_words([_w(1.5, 2.4)], 0.0, [(0.0, 2.0), (2.1, 4.0)], min_pause_s=0.3)
    assert [(w.start_s, w.end_s) for w in got] == [(1.5, 2.4)]
    got = place_words([_w(1.5, 2.4)], 0.0, [(0.0, 2.0), (2.1, 4.0)], min_pause_s=0.05)
    assert [(w.start_s, w.end_s) for w in got] == [(1.5, 2.0)]


def test_place_words_invariants_on_random_input():
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        times = np.sort(rng.uniform(0, 30, 2 * n)).round(2)
        words = [_w(float(a), float(b)) for a, b in zip(times[::2], times[1::2])]
        edges = np.sort(rng.uniform(0, 30, 2 * int(rng.integers(1, 6)))).round(2)
        spans = [(500 + float(a), 500 + float(b)) for a, b in zip(edges[::2], edges[1::2])]
        merged = timing.merge_spans(spans)
        got = place_words(words, 500.0, spans)
        assert len(got) == len(words)
        for i, w in enumerate(got):
            assert w.end_s >= w.start_s
            if i:
                assert w.start_s >= got[i - 1].end_s - 1e-9  # ordered, no overlap
            inside = [k for k, (a, b) in enumerate(merged) if a - 1e-6 <= w.start_s <= b + 1e-6]
            assert inside, (w, merged)  # no word starts in silence ...
            k = inside[-1]
            later = [a for a, _ in merged[k + 1 :]]
            assert not later or w.end_s <= later[0] + 1e-6  # ... or runs across a pause


def test_spans_from_mask():
    mask = [False, True, True, False, False, True]
    got = timing.spans_from_mask(mask, 0.032, 10.0)
    assert len(got) == 2 and [x for s in got for x in s] == pytest.approx([10.032, 10.096, 10.16, 10.192])
    assert timing.spans_from_mask([], 0.032) == []


# --- the window-level figures ------------------------------------------------------------------------
def test_failure_reasons_use_faster_whisper_thresholds():
    assert failure_reason(-0.5, 1.5, 0.1) is None
    assert failure_reason(-1.2, 1.5, 0.7) == FAILED_NO_SPEECH
    assert failure_reason(-0.5, 1.5, 0.9) is None  # confident text despite no_speech_prob
    assert failure_reason(-0.5, 2.5, 0.1) == FAILED_COMPRESSION
    assert failure_reason(-1.2, 1.5, 0.1) == FAILED_LOGPROB
    assert compression_ratio("la " * 100) > 2.4 > compression_ratio("The quick brown fox jumps over the lazy dog.")
    from schemas import vocabulary

    assert (FAILED_NO_SPEECH, FAILED_COMPRESSION, FAILED_LOGPROB) == vocabulary.FINISH_WHISPER_FAILED


def test_split_segments():
    tb = 50364
    toks = [tb + 0, 1, 2, tb + 50, tb + 50, 3, tb + 100, tb + 110, 4, 5]  # the last segment unfinished
    assert split_segments(toks, tb, 2.9) == [(0.0, 1.0, [1, 2]), (1.0, 2.0, [3]), (2.2, 2.9, [4, 5])]
    assert split_segments([1, 2, tb + 200], tb, 3.0) == [(0.0, 3.0, [1, 2])]  # clamped to the real audio
    assert split_segments([tb, tb + 10], tb, 3.0) == []


def test_alignment_heads():
    assert len(WHISPER_LARGE_V2_ALIGNMENT_HEADS) == 23
    assert all(0 <= layer < 32 and 0 <= head < 20 for layer, head in WHISPER_LARGE_V2_ALIGNMENT_HEADS)
    assert default_alignment_heads(4, 2) == ((2, 0), (2, 1), (3, 0), (3, 1))
    from transformers.models.whisper.tokenization_whisper import LANGUAGES as HF_LANGUAGES

    assert LANGUAGES == tuple(HF_LANGUAGES)[:99]


# --- the tiny model end to end -----------------------------------------------------------------------
def test_tiny_special_tokens(model):
    s = model.special
    assert (s.eot, s.sot, s.translate, s.transcribe, s.no_speech, s.no_timestamps, s.timestamp_begin) == (
        50257, 50258, 50358, 50359, 50362, 50363, 50364)
    assert s.languages[0] == ("en", 50259) and s.languages[-1] == ("su", 50357)
    assert model.decoder.config.d_model == 64 and model.decoder.embed_tokens.weight.shape == (51865, 64)
    assert model.alignment_heads == default_alignment_heads(4, 4)[:]  # second half of 4 layers
    assert model.decode(model.encode(" Hello, world! café")) == " Hello, world! café"


def test_detect_language(model, enc):
    got = model.detect_language(enc)
    assert len(got) == 3
    assert all(code in LANGUAGES and 0.0 < p <= 1.0 for code, p in got)


def _check_words(words, duration, text=True):
    for i, w in enumerate(words):
        assert 0.0 <= w.start_s <= w.end_s <= duration + 1e-6, (w, duration)
        assert 0.0 <= w.probability <= 1.0
        if text:
            assert w.word.strip() and w.word.strip() not in PUNCTUATION  # punctuation is merged into words
        if i:
            assert w.start_s >= words[i - 1].start_s


def test_transcribe(model, enc):
    frames = [3000, 1234, 500]
    out = model.transcribe(enc, frames, max_new_tokens=24)
    assert len(out) == 3
    for seg, f in zip(out, frames):
        duration = f / 100
        assert seg.language in LANGUAGES
        assert seg.avg_logprob <= 0.0 and 0.0 <= seg.no_speech_prob <= 1.0 and seg.compression_ratio > 0
        assert seg.failed in (None, FAILED_NO_SPEECH, FAILED_COMPRESSION, FAILED_LOGPROB)
        assert seg.failed == failure_reason(seg.avg_logprob, seg.compression_ratio, seg.no_speech_prob)
        assert 0 < len(seg.tokens) <= 24 and model.special.eot not in seg.tokens
        assert seg.tokens[0] >= model.special.timestamp_begin  # starts with a timestamp ...
        assert seg.tokens[0] - model.special.timestamp_begin <= 50  # ... of at most 1 s
        stamps = [t for t in seg.tokens if t >= model.special.timestamp_begin]
        assert stamps == sorted(stamps)
        assert seg.text == model.decode(seg.tokens).strip()
        for piece in seg.segments:
            assert 0.0 <= piece.start_s <= piece.end_s <= duration + 1e-6
        # random tokens: bare spaces and lone " ." are words too, so only times and probabilities
        _check_words(list(seg.words), duration, text=False)
        assert seg.words, "every window has text tokens to time"
    # a fixed language is used as given
    assert {s.language for s in model.transcribe(enc[:1], frames[:1], "de", max_new_tokens=4)} == {"de"}


TEXTS = ["Hello world, the quick brown fox jumps over the lazy dog.", "(Thank you) for watching!", "", "   "]


def _same(a, b):
    """Same words and times; probabilities up to float noise (batch shapes change the kernels)."""
    assert [(w.word, w.start_s, w.end_s) for w in a] == [(w.word, w.start_s, w.end_s) for w in b]
    np.testing.assert_allclose([w.probability for w in a], [w.probability for w in b], rtol=1e-4)


def test_align(model, enc):
    e = torch.cat([enc, enc[:1]])  # 4 windows
    frames = [3000, 1234, 800, 2000]
    out = model.align(e, frames, TEXTS, "en")
    assert len(out) == 4 and out[2] == [] and out[3] == []
    assert [w.word for w in out[0]] == [" Hello", " world,", " the", " quick", " brown", " fox", " jumps",
                                        " over", " the", " lazy", " dog."]
    assert [w.word for w in out[1]] == [" (Thank", " you)", " for", " watching!"]
    for words, f in zip(out, frames):
        _check_words(words, f / 100)
        for a, b in zip(words, words[1:]):
            assert b.start_s >= a.end_s - 1e-9  # DTW words do not overlap
    # a window's words do not depend on the rest of the batch
    alone = model.align(enc[1:2], [1234], TEXTS[1:2], "en")
    _same(alone[0], out[1])
    # languages per window; None detects them
    _same(model.align(enc[:1], [3000], TEXTS[:1], ["en"])[0], out[0])
    assert len(model.align(enc[:1], [3000], TEXTS[:1], None)[0]) == 11
    with pytest.raises(ValueError):
        model.align(enc[:1], [3000], TEXTS[:1], "xx")


def test_bf16(enc):
    model = WhisperText.tiny(seed=0, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    out = model.align(enc[:2], [3000, 1234], TEXTS[:2], "en")
    assert [len(w) for w in out] == [11, 4]
    for words, f in zip(out, [3000, 1234]):
        _check_words(words, f / 100)
    assert len(model.transcribe(enc[:1], [3000], max_new_tokens=6)[0].tokens) <= 6


def test_mel_frames():
    assert (mel_frames(16_000), mel_frames(16_159), mel_frames(480_000), mel_frames(10**7)) == (100, 100, 3000, 3000)


def test_align_without_spaces(model, enc):
    words = model.align(enc[:1], [3000], ["你好世界。"], "zh")[0]
    assert [w.word for w in words] == [" 你", "好", "世", "界。"]


def test_align_long_text_gets_no_words(model, enc):
    assert model.align(enc[:1], [3000], ["la " * 500], "en") == [[]]


def test_tiny_is_reproducible(model, enc):
    again = WhisperText.tiny(seed=0, dtype=torch.float32)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(WhisperText.tiny(seed=1).decoder.embed_tokens.weight, model.decoder.embed_tokens.weight)


# --- loading from a Whisper folder ---------------------------------------------------------------------
def test_round_trip_through_a_whisper_folder(tmp_path, model, enc):
    from salmonn.checkpoint import load_whisper_encoder
    from salmonn.tiny import build_tiny, write_tiny_whisper

    folder = write_tiny_whisper(tmp_path / "whisper", seed=0)
    # the folder holds the encoder too: SALMONN's loader reads it from the same files
    encoder = load_whisper_encoder(folder, device="cpu", dtype=torch.float32)
    for a, b in zip(encoder.state_dict().values(), build_tiny(0, dtype=torch.float32).speech_encoder.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    loaded = WhisperText.from_pretrained(folder)
    assert loaded.alignment_heads == model.alignment_heads  # no generation_config heads: openai's default
    for (ka, a), (kb, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.align(enc, [3000, 1234, 800], TEXTS[:3], "en") == model.align(enc, [3000, 1234, 800], TEXTS[:3], "en")

    # an older hub copy: vocab.json + merges.txt (no tokenizer.json), heads in generation_config.json
    (folder / "tokenizer.json").unlink()
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "alignment_heads": [[3, 1], [2, 0]]}))
    old = WhisperText.from_pretrained(folder)
    assert old.alignment_heads == ((2, 0), (3, 1))
    assert old.encode(" hello world, café") == model.encode(" hello world, café")

    # a folder fetched for the encoder alone: a clear message
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer files"):
        WhisperText.from_pretrained(folder)


def test_weights_fetch_takes_the_whisper_tokenizer():
    from salmonn import weights

    part = next(p for p in weights.parts_for("salmonn-13b") if p.name == "whisper")
    names = ["config.json", "model.safetensors", "vocab.json", "merges.txt", "added_tokens.json", "normalizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "tokenizer.json",
             "preprocessor_config.json", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "README.md"]
    listing = {n: weights.RemoteFile(n, 1, None, None) for n in names}
    got = {f.path for f in weights.dir_files(part, listing)}
    assert got == set(names) - {"pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "README.md"}


# --- against openai-whisper ----------------------------------------------------------------------------
def _openai_whisper():
    """openai-whisper's package (in the test extra: the reference these tests compare against)."""
    import tiktoken
    import whisper.decoding
    import whisper.model
    import whisper.timing
    import whisper.tokenizer

    return whisper, tiktoken


def _openai_twin(model: WhisperText):
    """openai-whisper's Whisper and Tokenizer holding the tiny WhisperText's decoder and vocabulary; its
    encoder is the identity, so the "mel" it is given is the encoder output itself."""
    whisper, tiktoken = _openai_whisper()
    from whisper.model import ModelDimensions, Whisper

    cfg = model.decoder.config
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=cfg.d_model, n_audio_head=2, n_audio_layer=1,
                           n_vocab=cfg.vocab_size, n_text_ctx=cfg.max_target_positions, n_text_state=cfg.d_model,
                           n_text_head=cfg.decoder_attention_heads, n_text_layer=cfg.decoder_layers)
    assert cfg.decoder_ffn_dim == 4 * cfg.d_model  # openai fixes the MLP width
    twin = Whisper(dims)
    sd = model.decoder.state_dict()
    state = {"token_embedding.weight": sd["embed_tokens.weight"], "positional_embedding": sd["embed_positions.weight"],
             "ln.weight": sd["layer_norm.weight"], "ln.bias": sd["layer_norm.bias"]}
    names = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
             "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm", "cross_attn.query": "encoder_attn.q_proj",
             "cross_attn.key": "encoder_attn.k_proj", "cross_attn.value": "encoder_attn.v_proj",
             "cross_attn.out": "encoder_attn.out_proj", "cross_attn_ln": "encoder_attn_layer_norm", "mlp.0": "fc1",
             "mlp.2": "fc2", "mlp_ln": "final_layer_norm"}
    for i in range(cfg.decoder_layers):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                if f"layers.{i}.{theirs}.{p}" in sd:
                    state[f"blocks.{i}.{ours}.{p}"] = sd[f"layers.{i}.{theirs}.{p}"]
    missing, unexpected = twin.decoder.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "mask" for k in missing), (missing, unexpected)
    twin.encoder = torch.nn.Identity()
    heads = torch.zeros(cfg.decoder_layers, cfg.decoder_attention_heads, dtype=torch.bool)
    for layer, head in model.alignment_heads:
        heads[layer, head] = True
    twin.register_buffer("alignment_heads", heads.to_sparse(), persistent=False)
    twin.eval()

    s = model.special
    ranks = {model._token_bytes[i]: i for i in range(s.eot)}
    specials = {("<|nospeech|>" if t == "<|nocaptions|>" else t): i for i, t in model._special_text.items()}
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # GPT-2's
    encoding = tiktoken.Encoding(name="tiny", pat_str=pat, mergeable_ranks=ranks, special_tokens=specials,
                                 explicit_n_vocab=len(ranks) + len(specials))
    return twin, encoding


def test_word_times_equal_openai_whisper(model, enc, monkeypatch):
    """find_alignment tensor for tensor, and add_word_timestamps (clamps, punctuation) on top."""
    from whisper.timing import add_word_timestamps, find_alignment
    from whisper.tokenizer import Tokenizer

    import salmonn.whisper_text as wt

    twin, encoding = _openai_twin(model)
    texts = [(TEXTS[0], "en"), (TEXTS[1], "en"), ("Stop. Go on, please: now! \"Yes\" - no?", "en"),
             ("你好世界。再见", "zh"), (" ".join(string.ascii_lowercase), "de")]
    cases = [(row, frames, text, lang) for row in range(3) for frames in (3000, 321) for text, lang in texts]
    words_compared = 0
    theirs_all = []
    for row, frames, text, lang in cases:
        tokenizer = Tokenizer(encoding=encoding, num_languages=99, language=lang, task="transcribe")
        tokens = model.encode(" " + text.strip())
        e = enc[row]  # (1500, C): the twin's identity encoder takes it as its "mel"
        theirs = find_alignment(twin, tokenizer, tokens, e, frames)
        theirs_all.append([(t.start, t.end) for t in theirs])
        ours = model._word_timings(enc[row : row + 1], [frames], [tokens], [lang])[0]
        assert [(t.word, t.tokens, t.start, t.end) for t in ours] == [(t.word, t.tokens, t.start, t.end) for t in theirs]
        np.testing.assert_allclose([t.probability for t in ours], [t.probability for t in theirs], rtol=1e-4)
        # the clamps and punctuation merging on top (one segment over the real audio)
        segments = [{"seek": 0, "start": 0.0, "end": frames / 100, "tokens": tokens}]
        add_word_timestamps(segments=segments, model=twin, tokenizer=tokenizer, mel=e, num_frames=frames,
                            last_speech_timestamp=0.0)
        words = model.align(enc[row : row + 1], [frames], [text], lang)[0]
        assert [(w.word, w.start_s, w.end_s) for w in words] == [
            (w["word"], w["start"], w["end"]) for w in segments[0]["words"]]
        words_compared += len(words)
    assert words_compared > 200
    # the comparison catches a wrong parameter: a median filter of width 5 moves some boundaries
    monkeypatch.setattr(wt, "alignment_matrix", lambda scores, frames: timing.alignment_matrix(scores, frames, 5))
    moved = 0
    for (row, frames, text, lang), theirs in zip(cases, theirs_all):
        ours = model._word_timings(enc[row : row + 1], [frames], [model.encode(" " + text)], [lang])[0]
        moved += sum(a != (t.start, t.end) for a, t in zip(theirs, ours))
    assert moved > 0


def test_transcribe_equals_openai_whisper(model, enc, monkeypatch):
    """Greedy decoding with timestamps (logit rules, suppressed tokens, avg_logprob, no_speech_prob)
    as openai-whisper's `decode` on the same encoder output; the words as its add_word_timestamps."""
    import whisper.decoding
    from whisper.timing import add_word_timestamps
    from whisper.tokenizer import Tokenizer

    twin, encoding = _openai_twin(model)
    tokenizer = Tokenizer(encoding=encoding, num_languages=99, language="en", task="transcribe")
    monkeypatch.setattr(whisper.decoding, "get_tokenizer", lambda *a, **k: tokenizer)
    frames = [3000, 1234, 500]
    ours = model.transcribe(enc, frames, "en", max_new_tokens=40)
    for row, (seg, f) in enumerate(zip(ours, frames)):
        theirs = whisper.decoding.decode(twin, enc[row], whisper.decoding.DecodingOptions(
            language="en", fp16=False, sample_len=40))
        assert list(seg.tokens) == theirs.tokens
        assert seg.text == theirs.text.strip()
        assert seg.avg_logprob == pytest.approx(theirs.avg_logprob, rel=1e-4)
        assert seg.no_speech_prob == pytest.approx(theirs.no_speech_prob, rel=1e-4)
        assert seg.compression_ratio == pytest.approx(theirs.compression_ratio)
        # word times over the same timestamp segments
        segments = [{"seek": 0, "start": a, "end": b, "tokens": t}
                    for a, b, t in split_segments(seg.tokens, model.special.timestamp_begin, f / 100)]
        add_word_timestamps(segments=segments, model=twin, tokenizer=tokenizer, mel=enc[row], num_frames=f,
                            last_speech_timestamp=0.0)
        assert [(w.word, w.start_s, w.end_s) for w in seg.words] == [
            (w["word"], w["start"], w["end"]) for s in segments for w in s["words"]]
        assert [(p.start_s, p.end_s) for p in seg.segments] == [(s["start"], s["end"]) for s in segments]
