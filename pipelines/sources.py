"""Input listing: a directory/prefix, a glob, a single file or a manifest -> sorted FileRefs.

Any fsspec URL works (local paths, ``s3://``, ``gs://``, ``memory://``...); ``storage_options``
go to fsspec unchanged. Listing only reads metadata (``find(..., detail=True)``: one LIST page per
1000 keys on S3), never an object's content, so a prefix of 100k objects lists in seconds.

Which files are kept:

* directory, prefix or glob: files whose extension is in ``extensions`` (case-insensitive).
  ``extensions=None`` means :data:`AUDIO_EXTENSIONS` | :data:`VIDEO_EXTENSIONS`; an empty
  collection (``()``) keeps every file. Content still decides later: a ``.mp3`` that is not audio
  becomes an error row in decode, never a crash here.
* a single file, or the entries of a manifest: always kept, whatever their extension, because
  someone named them explicitly. A manifest entry that does not exist (or cannot be stat'ed)
  still yields a FileRef, with ``size_bytes``/``etag``/``mtime`` None, so that decode turns it
  into an error row instead of it being dropped silently.

Manifests are recognised by name: ``*.parquet`` or ``*.csv`` with a ``uri`` column, ``*.txt``
with one URI per line (blank lines and lines starting with ``#`` are skipped). Relative entries
are resolved against the manifest's own directory. A text or CSV manifest that is not valid UTF-8
(an old Latin-1 list) is read byte for byte: its entries name the files whose names are those bytes.

Names that are not valid UTF-8. POSIX file names are bytes; Python hands them over with each
byte that is not part of valid UTF-8 as a lone surrogate (``os.fsdecode``), which no table (Arrow,
Parquet, Delta) can store. Such a name's ``uri`` is percent-encoded, losslessly: every byte that
is not part of valid UTF-8 becomes ``%XX`` (upper-case hex) and, in these names only, a literal
``%`` becomes ``%25``; everything else stays as it is. So ``/data/caf\xe9.mp3`` (Latin-1) is
``/data/caf%E9.mp3``, and URIs of valid UTF-8 names (all S3 keys are) are unchanged, as are their
``file_id``. :func:`escape_uri` makes the form, :func:`unescape_uri` undoes it, and
:func:`candidate_paths` gives the paths to try when opening a URI: the URI as written first, then
its unescaped name, which is only tried when escaping that name gives back exactly this URI. (The
one ambiguity: a valid name spelt like another file's escaped name, e.g. a real ``caf%E9.mp3``
next to a Latin-1 ``caf\xe9.mp3``; the literal name wins, both get the same ``uri``, and the
listing keeps one of them.)

Local entries that are not regular files (dangling symlinks, symlink loops, FIFOs, devices,
sockets) are listed like files, with ``size_bytes`` None unless a symlink leads to a regular
file; decode gives each its own error type without opening it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import posixpath
import stat
import urllib.parse
from collections.abc import Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
from fsspec.core import url_to_fs

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS: frozenset[str] = frozenset({
    ".wav", ".wave", ".flac", ".mp3", ".mp2", ".ogg", ".oga", ".opus", ".m4a", ".m4b", ".aac",
    ".wma", ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf", ".amr", ".ac3", ".eac3", ".mka",
    ".spx", ".w64", ".ape", ".wv", ".alac", ".3ga", ".dts", ".tta",
})
VIDEO_EXTENSIONS: frozenset[str] = frozenset({
    ".mp4", ".m4v", ".mkv", ".mov", ".webm", ".avi", ".flv", ".wmv", ".asf", ".mpg", ".mpeg",
    ".ts", ".mts", ".m2ts", ".3gp", ".3g2", ".ogv", ".vob",
})
MANIFEST_EXTENSIONS: frozenset[str] = frozenset({".parquet", ".csv", ".txt"})

_LOCAL_PROTOCOLS = {"file", "local"}
_STAT_THREADS = 16  # concurrent HEADs when stat'ing manifest entries on object storage


@dataclass(frozen=True)
class FileRef:
    """One input file, as listed: where it is and which version of it we saw."""

    uri: str                  # full URI with protocol for remote, absolute path for local
    size_bytes: int | None
    etag: str | None          # object-storage ETag (or version id); None locally
    mtime: datetime | None    # UTC
    file_id: str              # stable hash of the URI

    @property
    def version(self) -> str:
        """The ETag where the store has one, else ``"{size}-{mtime iso}"``; ``"unknown"`` when
        the file could not be stat'ed."""
        if self.etag:
            return self.etag
        if self.size_bytes is None and self.mtime is None:
            return "unknown"
        return f"{self.size_bytes}-{self.mtime.isoformat() if self.mtime else None}"


def file_id_for(uri: str) -> str:
    """Stable 16-hex-digit id of a URI (sha1 prefix of its escaped form, see :func:`escape_uri`)."""
    return hashlib.sha1(escape_uri(uri).encode("utf-8")).hexdigest()[:16]


