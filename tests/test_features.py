"""Front ends: Whisper log-mel against transformers, BEATs fbank against torchaudio's kaldi fbank."""

from __future__ import annotations

import pytest
import torch
import torchaudio.compliance.kaldi as kaldi

from salmonn import features
from tests.model_fixtures import make_clip, pad_batch


def _official_fbank(wav: torch.Tensor) -> torch.Tensor:
    """The official BEATs.preprocess for one clip."""
    fbank = kaldi.fbank(
        wav.unsqueeze(0) * 2**15, num_mel_bins=128, sample_frequency=16000, frame_length=25, frame_shift=10
    )
    return (fbank - 15.41663) / (2 * 6.55582)


@pytest.fixture
def three_clips() -> list[torch.Tensor]:
    return [make_clip(30.0, 1), make_clip(7.3, 2), make_clip(0.5, 3)]


def test_whisper_log_mel_matches_transformers(three_clips):
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor()  # whisper-large-v2 defaults: 80 mels, 16 kHz, 30 s
    batch, lengths = pad_batch(three_clips)
    ours = features.whisper_log_mel(batch, lengths)
    assert ours.shape == (3, 80, 3000)
    for i, clip in enumerate(three_clips):
        ref = extractor(clip.numpy(), sampling_rate=16000, return_tensors="pt").input_features[0]
        diff = (ours[i] - ref).abs().max().item()
        assert diff <= 1e-4, f"clip {i} ({clip.numel() / 16000:.1f} s): max abs diff {diff}"


def test_beats_fbank_matches_kaldi(three_clips):
    batch, lengths = pad_batch(three_clips)
    fbank, frames = features.beats_fbank(batch, lengths)
    assert fbank.dtype == torch.float32
    for i, clip in enumerate(three_clips):
        if clip.numel() < 16000:  # official 2024 code zero-pads clips under 1 s to 1 s
            clip = torch.nn.functional.pad(clip, (0, 16000 - clip.numel()))
        ref = _official_fbank(clip)
        assert frames[i] == ref.shape[0] == features.fbank_frames(clip.numel())
        torch.testing.assert_close(fbank[i, : frames[i]], ref, rtol=0, atol=1e-6)
        assert not fbank[i, frames[i] :].any(), "frames past a clip's end must be zero"


def test_beats_fbank_float64_is_close_to_float32(three_clips):
    batch, lengths = pad_batch(three_clips[:2])
    f32, _ = features.beats_fbank(batch, lengths)
    f64, _ = features.beats_fbank(batch, lengths, dtype=torch.float64)  # the official precision
    assert f64.dtype == torch.float32
    assert (f32 - f64).abs().max() < 5e-3


def test_prepare_waveforms_cuts_and_pads():
    long = torch.ones(1, 45 * 16000)
    x, n = features.prepare_waveforms(long)
    assert x.shape == (1, 480000) and n.tolist() == [480000]
    short = torch.ones(2, 4000)
    x, n = features.prepare_waveforms(short, torch.tensor([4000, 2000]))
    assert x.shape == (2, 16000) and n.tolist() == [16000, 16000]
    assert x[1, :2000].all() and not x[1, 2000:].any(), "samples past a length are zeroed"
    with pytest.raises(ValueError):
        features.prepare_waveforms(short, torch.tensor([4001, 10]))
