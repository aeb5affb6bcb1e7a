"""Regenerate the committed voice fixtures, ``tests/fixtures/voices/``, with espeak-ng.

The speech-gate and VAD tests (``tests/test_vad.py``, ``tests/test_speech_gate.py``) and
``benchmarks/speech_gate.py`` need real voices. They read them from the Ogg/Opus clips this script
writes (through ``pipelines.voices``), so neither espeak-ng nor any other system package is needed
to run them; espeak-ng is needed only here, to make the clips again:

    apt-get install -y espeak-ng
    .venv/bin/python scripts/make_voice_fixtures.py

It writes, into ``tests/fixtures/voices/`` (``--out`` for another folder):

* ``sentence-SS-VOICE-RRRwpm.opus``: each of ``pipelines.voices.SENTENCES`` spoken by each of
  ``VOICES`` at one of ``RATES`` (``rate = RATES[(sentence + voice index) % len(RATES)]``, so
  every voice speaks at every rate), with espeak-ng's own leading and trailing silence;
* ``announce-NAME.opus``: the speaker-test style announcements of ``ANNOUNCEMENTS`` ("Front
  Center", "Rear Left", ...), each by another voice at a slow rate, its trailing silence cut to
  0.1 s, 1.2-1.6 s long (they stand in for the recorded voice of ALSA's speaker test);
* ``manifest.json``: for every clip its text, voice, rate (wpm), amplitude, the exact espeak-ng
  command line and ``espeak-ng --version``, its duration and its file; and the encoder settings.

Every clip is espeak-ng's 22.05 kHz output resampled (soxr, HQ) to 16 kHz mono, quantised to
16 bits and encoded by libopus (through PyAV) at a fixed bit rate, frame size and complexity,
muxed into Ogg with FFmpeg's bit-exact flag (a fixed stream serial, no version strings): with the
same espeak-ng and the same libopus, a second run writes identical bytes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines import voices  # noqa: E402

SR = voices.SAMPLE_RATE           # 16 kHz: an Opus input rate, and the rate the tests use
BIT_RATE = 16_000                 # bits/s
OPUS_OPTIONS = {"application": "audio", "frame_duration": "20", "vbr": "on", "compression_level": "10"}
AMPLITUDE = 100                   # espeak-ng -a (0-200; 100 is its default)
ANNOUNCE_TAIL_S = 0.1             # trailing silence kept after an announcement's last loud sample
LOUD = 10 ** (-50 / 20)           # -50 dBFS, as pipelines.voices.talk trims
# (name, voice, rate): slow rates stretch two words to 1.2-1.6 s, as ALSA's recordings last.
ANNOUNCEMENT_SPEC = (
    ("Front_Center", "en-us", 100),
    ("Front_Left", "en-gb", 85),
    ("Front_Right", "en-gb-scotland", 85),
    ("Rear_Center", "en-gb-x-rp+m3", 90),
    ("Rear_Left", "en-us", 90),
    ("Rear_Right", "en-029+f2", 90),
    ("Side_Left", "en-us+f3", 95),
    ("Side_Right", "en-gb", 85),
)


def espeak_version() -> str:
    return subprocess.run(["espeak-ng", "--version"], check=True, capture_output=True, text=True).stdout.strip()


def espeak_command(text: str, voice: str, rate: int, amplitude: int = AMPLITUDE) -> list[str]:
    return ["espeak-ng", "-v", voice, "-s", str(rate), "-a", str(amplitude), "--stdout", text]


def synthesise(command: list[str]) -> np.ndarray:
    """espeak-ng's WAV on stdout -> 16 kHz mono float32."""
    wav = subprocess.run(command, check=True, capture_output=True, timeout=120).stdout
    return voices.read_audio(wav)


def encode_opus(x: np.ndarray, path: Path) -> None:
    """``x`` (16 kHz mono float32) -> an Ogg/Opus file, deterministically."""
    pcm = np.round(np.clip(x, -1.0, 32767 / 32768) * 32768).astype(np.int16)
    with av.open(str(path), "w", format="ogg", container_options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("libopus", rate=SR, layout="mono")
        stream.bit_rate = BIT_RATE
        stream.codec_context.options = dict(OPUS_OPTIONS)
        step = 4096
        for start in range(0, pcm.size, step):
            frame = av.AudioFrame.from_ndarray(pcm[None, start:start + step], format="s16", layout="mono")
            frame.sample_rate = SR
            frame.time_base = Fraction(1, SR)
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def slug(voice: str) -> str:
    return voice.replace("+", "_")


def sentence_rate(sentence: int, voice: str) -> int:
    return voices.RATES[(sentence + voices.VOICES.index(voice)) % len(voices.RATES)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=voices.FIXTURES, help="output folder (default: %(default)s)")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    version = espeak_version()
    assert tuple(name for name, _, _ in ANNOUNCEMENT_SPEC) == voices.ANNOUNCEMENTS
    clips = []

    def write(entry: dict, x: np.ndarray) -> None:
        encode_opus(x, out / entry["file"])
        entry["seconds"] = round(x.size / SR, 3)
        entry["bytes"] = (out / entry["file"]).stat().st_size
        clips.append(entry)

    for s, text in enumerate(voices.SENTENCES):
        for voice in voices.VOICES:
            rate = sentence_rate(s, voice)
            cmd = espeak_command(text, voice, rate)
            entry = {"kind": "sentence", "file": f"sentence-{s:02d}-{slug(voice)}-{rate}wpm.opus", "sentence": s,
                     "text": text, "voice": voice, "rate": rate, "amplitude": AMPLITUDE,
                     "command": shlex.join(cmd), "espeak_ng_version": version}
            write(entry, synthesise(cmd))
    for name, voice, rate in ANNOUNCEMENT_SPEC:
        text = name.replace("_", " ")
        cmd = espeak_command(text, voice, rate)
        x = synthesise(cmd)
        loud = np.flatnonzero(np.abs(x) > LOUD)
        x = x[:min(x.size, loud[-1] + 1 + int(ANNOUNCE_TAIL_S * SR))]
        if not 1.2 <= x.size / SR <= 1.6:
            raise SystemExit(f"{name}: {x.size / SR:.2f} s, not 1.2-1.6 s: change its rate in ANNOUNCEMENT_SPEC")
        entry = {"kind": "announcement", "file": f"announce-{name.lower()}.opus", "name": name, "text": text,
                 "voice": voice, "rate": rate, "amplitude": AMPLITUDE, "command": shlex.join(cmd),
                 "espeak_ng_version": version,
                 "post": f"trailing silence cut to {ANNOUNCE_TAIL_S} s after the last sample above -50 dBFS"}
        write(entry, x)
    manifest = {
        "generator": "scripts/make_voice_fixtures.py (run: .venv/bin/python scripts/make_voice_fixtures.py)",
        "espeak_ng_version": version,
        "encoding": {"container": "ogg (fflags +bitexact)", "codec": "libopus", "sample_rate": SR, "channels": 1,
                     "sample_format": "s16", "bit_rate": BIT_RATE, "options": OPUS_OPTIONS,
                     "resampling": "espeak-ng 22050 Hz -> 16000 Hz, soxr HQ",
                     "pyav": av.__version__, "libavcodec": ".".join(map(str, av.library_versions["libavcodec"]))},
        "sentences": list(voices.SENTENCES), "voices": list(voices.VOICES), "rates": list(voices.RATES),
        "clips": clips,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(c["bytes"] for c in clips)
    print(f"{len(clips)} clips, {total / 1024:.0f} KiB, {sum(c['seconds'] for c in clips):.0f} s of audio -> {out}")


if __name__ == "__main__":
    main()
