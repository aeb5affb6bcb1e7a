"""Timed text on SALMONN's own Whisper encoder output vs a separate Whisper pass for the same result.

Timed text (``salmonn.whisper_text.WhisperText``) runs Whisper's decoder on the encoder output
SALMONN computes anyway (``Salmonn.encode_with_whisper``). Per batch of 30-s windows, the work the
predictor does (``pipelines.infer.SalmonnPredictor._timed_text`` with ``timed_text`` on and the
``whisper`` task):

* ``detect_language`` (one decoder step per window),
* ``align`` of a ~75-word transcript per window (SALMONN's answer: ~100 Whisper tokens,
  teacher-forced, word times by DTW on the alignment heads),
* ``transcribe``: Whisper's own transcript (greedy, timestamps, word times, at most 224 new
  tokens). Random weights would stop anywhere and write mostly timestamps, so every window
  generates exactly ``--whisper-tokens`` tokens (112) in segments of ``--segment-tokens`` text
  tokens (16): ~100 text tokens and 6 timestamp pairs, as ~75 words of speech (``exact_tokens``:
  a few masks on the logits besides Whisper's own rules).

The baseline is what a separate Whisper pass would cost for the same result: Whisper's encoder
again on the same log-mel (SALMONN's ``speech_encoder``) plus the same decoder work. Both parts are
measured (the decoder work is the timed text above, done the same way on an encoder output of the
same shape), so the ratio printed last, (encoder pass + timed text) / timed text, is the speed-up
from sharing the encoder pass. Also printed: the encoder pass alone, SALMONN's own encode
(``encode_with_whisper``: log-mel, fbank, Whisper, BEATs, Q-Former) and the share of it that timed
text adds, seconds per window, audio-seconds per (GPU-)second, and on CUDA the decoder's weights
and peak memory (``torch.cuda.max_memory_allocated`` during timed text, above what was resident)
in bf16. Each batch size times at least ``--windows`` windows; one warm-up batch before the first
batch size is not counted. The word times' DTW (``salmonn.timing.dtw``) runs in numpy on the CPU
whatever the device: on a GPU it is likely a large share of timed text.

Models. On CUDA: Whisper-large-v2's real shapes with random bf16 weights (nothing downloaded):
SALMONN-13B's encoder side (Whisper encoder 32 layers x 1280, BEATs, Q-Former, projection) from
``gpu_throughput.materialise_random`` with the LLM cut to one layer (it is not used here), and
Whisper's decoder (32 layers, 20 heads, d_model 1280, vocab 51865, 448 positions, large-v2's
alignment heads) built on the meta device and filled on the GPU with normal(0, 0.02) weights
(tiny.py's 0.1 at width 64, scaled to width 1280: attention neither uniform nor saturated), the
attention implementation ``WhisperText.from_pretrained`` uses (eager). The tokenizer is the tiny
offline one (``tiny_whisper_tokenizer_dir``: the official ids and layout; the real one cannot be
downloaded here). On CPU (and with ``--smoke``): the tiny preset, ``salmonn.load_model("tiny")`` +
``salmonn.load_whisper_text`` (a 4-layer decoder of width 64): its figures say nothing of a GPU.

    python benchmarks/timed_text.py [--batch-sizes 8,32] [--windows 16] [--whisper-tokens 112]
        [--segment-tokens 16] [--words 75] [--threads N]
    python benchmarks/timed_text.py --smoke     # tiny, CPU, one batch of two windows (a test)

No goal: the last line is the speed-up from sharing the encoder pass, at each batch size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, machine_line, speech_windows  # noqa: E402

WINDOW_S = 30.0
RATE = 16_000
SAMPLE_LEN = 224  # Whisper's cap on new tokens (openai's sample_len)
DECODER_STD = 0.02
# Whisper-large-v2's decoder (the encoder dims are SALMONN's WhisperDims defaults: 32 x 1280)
LARGE_V2_DECODER = dict(decoder_layers=32, decoder_attention_heads=20, decoder_ffn_dim=5120, max_target_positions=448)


# --- models ----------------------------------------------------------------------------------

def whisper_hf_config(config, decoder: dict):
    """A full WhisperConfig: ``config``'s encoder dims, ``decoder``'s dims, the official vocabulary and ids."""
    from salmonn.tiny import WHISPER_VOCAB

    return config.whisper.to_hf(**decoder, vocab_size=WHISPER_VOCAB, pad_token_id=50257, bos_token_id=50257,
                                eos_token_id=50257, decoder_start_token_id=50258, begin_suppress_tokens=None,
                                suppress_tokens=None)


def random_whisper_text(config, decoder: dict, device, dtype, heads=None, std: float = DECODER_STD, seed: int = 0):
    """A ``WhisperText`` with random weights of the given shapes, materialised straight on ``device``
    in ``dtype`` (no CPU copy): 2-D weights normal(0, std), biases 0, LayerNorms 1 and 0. The tiny
    offline tokenizer (official ids); ``heads`` default to openai's (second half of the layers)."""
    import torch
    from torch import nn
    from transformers.models.whisper.modeling_whisper import WhisperDecoder

    from salmonn.tiny import tiny_whisper_tokenizer_dir
    from salmonn.whisper_text import WhisperText, default_alignment_heads, load_whisper_tokenizer

    cfg = whisper_hf_config(config, decoder)
    cfg._attn_implementation = "eager"   # as WhisperText.from_pretrained loads it
    with torch.device("meta"):
        dec = WhisperDecoder(cfg)
    if list(dec.buffers()):
        raise RuntimeError(f"random_whisper_text does not fill buffers {[n for n, _ in dec.named_buffers()]}")
    dec = dec.to(dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in dec.modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, nn.LayerNorm):
                    param.fill_(1.0 if name == "weight" else 0.0)
                elif param.dim() == 2:
                    param.normal_(0.0, std, generator=generator)
                else:
                    param.zero_()
    if heads is None:
        heads = default_alignment_heads(cfg.decoder_layers, cfg.decoder_attention_heads)
    tokenizer = load_whisper_tokenizer(tiny_whisper_tokenizer_dir())
    return WhisperText(dec, tokenizer, heads).eval().requires_grad_(False)