_SURROGATE_BYTES = range(0xDC80, 0xDD00)   # os.fsdecode's stand-ins for the bytes 0x80-0xFF


def escape_uri(uri: str) -> str:
    """``uri`` as valid UTF-8 text, losslessly (see the module docstring).

    A URI that is valid UTF-8 comes back unchanged. Otherwise each byte that is not part of valid
    UTF-8 (a lone surrogate U+DC80-U+DCFF in Python's str) becomes ``%XX`` and each ``%`` becomes
    ``%25``. Other lone surrogates (never part of an OS file name) become U+FFFD.
    """
    try:
        uri.encode("utf-8")
        return uri
    except UnicodeEncodeError:
        pass
    out = []
    for c in uri:
        code = ord(c)
        if c == "%":
            out.append("%25")
        elif code in _SURROGATE_BYTES:
            out.append(f"%{code - 0xDC00:02X}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append(c)
    return "".join(out)


def unescape_uri(uri: str) -> str | None:
    """The name :func:`escape_uri` turned into ``uri`` (with lone surrogates for its non-UTF-8
    bytes, as ``os.fsdecode`` gives it), or None when ``uri`` is not such an escaped form."""
    if "%" not in uri:
        return None
    try:
        name = os.fsdecode(urllib.parse.unquote_to_bytes(uri)) if os.name == "posix" else None
    except (UnicodeDecodeError, ValueError):
        return None
    if name is None or name == uri or escape_uri(name) != uri:
        return None
    return name


def candidate_paths(path: str) -> list[str]:
    """The paths to try, in order, for a path or URI that may be an escaped name."""
    name = unescape_uri(path)
    return [path] if name is None else [path, name]


def list_inputs(
    source: str | Sequence[str],
    storage_options: dict | None = None,
    *,
    extensions: Collection[str] | None = None,
    recursive: bool = True,
) -> list[FileRef]:
    """List the input files of ``source`` (one URI or several), sorted by URI, deduplicated.

    ``source``: a directory or prefix (listed recursively unless ``recursive=False``), a glob
    (``s3://b/pod/*/ep*.mp3``), a single file, or a manifest (see the module docstring).
    A directory/prefix/glob that matches nothing gives an empty list; a single file or
    directory that does not exist raises ``FileNotFoundError`` (the run cannot do anything).
    """
    sources = [source] if isinstance(source, str) else list(source)
    storage_options = dict(storage_options or {})
    keep = _normalise_extensions(extensions)
    refs: dict[str, FileRef] = {}
    for src in sources:
        for ref in _list_one(src, storage_options, keep, recursive):
            refs[ref.uri] = ref
    return [refs[uri] for uri in sorted(refs)]


def _normalise_extensions(extensions: Collection[str] | None) -> frozenset[str] | None:
    """None -> the default audio+video set; empty -> no filter (returned as None)."""
    if extensions is None:
        return AUDIO_EXTENSIONS | VIDEO_EXTENSIONS
    if isinstance(extensions, str):
        extensions = [extensions]
    if len(extensions) == 0:
        return None
    return frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def extension(path: str) -> str:
    """The lower-case suffix of a path's last component (".mp3"); "" when it has none."""
    return posixpath.splitext(path.rsplit("/", 1)[-1])[1].lower()


def _list_one(src: str, storage_options: dict, keep: frozenset[str] | None,
              recursive: bool) -> list[FileRef]:
    fs, path = url_to_fs(src, **storage_options)
    if _has_magic(path) and not fs.exists(path):  # a literal "[" in a name is not a glob
        infos = fs.glob(path, detail=True)
        files = [i for i in infos.values() if i.get("type") == "file"]
        return [_ref(fs, i) for i in files if keep is None or extension(i["name"]) in keep]
    info = fs.info(path)  # FileNotFoundError propagates: the source itself is wrong
    if info.get("type") == "directory":
        if recursive:
            walk_options = {"on_error": _unlisted} if is_local_filesystem(fs) else {}   # s3fs takes none
            infos = fs.find(path, detail=True, withdirs=False, **walk_options).values()
        else:
            infos = [i for i in fs.ls(path, detail=True) if i.get("type") == "file"]
        return [_ref(fs, i) for i in infos if keep is None or extension(i["name"]) in keep]
    if extension(path) in MANIFEST_EXTENSIONS:
        if is_local_filesystem(fs) and info.get("type") != "file" and _followed_size_mtime(path)[0] is None:
            raise ValueError(f"manifest {src}: not a regular file (a FIFO or device is never read)")
        return _from_manifest(fs, path, storage_options)
    return [_ref(fs, info)]


def _unlisted(error: Exception) -> None:
    """A folder of the input that cannot be listed (no permission, removed meanwhile): its files
    are missing from the run, which the log says."""
    logger.warning("input folder not listed, its files are left out: %s: %s", type(error).__name__,
                   escape_uri(str(error)))


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if is_local_filesystem(fs):
        return escape_uri(fs._strip_protocol(path))
    return escape_uri(fs.unstrip_protocol(path))


def is_local_filesystem(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local disk (URIs are plain absolute paths there)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool(_LOCAL_PROTOCOLS & set(protocols))


def _ref(fs: fsspec.AbstractFileSystem, info: dict[str, Any]) -> FileRef:
    uri = _uri(fs, info["name"])
    size = info.get("size")
    mtime = _mtime(info)
    if is_local_filesystem(fs) and info.get("type") != "file":
        # A symlink, FIFO, device or socket: the version is that of what a symlink leads to (so a
        # dangling link that gets its target is redone), and a size only for a regular file.
        size, mtime = _followed_size_mtime(fs._strip_protocol(info["name"]))
    return FileRef(
        uri=uri,
        size_bytes=int(size) if size is not None else None,
        etag=None if is_local_filesystem(fs) else _etag(info),
        mtime=mtime,
        file_id=file_id_for(uri),
    )


def _followed_size_mtime(path: str) -> tuple[int | None, datetime | None]:
    try:
        st = os.stat(path)   # follows symlinks; never opens (a FIFO would block an open)
    except OSError:          # dangling symlink, symlink loop, no permission on the way
        return None, None
    mtime = datetime.fromtimestamp(st.st_mtime, tz=UTC)
    return (st.st_size if stat.S_ISREG(st.st_mode) else None), mtime


def _missing_ref(uri: str) -> FileRef:
    return FileRef(uri=uri, size_bytes=None, etag=None, mtime=None, file_id=file_id_for(uri))


def _etag(info: dict[str, Any]) -> str | None:
    """ETag or version id, whatever the backend calls it (s3fs: ETag/VersionId, gcsfs: etag or
    generation, adlfs: etag)."""
    for key in ("ETag", "etag", "VersionId", "version_id", "generation"):
        value = info.get(key)
        if value:
            return str(value).strip('"')
    return None


def _mtime(info: dict[str, Any]) -> datetime | None:
    for key in ("LastModified", "last_modified", "mtime", "updated", "modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, tz=UTC)
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


# --- manifests -----------------------------------------------------------------------------


def _from_manifest(fs: fsspec.AbstractFileSystem, path: str, storage_options: dict) -> list[FileRef]:
    entries = _read_manifest(fs, path)
    base = _uri(fs, posixpath.dirname(path))
    uris = [_resolve(entry, base, is_local_filesystem(fs)) for entry in entries]
    logger.info("manifest %s: %d entries", path, len(uris))
    return _stat_all(uris, storage_options)


def _read_manifest(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    ext = extension(path)
    if ext == ".parquet":
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            # no pre-buffering: reads ahead on Arrow's I/O threads would outlive this call holding
            # Python buffers (see pipelines.output.tables.scan)
            table = pq.read_table(f, columns=["uri"], pre_buffer=False)
        values = table.column("uri").to_pylist()
    else:
        with fs.open(path, "rb") as f:
            # Bytes that are not UTF-8 stay bytes (surrogates): such entries are file names too.
            text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape").read()
        if ext == ".csv":
            reader = csv.DictReader(io.StringIO(text))
            if reader.fieldnames is None or "uri" not in reader.fieldnames:
                raise ValueError(f"manifest {path}: no 'uri' column (columns: {reader.fieldnames})")
            values = [row["uri"] for row in reader]
        else:
            values = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [v.strip() for v in values if v is not None and v.strip()]


def _resolve(entry: str, base: str, base_is_local: bool) -> str:
    """Absolute URIs and absolute local paths stay; relative ones join the manifest's dir."""
    if "://" in entry or entry.startswith("/"):
        if entry.startswith("file://"):
            return entry[len("file://"):]
        return entry
    if base_is_local:
        return posixpath.normpath(posixpath.join(base, entry))
    protocol, _, base_path = base.partition("://")
    return f"{protocol}://{posixpath.normpath(posixpath.join(base_path, entry))}"


def _stat_all(uris: Iterable[str], storage_options: dict) -> list[FileRef]:
    uris = list(dict.fromkeys(uris))
    with ThreadPoolExecutor(max_workers=_STAT_THREADS) as pool:
        return list(pool.map(lambda u: _stat(u, storage_options), uris))


def _stat(uri: str, storage_options: dict) -> FileRef:
    try:
        fs, path = url_to_fs(uri, **storage_options)
        info = _info(fs, path)
    except Exception as e:  # noqa: BLE001 - any failure: keep the entry, decode reports why
        logger.warning("manifest entry %s: cannot stat (%s: %s)", escape_uri(uri), type(e).__name__, e)
        return _missing_ref(escape_uri(uri))
    if info.get("type") == "directory":
        return _missing_ref(_uri(fs, path))
    return _ref(fs, info)


def _info(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    """``fs.info`` of ``path``, or of the name it escapes (an entry copied from a ``uri`` column)."""
    paths = candidate_paths(path)
    for p in paths[:-1]:
        try:
            return fs.info(p)
        except FileNotFoundError:
            continue
    return fs.info(paths[-1])
