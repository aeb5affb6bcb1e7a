"""Speech gate: generations saved and wall time, with and without the gate, on two archives.

SALMONN's transcribe and emotion answers mean nothing where nobody speaks, and each costs a full
generation. With ``--speech-gate on`` the decode actors run silero-vad on every window
(``pipelines.vad``) and the predictor skips speech tasks on windows whose speech ratio is below
the threshold (rows with ``finish_reason = "no_speech"``) and every task on digitally silent
windows (``"silence"``). This builds two archives of real voices (espeak-ng clips committed as
fixtures, ``pipelines.voices``: several voices and rates) and real non-speech
(``pipelines.synth`` music, noise, tones, silence), encoded like the real thing:

* **podcast**: episodes with a music intro and outro, talk with pauses, ads over music beds,
  music interludes and long pauses (mp3, 44.1 kHz stereo);
* **video library**: clips of ambience, music score, sound effects and title-card silence with a
  few short lines of dialogue (mp4 with a video stream, AAC 44.1 kHz stereo).

and reports, per archive, on the tiny random model and the three default tasks (a local Ray):

* speech hours (VAD) vs audio hours (and the synthetic ground truth);
* generations saved (%) and the end-to-end wall time of ``run_pipeline`` with the gate off and on;
* the VAD's CPU cost per audio hour, where it runs (decode actors) and next to decode's own cost;
  the runtimes compared (ONNX sequence model per window, TorchScript batched / per window);
* overlap efficiency with the gate on: slowest stage alone / end to end (as
  ``benchmarks/pipeline_overlap.py`` defines it; goal >= 0.8);
* with ``--calibrate``, the evidence for the default threshold: speech ratios of 30 s windows of
  each kind of signal.

    python benchmarks/speech_gate.py [--episodes 4] [--episode-s 300] [--clips 8] [--clip-s 150] [--repeats 2]
    python benchmarks/speech_gate.py --calibrate          # threshold evidence only (~1 min)
    python benchmarks/speech_gate.py --smoke              # tiny archives (a test)

The last line gives the generations saved on each archive and the overlap efficiency.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SR = 16_000
OUT_RATE = 44_100
GOAL = 0.8


# --- archives --------------------------------------------------------------------------------

class Track:
    """A 16 kHz mono programme being assembled, with its ground-truth voiced mask."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.voiced: list[np.ndarray] = []

    @property
    def seconds(self) -> float:
        return sum(p.size for p in self.parts) / SR

    def add(self, x: np.ndarray, voiced: np.ndarray | None = None) -> None:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        self.parts.append(x)
        self.voiced.append(np.zeros(x.size, bool) if voiced is None else voiced[:x.size])

    def done(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.parts), np.concatenate(self.voiced)


def _music(seconds: float, seed: int, amplitude: float = 0.5) -> np.ndarray:
    from pipelines import synth

    bpm = (72, 96, 120, 140)[seed % 4]
    return synth.music_like(seconds, SR, 1, bpm=bpm, seed=seed, amplitude=amplitude)[0]


def _room(seconds: float, seed: int, amplitude: float = 0.003) -> np.ndarray:
    from pipelines import synth

    return synth.noise(seconds, SR, 1, amplitude, "pink", seed=seed)[0]