def full_size(device, preset: str = "salmonn-13b", decoder: dict | None = None, heads=None):
    """SALMONN-13B's encoder side and Whisper-large-v2's decoder (with its alignment heads), random
    weights on ``device`` in the dtype the pipeline uses there (bf16 on CUDA). ``--smoke`` runs the
    same code for the tiny preset (``check_builders``)."""
    from gpu_throughput import materialise_random

    import salmonn
    from salmonn.whisper_text import WHISPER_LARGE_V2_ALIGNMENT_HEADS

    if decoder is None:
        decoder, heads = LARGE_V2_DECODER, WHISPER_LARGE_V2_ALIGNMENT_HEADS
    config = salmonn.SalmonnConfig.from_name(preset)
    config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, layers=1))   # the LLM is not used
    model = materialise_random(config, device)
    wt = random_whisper_text(config, decoder, device, model.precision.encoder_dtype, heads=heads)
    return model, wt


def tiny(device):
    import salmonn

    model = salmonn.load_model("tiny", device=device)
    return model, salmonn.load_whisper_text(model)


def check_builders() -> None:
    """--smoke: the full-size builder's code, checked on CPU. Whisper-large-v2's decoder on the meta
    device (shapes, large-v2's alignment heads fit); ``full_size`` for the tiny preset: its decoder
    against ``build_tiny_whisper_text`` (parameter names, shapes, dtypes, heads), and its encoder
    output read by that decoder."""
    import torch
    from transformers.models.whisper.modeling_whisper import WhisperDecoder

    import salmonn
    from salmonn.tiny import build_tiny_whisper_text, tiny_whisper_tokenizer_dir
    from salmonn.whisper_text import WHISPER_LARGE_V2_ALIGNMENT_HEADS, WhisperText, load_whisper_tokenizer

    config = salmonn.SalmonnConfig.from_name("salmonn-13b")
    cfg = whisper_hf_config(config, LARGE_V2_DECODER)
    with torch.device("meta"):
        dec = WhisperDecoder(cfg)
    WhisperText(dec, load_whisper_tokenizer(tiny_whisper_tokenizer_dir()), WHISPER_LARGE_V2_ALIGNMENT_HEADS)
    n = sum(p.numel() for p in dec.parameters())
    print(f"Whisper-large-v2 decoder (meta): {n / 1e6:.0f} M parameters, {n * 2 / 2**30:.2f} GiB in bf16; "
          f"d_model {cfg.d_model}, {cfg.decoder_layers} layers x {cfg.decoder_attention_heads} heads, "
          f"vocab {cfg.vocab_size}, {cfg.max_target_positions} positions; encoder {cfg.encoder_layers} layers")
    tiny_config = salmonn.SalmonnConfig.from_name("tiny")
    from salmonn.tiny import TINY_WHISPER_DECODER

    model, got = full_size("cpu", "tiny", TINY_WHISPER_DECODER)
    ref = build_tiny_whisper_text(0, config=tiny_config, dtype=torch.float32)
    shapes = {n: (tuple(p.shape), p.dtype) for n, p in got.named_parameters()}
    assert shapes == {n: (tuple(p.shape), p.dtype) for n, p in ref.named_parameters()}, "random_whisper_text differs"
    assert got.alignment_heads == ref.alignment_heads
    wave = torch.from_numpy(speech_windows(1, 2.0, RATE))
    _, enc = model.encode_with_whisper(wave, torch.tensor([wave.shape[1]]))
    got.detect_language(enc.to(got.dtype))
    print("full_size at the tiny size: its decoder matches build_tiny_whisper_text (names, shapes, dtypes, heads) "
          "and reads its encoder output")


