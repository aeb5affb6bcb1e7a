"""Batched front ends, in torch on the model's device.

Input everywhere: `waveforms` (B, N) float32 16 kHz mono, right-padded, and `lengths` (B,) the true
sample counts. Each clip gives exactly what the official single-clip code gives it:

* Whisper log-mel (B, 80, 3000): HF `WhisperFeatureExtractor` math (pad/cut to 30 s, 400-point
  Hann STFT, hop 160, power, Slaney mel filters, log10 clamp 1e-10, per-clip max-8 clamp,
  (x + 4) / 4).
* BEATs fbank (B, F, 128): `torchaudio.compliance.kaldi.fbank` on waveform * 2**15 with the
  official settings, then (x - 15.41663) / (2 * 6.55582). Computed per clip on its true length,
  so padding never leaks into a clip's frames.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from .config import CHUNK_SAMPLES, MIN_SAMPLES, SAMPLE_RATE

logger = logging.getLogger(__name__)

# Whisper front end
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop
N_MEL_FRAMES = CHUNK_SAMPLES // HOP_LENGTH  # 3000 mel frames per 30 s

# BEATs front end (official `BEATs.preprocess`)
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
FBANK_FRAME_MS = 25.0
FBANK_SHIFT_MS = 10.0
FBANK_FRAME = int(SAMPLE_RATE * FBANK_FRAME_MS / 1000)  # 400 samples
FBANK_SHIFT = int(SAMPLE_RATE * FBANK_SHIFT_MS / 1000)  # 160 samples


def prepare_waveforms(
    waveforms: torch.Tensor, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut clips to 30 s, zero-pad clips shorter than 1 s to 1 s, zero everything past a length.

    Returns (waveforms (B, N'), lengths (B,) int64 on the waveforms' device).
    """
    if waveforms.dim() != 2:
        raise ValueError(f"waveforms must be (B, N), got shape {tuple(waveforms.shape)}")
    b, n = waveforms.shape
    if lengths is None:
        lengths = torch.full((b,), n, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=waveforms.device)
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be ({b},), got {tuple(lengths.shape)}")
    if (lengths < 0).any() or (lengths > n).any():
        raise ValueError("lengths must lie in [0, N]")
    lengths = lengths.clamp(max=CHUNK_SAMPLES)
    n_out = min(max(n, MIN_SAMPLES), CHUNK_SAMPLES)
    x = waveforms[:, :n_out].to(torch.float32)
    x = F.pad(x, (0, n_out - x.shape[1]))  # (B, N')
    valid = torch.arange(n_out, device=x.device)[None, :] < lengths[:, None]
    x = x * valid  # zero beyond each true length
    return x, lengths.clamp(min=MIN_SAMPLES)


@functools.lru_cache(maxsize=8)
def _mel_filters(n_mels: int, device: torch.device) -> torch.Tensor:
    """Slaney mel filters (n_freqs, n_mels) from transformers' audio_utils, as Whisper uses."""
    from transformers.audio_utils import mel_filter_bank

    filters = mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(filters).to(device=device, dtype=torch.float32)


def whisper_log_mel(waveforms: torch.Tensor, lengths: torch.Tensor | None = None, n_mels: int = 80) -> torch.Tensor:
    """Whisper log-mel spectrogram (B, n_mels, 3000) of each clip padded or cut to 30 s."""
    x, lengths = prepare_waveforms(waveforms, lengths)
    x = F.pad(x, (0, CHUNK_SAMPLES - x.shape[1]))  # (B, 480000)
    window = torch.hann_window(N_FFT, device=x.device)
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # (B, 201, 3001)
    power = (stft[..., :-1].abs() ** 2).contiguous()  # (B, 201, 3000)
    mel = _mel_filters(n_mels, x.device).T @ power  # (B, n_mels, 3000)
    log_spec = mel.clamp(min=1e-10).log10()
    clip_max = log_spec.amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    log_spec = torch.maximum(log_spec, clip_max - 8.0)
    return (log_spec + 4.0) / 4.0


def fbank_frames(n_samples: torch.Tensor | int) -> torch.Tensor | int:
    """Kaldi frame count with snip_edges: 1 + (n - 400) // 160."""
    return 1 + (n_samples - FBANK_FRAME) // FBANK_SHIFT


def beats_fbank(
    waveforms: torch.Tensor,
    lengths: torch.Tensor | None = None,
    n_mels: int = 128,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised BEATs fbank (B, F, n_mels) float32 and the true frame counts (B,).

    `dtype` is the precision the fbank is computed in; the official code computes it in float64
    (soundfile's array) and casts to float32 afterwards.
    """
    import torchaudio.compliance.kaldi as kaldi

    x, lengths = prepare_waveforms(waveforms, lengths)
    fbanks = []
    for wav, n in zip(x, lengths.tolist()):
        wav = wav[:n].to(dtype).unsqueeze(0) * 2**15  # (1, n)
        fbank = kaldi.fbank(
            wav,
            num_mel_bins=n_mels,
            sample_frequency=SAMPLE_RATE,
            frame_length=FBANK_FRAME_MS,
            frame_shift=FBANK_SHIFT_MS,
        )  # (F_i, n_mels)
        fbanks.append(fbank)
    frames = torch.tensor([f.shape[0] for f in fbanks], dtype=torch.long, device=x.device)
    out = torch.nn.utils.rnn.pad_sequence(fbanks, batch_first=True)  # (B, F, n_mels)
    out = (out - FBANK_MEAN) / (2 * FBANK_STD)
    out = out * (torch.arange(out.shape[1], device=x.device)[None, :, None] < frames[:, None, None])
    return out.to(torch.float32), frames
