"""weights: fetch from a hub (a fake one here), verify sizes and hashes online and offline, catch
truncated and wrong files with clear messages, say clearly when there is no network, convert
official pickles to safetensors with identical tensors."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.ops import commands as cli_ops
from salmonn import weights
from salmonn.weights import BEATS_FILE, RemoteFile


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """An in-memory hub: repo -> {path: bytes}; large/binary files are 'LFS' (sha256 published)."""

    LFS_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".h5", ".onnx", ".model")

    def __init__(self, repos):
        self.repos = repos
        self.downloads: list[tuple[str, str]] = []

    def _remote(self, path, data):
        lfs = path.endswith(self.LFS_SUFFIXES)
        return RemoteFile(path, len(data), hashlib.sha256(data).hexdigest() if lfs else None,
                          None if lfs else _git_oid(data))

    def list_files(self, repo_id, repo_type, revision):
        return {p: self._remote(p, d) for p, d in self.repos[repo_id].items()}

    def file_info(self, repo_id, repo_type, revision, path):
        return self._remote(path, self.repos[repo_id][path])

    def download(self, repo_id, repo_type, revision, path, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.repos[repo_id][path])
        self.downloads.append((repo_id, path))
        return dest


def _fake_repos():
    return {
        "openai/whisper-large-v2": {
            "config.json": b'{"d_model": 64}', "preprocessor_config.json": b"{}",
            "model.safetensors": b"W" * 3000, "tf_model.h5": b"T" * 100, "onnx/encoder.onnx": b"O" * 10,
            "README.md": b"# whisper",
        },
        "lmsys/vicuna-13b-v1.1": {  # no safetensors: the pickled shards are taken
            "config.json": b'{"hidden_size": 64}', "tokenizer.model": b"S" * 500,
            "tokenizer_config.json": b"{}", "pytorch_model-00001-of-00002.bin": b"A" * 2000,
            "pytorch_model-00002-of-00002.bin": b"B" * 1000, "pytorch_model.bin.index.json": b'{"weight_map": {}}',
        },
        "fffiloni/SALMONN-7B-gradio": {f"beats/{BEATS_FILE}": b"beats" * 400, "app.py": b"print()"},
        "tsinghua-ee/SALMONN": {"salmonn_v1.pth": b"salmonn" * 300, "README.md": b"# SALMONN"},
    }


SMALL_SIZES = {"salmonn_v1.pth": 2100, BEATS_FILE: 2000}  # the fake files' "official" sizes


@pytest.fixture
def fetched(tmp_path):
    hub = FakeHub(_fake_repos())
    d = tmp_path / "weights"
    res = weights.fetch("salmonn-13b", d, hub=hub, known_sizes=SMALL_SIZES)
    return hub, d, res


def test_fetch_lays_out_a_parts_directory(fetched):
    hub, d, res = fetched
    assert res.verify.ok, res.verify.format()
    got = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert got == sorted([
        BEATS_FILE, "salmonn_v1.pth", weights.MANIFEST, weights.PARTS_FILE,
        "whisper-large-v2/config.json", "whisper-large-v2/preprocessor_config.json",
        "whisper-large-v2/model.safetensors",
        "vicuna-13b-v1.1/config.json", "vicuna-13b-v1.1/tokenizer.model", "vicuna-13b-v1.1/tokenizer_config.json",
        "vicuna-13b-v1.1/pytorch_model-00001-of-00002.bin", "vicuna-13b-v1.1/pytorch_model-00002-of-00002.bin",
        "vicuna-13b-v1.1/pytorch_model.bin.index.json",
    ])
    spec = json.loads((d / weights.PARTS_FILE).read_text())
    assert spec == {"preset": "salmonn-13b", "model_id": "salmonn-13b", "whisper": "whisper-large-v2",
                    "beats": BEATS_FILE, "llm": "vicuna-13b-v1.1", "checkpoint": "salmonn_v1.pth"}
    # the model package reads this layout
    from salmonn.config import config_from_parts_dir

    cfg = config_from_parts_dir(d)
    assert cfg.checkpoint_path == str(d / "salmonn_v1.pth") and cfg.llm_path == str(d / "vicuna-13b-v1.1")
    manifest = json.loads((d / weights.MANIFEST).read_text())
    assert manifest["files"]["salmonn_v1.pth"] == {
        "size": 2100, "sha256": hashlib.sha256(b"salmonn" * 300).hexdigest()}
    # fetching again downloads nothing
    n = len(hub.downloads)
    again = weights.fetch("salmonn-13b", d, hub=hub, known_sizes=SMALL_SIZES)
    assert len(hub.downloads) == n and again.downloaded == () and len(again.kept) == 11


def test_verify_online_catches_truncated_and_wrong_files(fetched):
    hub, d, _ = fetched
    res = weights.verify("salmonn-13b", d, hub=hub, known_sizes=SMALL_SIZES)
    assert res.ok and all(c.status == "ok" for c in res.checks) and "hub" in res.reference

    ckpt = d / "salmonn_v1.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:700])                        # an interrupted download
    beats = d / BEATS_FILE
    beats.write_bytes(b"x" * beats.stat().st_size)                    # same size, other content
    cfg = d / "whisper-large-v2" / "config.json"
    cfg.write_bytes(b'{"d_model": 65}')                               # a small (non-LFS) file changed
    (d / "vicuna-13b-v1.1" / "tokenizer.model").unlink()
    res = weights.verify("salmonn-13b", d, hub=hub, known_sizes=SMALL_SIZES)
    assert not res.ok
    by = {c.rel: c for c in res.checks}
    assert by["salmonn_v1.pth"].status == "truncated"
    assert "TRUNCATED salmonn_v1.pth: 700 bytes, expected 2,100" in by["salmonn_v1.pth"].message
    assert "33.3% of the file" in by["salmonn_v1.pth"].message
    assert by[BEATS_FILE].status == "wrong_file" and "sha256" in by[BEATS_FILE].message
    assert "same size, different content" in by[BEATS_FILE].message
    assert by["whisper-large-v2/config.json"].status == "wrong_file"
    assert "git blob id" in by["whisper-large-v2/config.json"].message
    assert by["vicuna-13b-v1.1/tokenizer.model"].status == "missing"
    assert "2 FAILED" not in res.format() and "4 FAILED" in res.format()
    with pytest.raises(weights.WeightsError, match="not recording"):
        weights.verify("salmonn-13b", d, hub=hub, known_sizes=SMALL_SIZES, record=True)


def test_verify_offline_against_the_recorded_manifest(fetched):
    _hub, d, _ = fetched
    res = weights.verify("salmonn-13b", d, mode="offline", known_sizes=SMALL_SIZES)
    assert res.ok and "manifest" in res.reference
    assert all(c.status == "ok" for c in res.checks) and len(res.checks) == 11
    (d / BEATS_FILE).write_bytes(b"y" * 2000)
    res = weights.verify("salmonn-13b", d, mode="offline", known_sizes=SMALL_SIZES, parts=["beats", "checkpoint"])
    by = {c.rel: c for c in res.checks}
    assert set(by) == {BEATS_FILE, "salmonn_v1.pth"}
    assert by[BEATS_FILE].status == "wrong_file" and "manifest" in by[BEATS_FILE].message
    assert by["salmonn_v1.pth"].status == "ok"


def test_official_sizes_without_hub_or_manifest(tmp_path):
    """The real official sizes catch a truncated and a wrong file with no reference at all."""
    d = tmp_path / "w"
    d.mkdir()
    (d / "salmonn_v1.pth").write_bytes(b"\0" * 1000)
    with open(d / BEATS_FILE, "wb") as f:                             # sparse: no 363 MB written
        f.truncate(363_145_291 + 4096)
    res = weights.verify("salmonn-13b", d, mode="offline", parts=["beats", "checkpoint"])
    by = {c.rel: c for c in res.checks}
    assert by["salmonn_v1.pth"].status == "truncated"
    assert "expected 400,466,533 (official size)" in by["salmonn_v1.pth"].message
    assert by[BEATS_FILE].status == "wrong_file"
    assert "expected 363,145,291 (official size)" in by[BEATS_FILE].message
    with open(d / BEATS_FILE, "r+b") as f:
        f.truncate(363_145_291)
    by = {c.rel: c for c in weights.verify("salmonn-13b", d, mode="offline", parts=["beats"]).checks}
    assert by[BEATS_FILE].status == "unverified" and "NOT verified" in by[BEATS_FILE].message


def test_record_then_verify_offline(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    (d / "salmonn_7b_v0.pth").write_bytes(b"seven" * 100)
    res = weights.verify("salmonn-7b", d, mode="offline", parts=["checkpoint"], record=True)
    assert res.ok
    assert json.loads((d / weights.MANIFEST).read_text())["files"]["salmonn_7b_v0.pth"]["size"] == 500
    (d / "salmonn_7b_v0.pth").write_bytes(b"seven" * 99)
    res = weights.verify("salmonn-7b", d, mode="offline", parts=["checkpoint"])
    assert [c.status for c in res.checks] == ["truncated"] and "manifest" in res.checks[0].message


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_network_is_said_clearly(fetched, tmp_path):
    _hub, d, _ = fetched
    dead = weights.HfHub(endpoint=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(weights.HubUnavailable, match="cannot reach the model hub.*no network access"):
        weights.fetch("salmonn-13b", tmp_path / "new", hub=dead)
    with pytest.raises(weights.HubUnavailable):
        weights.verify("salmonn-13b", d, hub=dead, mode="online")
    # auto: falls back to the manifest and says why
    res = weights.verify("salmonn-13b", d, hub=dead, known_sizes=SMALL_SIZES)
    assert res.ok and "manifest" in res.reference and "cannot reach the model hub" in res.note


def test_cli_weights_verify_and_offline_fetch(fetched, tmp_path, capsys, monkeypatch):
    _hub, d, _ = fetched
    parser = argparse.ArgumentParser()
    cli_ops.add_subcommands(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setattr(weights, "KNOWN_SIZES", SMALL_SIZES)
    args = parser.parse_args(["weights", "verify", "salmonn-13b", str(d), "--offline"])
    assert args.func(args) == 0
    assert "11 of 11 files ok" in capsys.readouterr().out
    (d / "salmonn_v1.pth").write_bytes(b"s" * 10)
    assert args.func(args) == 1
    assert "TRUNCATED salmonn_v1.pth" in capsys.readouterr().out
    args = parser.parse_args(["weights", "fetch", "salmonn-13b", "--to", str(tmp_path / "x"),
                              "--endpoint", f"http://127.0.0.1:{_closed_port()}"])
    assert args.func(args) == 2
    assert "no network access" in capsys.readouterr().err


def _official_layout(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "speech_Qformer.bert.encoder.layer.0.attention.self.query.weight": torch.randn(8, 8, generator=g),
        "speech_llama_proj.weight": torch.randn(16, 8, generator=g),
        "speech_llama_proj.bias": torch.zeros(16),
        "speech_query_tokens": torch.randn(1, 1, 8, generator=g),
        "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight":
            torch.randn(2, 16, generator=g),
        "step": torch.tensor([3], dtype=torch.int64),
        "half": torch.randn(4, generator=g).half(),
    }
    torch.save({"model": tensors, "optimizer": {}, "epoch": 0}, path)
    return tensors


def test_convert_round_trips_an_official_layout_checkpoint(tmp_path):
    src = tmp_path / "salmonn_v1.pth"
    tensors = _official_layout(src)
    dst, n = weights.convert(src)
    assert dst == tmp_path / "salmonn_v1.safetensors" and n == len(tensors)
    back = load_file(str(dst))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_convert_cli_and_errors(tmp_path, capsys):
    src = tmp_path / "ckpt.pth"
    _official_layout(src)
    parser = argparse.ArgumentParser()
    cli_ops.add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["weights", "convert", str(src), str(tmp_path / "out" / "c.safetensors")])
    assert args.func(args) == 0
    assert "7 tensors, each identical to the source" in capsys.readouterr().out
    args = parser.parse_args(["weights", "convert", str(tmp_path / "missing.pth")])
    assert args.func(args) == 1 and "no such file" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "out")


def test_parts_for_presets():
    names = {p.name: p for p in weights.parts_for("salmonn-7b")}
    assert names["checkpoint"].repo_id == "tsinghua-ee/SALMONN-7B" and names["llm"].local == "vicuna-7b-v1.5"
    with pytest.raises(weights.WeightsError, match="random weights"):
        weights.parts_for("tiny")