def podcast_episode(seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Intro music (15, 35 or 60 s by episode), talk blocks with pauses, then an ad over a music
    bed, a music interlude (10-40 s) or a long pause (4-8 s) between blocks, outro music."""
    from pipelines import voices

    rng = np.random.default_rng(seed)
    tr = Track()
    intro = min((15.0, 35.0, 60.0)[seed % 3], seconds / 5)
    tr.add(_music(intro, seed))
    k = 0
    while tr.seconds < seconds - intro:
        block = min(rng.uniform(40, 90), seconds - intro - tr.seconds)
        if block < 3:
            break
        talk, voiced = voices.talk(block, seed=seed * 100 + k)
        tr.add(talk + _room(block, seed + k)[:talk.size], voiced)
        left = seconds - intro - tr.seconds
        kind = k % 3
        if kind == 0 and left > 30:                      # an ad: talk over a music bed
            ad, voiced = voices.talk(25, seed=seed * 100 + 50 + k, pause_s=(0.2, 0.6))
            tr.add(ad + _music(25, seed + 7 + k, amplitude=0.15)[:ad.size], voiced)
        elif kind == 1 and left > 15:                    # a music interlude
            tr.add(_music(min(rng.uniform(10, 40), left - 5), seed + 11 + k))
        elif left > 10:                                  # a long pause (room tone)
            tr.add(_room(rng.uniform(4, 8), seed + 13 + k))
        k += 1
    tr.add(_music(intro, seed + 3))
    return tr.done()


def video_clip(seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ambience, music score, sound effects and title-card silence, with a few short lines of
    dialogue (a few percent of the clip)."""
    from pipelines import synth, voices

    rng = np.random.default_rng(seed)
    tr = Track()
    tr.add(np.zeros(int(rng.uniform(3, 8) * SR), np.float32))           # title card: digital silence
    k = 0
    while tr.seconds < seconds:
        kind = k % 4
        left = seconds - tr.seconds
        if kind == 0:
            tr.add(_music(min(left, rng.uniform(20, 50)), seed + k, amplitude=0.4))
        elif kind == 1:
            s = min(left, rng.uniform(15, 35))
            tr.add(synth.noise(s, SR, 1, rng.uniform(0.01, 0.05), "pink", seed=seed + k)[0])
        elif kind == 2:                                                  # sound effects
            s = min(left, rng.uniform(5, 12))
            tr.add(synth.tone_bursts(rng.uniform(300, 2000), s, SR, burst_s=0.3, gap_s=0.7)[0] * 0.5)
        else:                                                           # a line of dialogue
            line = voices.clip(int(rng.integers(len(voices.SENTENCES))),
                               voices.VOICES[int(rng.integers(len(voices.VOICES)))])
            amb = synth.noise(line.size / SR + 1.0, SR, 1, 0.01, "pink", seed=seed + k)[0]
            voiced = np.zeros(amb.size, bool)
            voiced[SR // 2:SR // 2 + line.size] = np.abs(line) > 0
            amb[SR // 2:SR // 2 + line.size] += line
            loud = np.flatnonzero(voiced)
            voiced[loud[0]:loud[-1] + 1] = True
            tr.add(amb, voiced)
        k += 1
    x, v = tr.done()
    n = int(seconds * SR)
    return x[:n], v[:n]


def write_archive(directory: Path, kind: str, n: int, seconds: float) -> dict[str, float]:
    """Encode ``n`` programmes into ``directory`` (cached); returns audio and voiced seconds."""
    import soxr

    from pipelines import synth

    directory.mkdir(parents=True, exist_ok=True)
    audio_s = voiced_s = 0.0
    fmt = "mp3" if kind == "podcast" else "mp4"
    for i in range(n):
        path = directory / f"{kind}{i:03d}{synth.suffix(fmt)}"
        truth = path.with_suffix(".voiced.npy")
        if not (path.exists() and truth.exists()):
            x, voiced = podcast_episode(seconds, i) if kind == "podcast" else video_clip(seconds, 1000 + i)
            up = soxr.resample(x, SR, OUT_RATE)
            stereo = np.stack([up, 0.9 * up]) / max(1.0, float(np.abs(up).max()) / 0.9)
            tmp = path.with_name(".part-" + path.name)
            synth.write_audio(tmp, stereo.astype(np.float32), OUT_RATE, fmt)
            tmp.rename(path)
            np.save(truth, np.packbits(voiced))
            np.save(path.with_suffix(".n.npy"), np.array([voiced.size]))
        n_samples = int(np.load(path.with_suffix(".n.npy"))[0])
        audio_s += n_samples / SR
        voiced_s += np.unpackbits(np.load(truth))[:n_samples].sum() / SR
    return {"audio_s": audio_s, "voiced_s": voiced_s, "files": n}


def truth_of(path: str) -> np.ndarray:
    p = Path(path)
    n = int(np.load(p.with_suffix(".n.npy"))[0])
    return np.unpackbits(np.load(p.with_suffix(".voiced.npy")))[:n].astype(bool)


# --- calibration -----------------------------------------------------------------------------

def calibrate() -> None:
    """Speech ratios of 30 s windows of each kind of signal, and the threshold they support."""
    from pipelines import synth, voices
    from pipelines.vad import DEFAULT_SPEECH_THRESHOLD, SpeechDetector, ratio_of, speech_frames

    det = SpeechDetector()
    n = 30 * SR

    def fit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32).reshape(-1)
        return np.resize(x, n) if x.size < n else x[:n]

    classes: dict[str, list[np.ndarray]] = {
        "tones (60 Hz-3 kHz, bursts)": [synth.tone(f, 30, SR)[0] for f in (60, 220, 440, 1000, 3000)]
        + [synth.tone_bursts(440, 30, SR)[0]],
        "noise (white/pink, -40..-2 dBFS)": [synth.noise(30, SR, 1, a, c, seed=s)[0]
                                            for s, (a, c) in enumerate((a, c) for a in (0.01, 0.2, 0.8)
                                                                        for c in ("white", "pink"))],
        "music-like (6 seeds x 3 tempi)": [fit(_music(30, s + 10 * b)) for s in range(6) for b in range(3)],
        "silence / dither": [np.zeros(n, np.float32), (np.random.default_rng(0).standard_normal(n) * 1e-4)
                             .astype(np.float32)],
        "synth.speech_like (not a voice)": [synth.speech_like(30, SR, seed=s)[0] for s in range(8)],
    }
    classes["noise (white/pink, -40..-2 dBFS)"].append(voices.pink_noise(30, seed=0))   # Voss-McCartney
    one, four = [], []
    for name in voices.announcements():
        a = voices.announcement(name)
        y = np.zeros(n, np.float32)
        y[SR:SR + a.size] = a
        one.append(y)
        y4 = np.zeros(n, np.float32)
        for k in range(4):
            y4[k * 7 * SR:k * 7 * SR + a.size] = a
        four.append(y4)
    classes["voice, 1 announcement (~1.4 s)"] = one
    classes["voice, 4 announcements"] = four
    talk = []
    for s in range(12):
        x, _ = voices.talk(30, seed=s)
        talk.append(x)
    classes["espeak talk (6 voices, 120-260 wpm)"] = talk
    classes["espeak talk + music bed / noise"] = [
        t + 0.25 * fit(_music(30, i)) if i % 2 else t + synth.noise(30, SR, 1, 0.1, "pink", seed=i)[0]
        for i, t in enumerate(talk[:8])]
    classes["espeak talk at -30 dB"] = [0.03 * t for t in talk[:4]]
    for frac in (0.1, 0.2):
        part = []
        for s in range(6):
            x, _ = voices.talk(30 * frac, seed=200 + s)
            y = 0.3 * fit(_music(30, s)) if s % 2 else np.zeros(n, np.float32)
            y[s * SR:s * SR + x.size] += x
            part.append(y)
        classes[f"{int(frac * 100)}% espeak talk in music/silence"] = part
    print(f"speech ratio of 30 s windows (silero-vad, frame threshold 0.5), default gate threshold "
          f"{DEFAULT_SPEECH_THRESHOLD}:")
    print(f"{'signal':40} {'n':>3} {'min':>6} {'median':>7} {'max':>6} {'>= thr':>7} {'max frame p':>11}")
    for name, windows in classes.items():
        probs = det.probabilities_batch(windows)
        r = np.array([ratio_of(speech_frames(p), w.size) for p, w in zip(probs, windows)])
        print(f"{name:40} {len(r):3d} {r.min():6.3f} {np.median(r):7.3f} {r.max():6.3f} "
              f"{np.mean(r >= DEFAULT_SPEECH_THRESHOLD):7.2f} {max(p.max() for p in probs):11.3f}")


# --- VAD cost ---------------------------------------------------------------------------------

def vad_cost(windows: list[np.ndarray]) -> dict[str, float]:
    """Audio seconds per CPU-second (one thread) of each runtime on the same windows."""
    import torch

    from pipelines.vad import SpeechDetector

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    audio_s = sum(w.size for w in windows) / SR
    out = {}
    try:
        onnx, jit = SpeechDetector("onnx"), SpeechDetector("jit")
        onnx.probabilities(windows[0][:SR])
        for name, fn in (
            ("onnx sequence model, one call per window", lambda: [onnx.probabilities(w) for w in windows]),
            ("torchscript, batched over 8 windows", lambda: [jit.probabilities_batch(windows[i:i + 8])
                                                             for i in range(0, len(windows), 8)]),
            ("torchscript, one window at a time", lambda: [jit.probabilities(w) for w in windows[:2]])):
            t0 = time.process_time()
            fn()
            cpu = time.process_time() - t0
            seen = audio_s if "at a time" not in name else sum(w.size for w in windows[:2]) / SR
            out[name] = seen / cpu
        out["onnx per-frame model, batched over 8 windows"] = onnx_per_frame(windows)
    finally:
        torch.set_num_threads(threads)
    return out


def onnx_per_frame(windows: list[np.ndarray]) -> float:
    """The wheel's per-frame ONNX model (silero_vad.onnx) batched over 8 windows at a time, one
    call per 512-sample frame (the usual way to batch silero): audio-s per CPU-s."""
    import onnxruntime as ort

    from pipelines import vad

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    path = os.path.join(os.path.dirname(vad.weights_path("onnx")), "silero_vad.onnx")
    session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    sr = np.array(SR, dtype=np.int64)
    t0 = time.process_time()
    for i in range(0, len(windows), 8):
        group = windows[i:i + 8]
        frames = max(vad.frame_count(w.size) for w in group)
        x = np.zeros((len(group), frames * vad.FRAME), np.float32)
        for j, w in enumerate(group):
            x[j, :w.size] = w
        state = np.zeros((2, len(group), vad.STATE), np.float32)
        context = np.zeros((len(group), vad.CONTEXT), np.float32)
        for f in range(frames):
            chunk = x[:, f * vad.FRAME:(f + 1) * vad.FRAME]
            _, state = session.run(None, {"input": np.concatenate([context, chunk], axis=1), "state": state,
                                          "sr": sr})
            context = chunk[:, -vad.CONTEXT:]
    return sum(w.size for w in windows) / SR / (time.process_time() - t0)


def decode_cost(audio_dir: Path, speech: bool, cut_at_pauses: bool = False) -> dict[str, float]:
    """DecodeStage in this process over an archive: CPU-seconds per audio hour."""
    from pipelines.sources import list_inputs
    from pipelines.stages import DecodeStage

    stage = DecodeStage(speech_gate=speech, cut_at_pauses=cut_at_pauses)
    t0 = time.process_time()
    audio_s = 0.0
    for ref in list_inputs(str(audio_dir)):
        for row in stage.file_rows(ref):
            if row.get("end_s") is not None:
                audio_s += row["end_s"] - row["start_s"]
    cpu = time.process_time() - t0
    return {"cpu_s_per_audio_h": cpu / audio_s * 3600, "x_real_time": audio_s / cpu, "audio_s": audio_s}


def cut_comparison(audio_dir: Path) -> dict[str, dict[str, float]]:
    """Where windows end, against the ground truth: the share of cuts that fall inside a sentence
    (splitting it between two windows) with today's cut at the window length, the quietest-20-ms
    snap (--snap-to-silence) and the VAD pause cut (--cut-at-pauses); and the mean window length."""
    from pipelines.decode import DecodeOptions
    from pipelines.sources import list_inputs
    from pipelines.stages import DecodeStage

    out = {}
    for name, options, pauses in (("fixed 30 s", DecodeOptions(), False),
                                  ("--snap-to-silence", DecodeOptions(snap_to_silence=True), False),
                                  ("--cut-at-pauses", DecodeOptions(), True)):
        stage = DecodeStage(options, cut_at_pauses=pauses)
        inside = cuts = 0
        lengths = []
        for ref in list_inputs(str(audio_dir)):
            voiced = truth_of(ref.uri[7:] if ref.uri.startswith("file://") else ref.uri)
            rows = [r for r in stage.file_rows(ref) if r.get("end_s") is not None]
            lengths += [r["end_s"] - r["start_s"] for r in rows]
            for r in rows[:-1]:                       # the last window ends with the file
                at = int(round(r["end_s"] * SR))
                cuts += 1
                inside += bool(voiced[max(0, at - 160):at + 160].any())   # within 10 ms of speech
        out[name] = {"inside": inside / cuts if cuts else float("nan"), "cuts": cuts,
                     "mean_window_s": float(np.mean(lengths)) if lengths else float("nan")}
    return out


# --- runs -------------------------------------------------------------------------------------

def run_once(audio: Path, out: Path, gate: bool, batch_size: int) -> dict:
    import pyarrow.compute as pc

    import salmonn
    from pipelines.config import PipelineConfig
    from pipelines.output import OutputStore
    from pipelines.run import run_pipeline

    shutil.rmtree(out, ignore_errors=True)
    cfg = PipelineConfig(input=str(audio), out=str(out), tasks=tuple(salmonn.default_tasks()), model="tiny",
                         batch_size=batch_size, progress=False, fresh=True, speech_gate=gate)
    t0 = time.perf_counter()
    summary = run_pipeline(cfg)
    wall = time.perf_counter() - t0
    assert summary.error == 0, summary.format()
    store = OutputStore(str(out))
    segs = store.read_table("segments")
    files = store.read_table("files")
    reasons = segs["finish_reason"].to_pylist()
    generated = sum(r in ("stop", "length") for r in reasons)
    speech_s = pc.sum(files["speech_s"]).as_py() if "speech_s" in files.column_names else None
    return {"wall_s": wall, "rows": segs.num_rows, "generated": generated,
            "no_speech": reasons.count("no_speech"), "silence": reasons.count("silence"),
            "speech_s": speech_s or 0.0, "segments": segs}


def window_recall(segs, audio: Path, threshold: float) -> tuple[float, int, float]:
    """Against the ground truth: recall of the speech tasks on windows with >= 20% voiced audio,
    and the share of windows with < 1% voiced audio that were gated."""
    import pyarrow.compute as pc

    truth: dict[str, np.ndarray] = {}
    kept, gated_empty, empty = [], 0, 0
    rows = segs.filter(pc.equal(segs["task"], "transcribe")).to_pylist()
    for r in rows:
        uri = r["uri"]
        path = uri[7:] if uri.startswith("file://") else uri
        if path not in truth:
            truth[path] = truth_of(path)
        v = truth[path][int(r["start_s"] * SR):int(r["end_s"] * SR)]
        share = v.mean() if v.size else 0.0
        if share >= 0.2:
            kept.append(r["finish_reason"] in ("stop", "length"))
        elif share < 0.01:
            empty += 1
            gated_empty += r["finish_reason"] in ("no_speech", "silence")
    recall = sum(kept) / len(kept) if kept else float("nan")
    return recall, len(kept), gated_empty / empty if empty else float("nan")


def stages_alone(audio: Path, gate: bool, batch_size: int) -> dict[str, float]:
    """Decode (with the VAD when ``gate``) alone and inference alone, each as its own Ray Data
    job with the pools ``run_pipeline`` uses (inference over the materialised decode output,
    model load included), as ``benchmarks/pipeline_overlap.py`` measures them."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    import salmonn
    from pipelines.config import PipelineConfig
    from pipelines.graph import plan_resources
    from pipelines.infer import SalmonnPredictor
    from pipelines.sources import list_inputs
    from pipelines.stages import DecodeStage, refs_table

    DataContext.get_current().enable_progress_bars = False
    tasks = tuple(salmonn.default_tasks())
    cfg = PipelineConfig(input=str(audio), out=str(audio), tasks=tasks, model="tiny", batch_size=batch_size,
                         progress=False, speech_gate=gate)
    refs = list_inputs(str(audio))
    plan = plan_resources(cfg)
    t0 = time.perf_counter()
    ds = ray.data.from_arrow(refs_table(refs)).repartition(len(refs))
    ds = ds.map_batches(DecodeStage, fn_constructor_kwargs={"options": cfg.decode, "speech_gate": gate},
                        batch_size=1, batch_format="pyarrow",
                        compute=ActorPoolStrategy(min_size=1, max_size=plan.decode_actors), num_cpus=1)
    decoded = ds.materialize()
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = decoded.map_batches(SalmonnPredictor, fn_constructor_kwargs={
        "model": "tiny", "tasks": list(tasks), "speech_threshold": cfg.speech_threshold if gate else None},
        batch_size=plan.batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=plan.infer_actors),
        num_gpus=plan.gpus_per_infer_actor, num_cpus=plan.cpus_per_infer_actor)
    for _ in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        pass
    return {"decode_s": decode_s, "infer_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=4, help="podcast episodes")
    parser.add_argument("--episode-s", type=float, default=300.0)
    parser.add_argument("--clips", type=int, default=8, help="video-library clips")
    parser.add_argument("--clip-s", type=float, default=150.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="runs with and without the gate (best of)")
    parser.add_argument("--num-cpus", type=int, default=2, help="local Ray CPUs")
    parser.add_argument("--no-overlap", action="store_true", help="skip the stages-alone (overlap) measurement")
    parser.add_argument("--calibrate", action="store_true", help="threshold evidence only")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "salmonn-speech-gate-bench")
    parser.add_argument("--smoke", action="store_true",
                        help="1 short episode, 1 short clip, gate-on runs only, no overlap run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if args.calibrate:
        calibrate()
        return
    if args.smoke:
        args.episodes, args.episode_s, args.clips, args.clip_s, args.no_overlap = 1, 60.0, 1, 40.0, True

    from pipelines.config import PipelineConfig

    archives = {}
    for kind, n, secs in (("podcast", args.episodes, args.episode_s), ("video", args.clips, args.clip_s)):
        d = args.dir / f"{kind}-{n}x{secs:g}"
        archives[kind] = (d, write_archive(d, kind, n, secs))
    threshold = PipelineConfig(input=".", out=".").speech_threshold

    # VAD cost next to decode's own
    pod_dir = archives["podcast"][0]
    probe_windows = []
    from pipelines.sources import list_inputs
    from pipelines.stages import DecodeStage

    for row in DecodeStage().file_rows(list_inputs(str(pod_dir))[0]):
        if row.get("samples") is not None:
            probe_windows.append(np.frombuffer(row["samples"], dtype="<f4"))
    probe_windows = (probe_windows * 8)[:16] if not args.smoke else probe_windows[:2]
    runtimes = vad_cost(probe_windows)
    dec_off = decode_cost(pod_dir, speech=False)
    dec_on = decode_cost(pod_dir, speech=True)
    cuts = cut_comparison(pod_dir)

    import ray

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    results = {}
    try:
        out_root = Path(tempfile.mkdtemp(prefix="speech-gate-out-", dir=args.dir))
        for kind, (d, meta) in archives.items():
            best: dict[bool, dict] = {}
            for _ in range(args.repeats):          # gate on and off alternating, best of --repeats each
                for gate in ((True,) if args.smoke else (True, False)):
                    run = run_once(d, out_root / f"{kind}-{gate}", gate=gate, batch_size=args.batch_size)
                    if not args.no_overlap:
                        run.update(stages_alone(d, gate, args.batch_size))
                    prev = best.get(gate)
                    best[gate] = run if prev is None else {
                        **prev, **{k: min(prev[k], run[k]) for k in ("wall_s", "decode_s", "infer_s") if k in run}}
            on = best[True]
            # gate off generates every row; --smoke does not time it
            off = best.get(False) or {**on, "wall_s": float("nan"), "generated": on["rows"]}
            recall, n_speech_windows, gated_empty = window_recall(on["segments"], d, threshold)
            results[kind] = {"meta": meta, "off": off, "on": on, "recall": recall, "n_sw": n_speech_windows,
                             "gated_empty": gated_empty}
            print(f"  {kind}: gate off {off['wall_s']:.1f} s, on {on['wall_s']:.1f} s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
        shutil.rmtree(out_root, ignore_errors=True)
    finally:
        ray.shutdown()

    print(f"\nmachine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; local Ray with "
          f"{args.num_cpus} CPUs; tiny random model, tasks caption,transcribe,emotion, batch {args.batch_size}; "
          f"gate threshold {threshold}")
    print(f"{'archive':8} {'files':>5} {'audio h':>8} {'voiced h':>8} {'VAD speech h':>12} {'rows':>6} "
          f"{'generated off/on':>17} {'saved':>6} {'no_speech':>9} {'silence':>7} {'wall off/on s':>14} "
          f"{'recall>=20%':>11} {'gated<1%':>8}")
    for kind, r in results.items():
        m, off, on = r["meta"], r["off"], r["on"]
        saved = 1 - on["generated"] / off["generated"]
        print(f"{kind:8} {m['files']:5d} {m['audio_s'] / 3600:8.3f} {m['voiced_s'] / 3600:8.3f} "
              f"{on['speech_s'] / 3600:12.3f} {on['rows']:6d} {off['generated']:8d}/{on['generated']:<8d} "
              f"{saved:6.1%} {on['no_speech']:9d} {on['silence']:7d} {off['wall_s']:6.1f}/{on['wall_s']:<7.1f} "
              f"{r['recall']:11.3f} {r['gated_empty']:8.2f}")
    print("\nVAD runtimes on one CPU thread (30 s podcast windows), audio-s per CPU-s:")
    for name, x in runtimes.items():
        print(f"  {name:45} {x:7.0f}x real time  = {3600 / x:5.2f} CPU-s per audio hour")
    print(f"decode stage in-process over the podcast archive ({dec_off['audio_s'] / 60:.1f} audio-min):")
    print(f"  gate off: {dec_off['cpu_s_per_audio_h']:6.2f} CPU-s per audio hour ({dec_off['x_real_time']:.0f}x)")
    print(f"  gate on:  {dec_on['cpu_s_per_audio_h']:6.2f} CPU-s per audio hour ({dec_on['x_real_time']:.0f}x): "
          f"the VAD adds {dec_on['cpu_s_per_audio_h'] - dec_off['cpu_s_per_audio_h']:.2f} CPU-s per audio hour "
          f"on the decode actors")
    print("window cuts on the podcast archive (inside a sentence = within 10 ms of a voiced sample):")
    for name, c in cuts.items():
        print(f"  {name:20} {c['inside']:6.1%} of {c['cuts']} cuts inside a sentence, mean window "
              f"{c['mean_window_s']:.1f} s")
    ratios = {}
    if not args.no_overlap:
        print("stages alone and end to end (best of each), overlap = slowest stage alone / end to end:")
        for kind, r in results.items():
            for gate in ("off", "on"):
                x = r[gate]
                slowest = max(x["decode_s"], x["infer_s"])
                ratio = slowest / x["wall_s"]
                if gate == "on":
                    ratios[kind] = ratio
                print(f"  {kind:8} gate {gate:3}: decode alone {x['decode_s']:6.1f} s, inference alone "
                      f"{x['infer_s']:6.1f} s, end to end {x['wall_s']:6.1f} s -> {ratio:.2f}")
    saved = {k: 1 - r["on"]["generated"] / r["off"]["generated"] for k, r in results.items()}
    ratio = (", ".join(f"{k} {v:.2f}" for k, v in ratios.items()) + " with the gate on") if ratios else \
        "not measured (--no-overlap)"
    print(f"\nspeech_gate: generations saved podcast {saved['podcast']:.1%}, video {saved['video']:.1%}; "
          f"overlap efficiency {ratio} (goal >= {GOAL})")


if __name__ == "__main__":
    from pipelines import lifecycle

    lifecycle.main(main)   # exit code = main's; native libraries closed in order first