# --- the workload ------------------------------------------------------------------------------

def transcript(n_words: int, seed: int) -> str:
    """~``n_words`` lower-case words with commas, full stops and plurals: ~1.4 Whisper tokens a word
    with the tiny tokenizer (each listed word is one token), as English with the real one."""
    from salmonn.tiny import _WHISPER_WORDS

    rng = random.Random(seed)
    words = []
    for i in range(n_words):
        w = rng.choice(_WHISPER_WORDS)
        if rng.random() < 0.25:
            w += "s"
        words.append(w + ("." if i % 12 == 11 else "," if i % 6 == 5 else ""))
    return " ".join(words)


@contextlib.contextmanager
def exact_tokens(wt, n: int, segment: int) -> Iterator[None]:
    """``transcribe`` generates exactly ``n`` tokens per window in segments of ``segment`` text
    tokens between timestamps (random weights would stop anywhere, and Whisper's rule "a timestamp
    when all of them together are likelier than any text token" makes them mostly timestamps).
    Before Whisper's own logit rules: after a text token, timestamps are banned until the segment
    has ``segment`` text tokens, then text is (while a later timestamp exists); after them
    <|endoftext|> is banned before ``n`` tokens and forced at ``n``. The instance attribute
    shadows the method; the work per step is the decoder's, these masks cost a few small ops."""
    import torch

    original = wt._timestamp_rules
    eot, tb = wt.special.eot, wt.special.timestamp_begin

    def rules(logits, tokens) -> None:
        last_id = logits.shape[1] - 1
        no_ts, no_text = [], []
        for seq in tokens:
            run = 0
            while run < len(seq) and seq[-1 - run] < tb:
                run += 1
            text_last = run > 0
            no_ts.append(text_last and run < segment)
            no_text.append(text_last and run >= segment and max((t for t in seq if t >= tb), default=tb) < last_id)
        if any(no_ts):
            logits[:, tb:].masked_fill_(torch.tensor(no_ts, device=logits.device)[:, None], -torch.inf)
        if any(no_text):
            logits[:, :eot].masked_fill_(torch.tensor(no_text, device=logits.device)[:, None], -torch.inf)
        original(logits, tokens)
        short = [len(seq) < n for seq in tokens]
        if all(short):
            logits[:, eot] = -torch.inf
        else:
            short_t = torch.tensor(short, device=logits.device)
            logits.masked_fill_(~short_t[:, None], -torch.inf)
            logits[:, eot] = torch.where(short_t, -torch.inf, 0.0)

    wt._timestamp_rules = rules
    try:
        yield
    finally:
        del wt._timestamp_rules


@dataclass
class Parts:
    detect: float = 0.0
    align: float = 0.0
    transcribe: float = 0.0
    text_tokens: int = 0
    timestamps: int = 0
    words: int = 0

    @property
    def total(self) -> float:
        return self.detect + self.align + self.transcribe


