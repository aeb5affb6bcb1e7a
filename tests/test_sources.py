"""Sources: listing directories, prefixes, globs and manifests into FileRefs."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.sources import (
    AUDIO_EXTENSIONS,
    VIDEO_EXTENSIONS,
    FileRef,
    file_id_for,
    list_inputs,
)


@pytest.fixture
def tree(tmp_path):
    """A small directory tree: audio, video, non-media, upper-case extensions, nesting."""
    files = {
        "a.mp3": b"1" * 10,
        "B.WAV": b"2" * 20,
        "notes.txt": b"hello",
        "cover.jpg": b"jpg",
        "sub/c.flac": b"3" * 30,
        "sub/deeper/d.m4a": b"4" * 40,
        "sub/deeper/e.MP4": b"5" * 50,
        "sub/readme.md": b"x",
    }
    for name, data in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return tmp_path


def names(refs, root) -> list[str]:
    return [os.path.relpath(r.uri, root) for r in refs]


def test_directory_lists_media_recursively_sorted(tree):
    refs = list_inputs(str(tree))
    assert names(refs, tree) == ["B.WAV", "a.mp3", "sub/c.flac", "sub/deeper/d.m4a", "sub/deeper/e.MP4"]
    assert list_inputs(str(tree) + "/") == refs


def test_file_ref_fields(tree):
    (ref,) = [r for r in list_inputs(str(tree)) if r.uri.endswith("c.flac")]
    assert ref.uri == str(tree / "sub" / "c.flac") and os.path.isabs(ref.uri)
    assert ref.size_bytes == 30 and ref.etag is None
    assert ref.mtime == datetime.fromtimestamp(os.stat(ref.uri).st_mtime, tz=UTC)
    assert ref.mtime.tzinfo is not None
    assert ref.file_id == hashlib.sha1(ref.uri.encode()).hexdigest()[:16] == file_id_for(ref.uri)
    assert ref.version == f"30-{ref.mtime.isoformat()}"
    with pytest.raises(AttributeError):
        ref.uri = "other"   # frozen


def test_version_changes_with_content(tree):
    (before,) = list_inputs(str(tree / "a.mp3"))
    (tree / "a.mp3").write_bytes(b"longer content")
    os.utime(tree / "a.mp3", (1e9, 1e9))
    (after,) = list_inputs(str(tree / "a.mp3"))
    assert before.file_id == after.file_id and before.version != after.version


def test_non_recursive(tree):
    assert names(list_inputs(str(tree), recursive=False), tree) == ["B.WAV", "a.mp3"]


def test_extension_filter_is_overridable(tree):
    assert names(list_inputs(str(tree), extensions=["wav"]), tree) == ["B.WAV"]
    assert names(list_inputs(str(tree), extensions={".MP3", ".flac"}), tree) == ["a.mp3", "sub/c.flac"]
    everything = list_inputs(str(tree), extensions=())
    assert len(everything) == 8   # empty collection: no filter at all
    assert {".mp3", ".wav", ".flac", ".opus", ".m4a", ".ogg"} <= AUDIO_EXTENSIONS
    assert {".mp4", ".mkv", ".mov", ".webm"} <= VIDEO_EXTENSIONS


def test_glob(tree):
    assert names(list_inputs(str(tree / "sub" / "**" / "*.m4a")), tree) == ["sub/deeper/d.m4a"]
    assert names(list_inputs(str(tree / "*")), tree) == ["B.WAV", "a.mp3"]
    assert list_inputs(str(tree / "*.ogg")) == []


def test_single_file_is_kept_whatever_its_extension(tree):
    (ref,) = list_inputs(str(tree / "cover.jpg"))
    assert ref.uri == str(tree / "cover.jpg") and ref.size_bytes == 3


def test_several_sources_are_merged_and_deduplicated(tree):
    refs = list_inputs([str(tree / "sub"), str(tree / "a.mp3"), str(tree / "sub" / "c.flac")])
    assert names(refs, tree) == ["a.mp3", "sub/c.flac", "sub/deeper/d.m4a", "sub/deeper/e.MP4"]


def test_missing_source_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_inputs(str(tmp_path / "nothing-here"))


def test_text_manifest(tree, tmp_path):
    manifest = tree / "list.txt"
    manifest.write_text(
        "# inputs\n"
        "a.mp3\n"                              # relative: resolved against the manifest's dir
        "\n"
        f"{tree / 'sub' / 'c.flac'}\n"         # absolute
        "sub/missing.mp3\n"                    # does not exist: kept, no version
        "cover.jpg\n"                          # named explicitly: no extension filter
        "a.mp3\n"                              # duplicate
    )
    refs = list_inputs(str(manifest))
    assert names(refs, tree) == ["a.mp3", "cover.jpg", "sub/c.flac", "sub/missing.mp3"]
    missing = refs[3]
    assert (missing.size_bytes, missing.etag, missing.mtime, missing.version) == (None, None, None, "unknown")
    assert missing.file_id == file_id_for(str(tree / "sub" / "missing.mp3"))
    assert refs[0].size_bytes == 10


def test_csv_and_parquet_manifests(tree):
    uris = [str(tree / "B.WAV"), str(tree / "sub" / "deeper" / "d.m4a"), str(tree / "gone.wav")]
    (tree / "m.csv").write_text("uri,label\n" + "".join(f"{u},x\n" for u in uris))
    pq.write_table(pa.table({"uri": uris, "other": [1, 2, 3]}), tree / "m.parquet")
    from_csv = list_inputs(str(tree / "m.csv"))
    from_parquet = list_inputs(str(tree / "m.parquet"))
    assert from_csv == from_parquet
    assert [r.uri for r in from_csv] == sorted(uris)
    assert [r.size_bytes for r in from_csv] == [20, None, 40]


def test_manifest_without_uri_column(tree):
    (tree / "bad.csv").write_text("path\n/a.mp3\n")
    with pytest.raises(ValueError, match="uri"):
        list_inputs(str(tree / "bad.csv"))


def test_any_fsspec_protocol():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe({"/mem/x/one.mp3": b"1", "/mem/x/two.txt": b"2", "/mem/x/y/three.opus": b"33"})
    refs = list_inputs("memory://mem/x")
    assert [r.uri for r in refs] == ["memory:///mem/x/one.mp3", "memory:///mem/x/y/three.opus"]
    assert refs[1].size_bytes == 2
    with fsspec.open(refs[1].uri, "rb") as f:   # the URI opens again as it is
        assert f.read() == b"33"


# --- object storage (moto) -----------------------------------------------------------------


def test_s3_prefix_glob_and_manifest(s3_server, s3fs_client, s3_storage_options):
    s3fs_client.mkdir("podcasts")
    s3fs_client.mkdir("other")
    s3fs_client.pipe({
        "podcasts/2024/ep1.mp3": b"a" * 100,
        "podcasts/2024/ep2.M4A": b"b" * 200,
        "podcasts/2024/art.png": b"c",
        "podcasts/2025/ep3.opus": b"d" * 300,
        "other/ep9.mp3": b"e",
    })
    refs = list_inputs("s3://podcasts/", s3_storage_options)
    assert [r.uri for r in refs] == ["s3://podcasts/2024/ep1.mp3", "s3://podcasts/2024/ep2.M4A",
                                     "s3://podcasts/2025/ep3.opus"]
    client = s3_server.boto3_client()
    for r in refs:
        head = client.head_object(Bucket="podcasts", Key=r.uri.removeprefix("s3://podcasts/"))
        assert r.etag == head["ETag"].strip('"') and r.version == r.etag
        assert r.mtime == head["LastModified"] and r.mtime.tzinfo is not None
        assert r.file_id == file_id_for(r.uri)
    assert [r.uri for r in list_inputs("s3://podcasts/2025", s3_storage_options)] == ["s3://podcasts/2025/ep3.opus"]
    assert [r.uri for r in list_inputs("s3://podcasts/*/ep[12]*", s3_storage_options)] == [
        "s3://podcasts/2024/ep1.mp3", "s3://podcasts/2024/ep2.M4A"]
    s3fs_client.pipe("podcasts/lists/today.txt", b"../2024/ep1.mp3\ns3://other/ep9.mp3\nnot-there.mp3\n")
    manifest = list_inputs("s3://podcasts/lists/today.txt", s3_storage_options)
    assert [r.uri for r in manifest] == ["s3://other/ep9.mp3", "s3://podcasts/2024/ep1.mp3",
                                         "s3://podcasts/lists/not-there.mp3"]
    assert manifest[0].etag and manifest[1].etag == refs[0].etag
    assert (manifest[2].etag, manifest[2].size_bytes) == (None, None)


def test_listing_many_objects_reads_no_content(s3_server, s3_storage_options, monkeypatch):
    import s3fs.core

    s3_server.put_objects("big", {f"show/{i:05d}.mp3": b"x" * (i % 7) for i in range(2500)})

    def no_reads(*args, **kwargs):
        raise AssertionError("listing must not read object content")

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", no_reads)
    monkeypatch.setattr(s3fs.core.S3FileSystem, "_cat_file", no_reads)
    refs = list_inputs("s3://big/show/", s3_storage_options)
    assert len(refs) == 2500   # 3 LIST pages
    assert [r.uri for r in refs] == sorted(r.uri for r in refs)
    assert all(r.etag for r in refs) and refs[8].size_bytes == 1


def test_file_ref_is_plain_data():
    ref = FileRef(uri="s3://b/k.mp3", size_bytes=1, etag=None, mtime=None, file_id="x")
    assert ref.version == "1-None"
    assert FileRef(**{**ref.__dict__, "etag": "abc"}).version == "abc"