def timed_text(wt, enc, frames, texts, max_new: int, device, parts: Parts) -> None:
    """What the predictor does per batch: language, SALMONN's transcript aligned, Whisper's transcript."""
    with Timer(device) as t:
        codes = [code for code, _ in wt.detect_language(enc)]
    parts.detect += t.s
    with Timer(device) as t:
        aligned = wt.align(enc, frames, texts, codes)
    parts.align += t.s
    with Timer(device) as t:
        segs = wt.transcribe(enc, frames, codes, max_new_tokens=max_new)
    parts.transcribe += t.s
    tb = wt.special.timestamp_begin
    parts.words += sum(len(w) for w in aligned)
    parts.text_tokens += sum(sum(tok < tb for tok in s.tokens) for s in segs)
    parts.timestamps += sum(sum(tok >= tb for tok in s.tokens) for s in segs)


@dataclass
class Result:
    batch: int
    windows: int
    encode: float   # SALMONN's encode_with_whisper
    whisper_encoder: float   # the encoder pass alone, on the same mel
    parts: Parts
    peak_gib: float | None = None   # CUDA: max_memory_allocated during timed text, above what was resident
    peak_total_gib: float | None = None   # CUDA: max_memory_allocated during timed text, all of it

    @property
    def separate(self) -> float:
        return self.whisper_encoder + self.parts.total

    @property
    def speedup(self) -> float:
        return self.separate / self.parts.total


def run(model, wt, waves, texts, batch: int, n_windows: int, tokens: int, segment: int, max_new: int,
        device, warmup: bool = True) -> Result:
    import torch

    n_batches = max(1, math.ceil(n_windows / batch))
    cuda = torch.device(device).type == "cuda"
    enc_s = whisper_s = 0.0
    parts = Parts()
    peak = peak_total = 0.0
    for b in range(0 if warmup else 1, n_batches + 1):   # batch 0: a warm-up (kernels, allocator), not counted
        rows = torch.arange(b * batch, (b + 1) * batch) % waves.shape[0]
        wave = waves[rows]
        lengths = torch.full((batch,), wave.shape[1], device=device)
        frames = [wave.shape[1] // 160] * batch   # salmonn.whisper_text.mel_frames of a full window
        window_texts = [texts[int(r)] for r in rows]
        with Timer(device) as t_enc:
            _, enc = model.encode_with_whisper(wave, lengths)
        mel = model.features(wave, lengths)[0]
        with torch.inference_mode(), model._autocast(), Timer(device) as t_whisper:
            model.speech_encoder(mel.to(model.precision.encoder_dtype))   # (B, 1500, Cw): not used
        enc = enc.to(wt.dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        p = Parts() if b == 0 else parts
        with exact_tokens(wt, tokens, segment):
            timed_text(wt, enc, frames, window_texts, max_new, device, p)
        if b == 0:
            continue
        enc_s += t_enc.s
        whisper_s += t_whisper.s
        if cuda:
            top = torch.cuda.max_memory_allocated(device)
            peak, peak_total = max(peak, (top - resident) / 2**30), max(peak_total, top / 2**30)
    return Result(batch, n_batches * batch, enc_s, whisper_s, parts, *((peak, peak_total) if cuda else (None, None)))


def print_result(r: Result) -> None:
    w, p = r.windows, r.parts
    per = 1000 / w
    peak = (f"; GPU memory peak {r.peak_total_gib:.2f} GiB, +{r.peak_gib:.2f} GiB over the resident models and "
            f"batch" if r.peak_gib is not None else "")
    print(f"batch {r.batch:3d} x {r.windows // r.batch} batches: per window ms: SALMONN encode {r.encode * per:.1f}, "
          f"Whisper encoder pass {r.whisper_encoder * per:.1f}; timed text {p.total * per:.1f} (language "
          f"{p.detect * per:.1f}, align {p.align * per:.1f}, transcribe {p.transcribe * per:.1f}) = "
          f"{w * WINDOW_S / p.total:,.0f} audio-s per s; separate Whisper pass {r.separate * per:.1f} = "
          f"{w * WINDOW_S / r.separate:,.0f} audio-s per s; speed-up {r.speedup:.2f}x; timed text adds "
          f"{p.total / r.encode:.0%} of SALMONN's encode{peak}", flush=True)
    print(f"          per window: {p.text_tokens / w:.0f} text tokens + {p.timestamps / w:.0f} timestamps "
          f"generated, {p.words / w:.0f} words aligned", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default=None, help="windows per batch (default: 8,32 on CUDA, 2,4 on CPU)")
    parser.add_argument("--windows", type=int, default=None,
                        help="timed windows per batch size, at least one batch (default: 16 on CUDA, 8 on CPU)")
    parser.add_argument("--whisper-tokens", type=int, default=112,
                        help="tokens transcribe generates per window (at most 224)")
    parser.add_argument("--segment-tokens", type=int, default=16,
                        help="text tokens between two timestamps in transcribe's output (112 = 6 x (16 + 2))")
    parser.add_argument("--words", type=int, default=75, help="words of the transcript aligned per window")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; --smoke: 1). On a machine shared with other jobs "
                             "fewer threads than cores avoid OpenMP's contention (2 threads on 2 busy cores ran "
                             "the decoder 30-100x slower than 1)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model on CPU, one batch of two windows, no warm-up (a test)")
    args = parser.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    cuda = device == "cuda"
    if args.smoke:
        args.batch_sizes, args.windows, args.whisper_tokens, args.segment_tokens, args.words = "2", 2, 12, 4, 30
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("8,32" if cuda else "2,4")).split(",")]
    n_windows = args.windows or (16 if cuda else 8)
    tokens = min(args.whisper_tokens, SAMPLE_LEN)
    print(f"{machine_line()}; device {device}")
    if args.smoke:
        check_builders()
    with Timer(device) as t:
        model, wt = full_size(device) if cuda else tiny(device)
    what = ("SALMONN-13B encoder side + Whisper-large-v2 decoder, random weights" if cuda
            else "tiny preset (random; not a GPU figure)")
    dec_params = sum(p.numel() for p in wt.parameters())
    dec_gib = sum(p.numel() * p.element_size() for p in wt.parameters()) / 2**30
    print(f"{what}, built in {t.s:.1f} s; decoder {wt.decoder.config.decoder_layers} layers x "
          f"{wt.decoder.config.d_model}, {dec_params / 1e6:.1f} M parameters, {dec_gib:.3f} GiB in {wt.dtype}"
          + (f"; resident on the GPU {torch.cuda.memory_allocated() / 2**30:.2f} GiB" if cuda else ""))
    distinct = min(max(batch_sizes), 8)   # distinct windows, repeated to fill a batch
    waves = torch.from_numpy(speech_windows(distinct, WINDOW_S, RATE)).to(device)
    texts = [transcript(args.words, seed=i) for i in range(distinct)]
    n_text = sum(len(wt.encode(" " + x)) for x in texts) / distinct
    print(f"30 s windows; per window: language, align {args.words} words ({n_text:.0f} Whisper tokens), "
          f"transcribe exactly {tokens} tokens in segments of {args.segment_tokens} text tokens (greedy, timestamps, "
          f"word times); baseline: Whisper's encoder again on the same mel + the same decoder work")
    results = []
    for batch in batch_sizes:
        try:
            r = run(model, wt, waves, texts, batch, max(batch, n_windows), tokens, args.segment_tokens, SAMPLE_LEN,
                    device, warmup=not args.smoke and not results)
        except Exception as err:  # noqa: BLE001 - an OOM is a result; anything else is re-raised
            import salmonn

            if not salmonn.is_out_of_memory(err):
                raise
            print(f"batch {batch:3d}: OOM", flush=True)
            torch.cuda.empty_cache()
            continue
        print_result(r)
        results.append(r)
    print()
    if not results:
        print("timed_text: every batch size ran out of memory")
        return 1
    where = "" if cuda else "CPU, tiny random model: not a GPU figure; "
    last = results[-1]
    each = ", ".join(f"batch {r.batch} {r.speedup:.2f}x" for r in results)
    print(f"timed_text: {where}separate Whisper pass / timed text on the shared encoder output = "
          f"{last.speedup:.2f}x at batch {last.batch} ({each}); encoder pass "
          f"{last.whisper_encoder / last.windows * 1000:.1f} ms/window, timed text "
          f"{last.parts.total / last.windows * 1000:.1f} ms/window = {last.parts.total / last.encode:.0%} of "
          f"SALMONN's encode")
    return 0


if __name__ == "__main__":
    from pipelines import lifecycle

    lifecycle.main(main)   # exit code = main's; native libraries closed in order first
