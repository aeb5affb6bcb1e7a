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

Scope. :func:`list_archive` also says which URIs the inputs cover (:class:`Scope`): the region in
which a file the listing no longer returns has left the archive (its rows are removed from the
tables, ``pipelines.output.mirror``). A directory or prefix covers every URI under it (direct
children only with ``recursive=False``) and a glob what it matches, both with the listing's
extension filter (a file the filter leaves out is not looked at, so it is not gone); a single
file covers itself; a manifest covers nothing: it names files, not a region, and a file it no
longer names may still be in the archive. A folder the listing could not read (no permission)
is left out of the scope: nothing under it counts as gone.

Content keys. A file's content key (:attr:`FileRef.content_key`) identifies its bytes: equal
keys of equal kind (and equal sizes) mean equal content, so a moved or copied file can reuse
the results of the same content. Only real content hashes qualify, never names, sizes, mtimes or
version ids (:func:`content_key`):

* S3 (and S3-compatible stores): ``"s3-etag:<ETag>"`` when the ETag has the form S3 gives a
  content hash: 32 hex digits (single-part upload: the MD5 of the bytes) or ``<32 hex>-<parts>``
  (multipart: the MD5 of the parts' MD5s, so equal ETags mean the same bytes in the same part
  layout; the same bytes uploaded with another layout get another ETag and are processed again,
  which costs GPU time and never gives a wrong answer). Objects encrypted with SSE-KMS or SSE-C
  have 32-hex ETags that are not the MD5 of their bytes; they are unique per upload, so such an
  object is never matched to another (no reuse, and no wrong reuse either). ``VersionId`` never
  becomes a key.
* GCS: ``"gcs-md5:<base64>"`` from the object's ``md5Hash`` (composite objects have none).
* Local files: ``"sha256:<hex>"`` of the bytes, computed by :class:`ContentHasher` for the files a
  run processes (never for unchanged files), only while the file is still the version listed.
* Anything else (other stores, a manifest entry that cannot be stat'ed): None; such a file is
  processed as before.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import os
import posixpath
import re
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.utils import glob_translate

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
    content_key: str | None = None   # what the bytes are (see the module docstring); None: unknown

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


# --- scope ---------------------------------------------------------------------------------

PREFIX, FOLDER, GLOB, FILE, MANIFEST = "prefix", "folder", "glob", "file", "manifest"


@dataclass(frozen=True)
class Region:
    """The part of a run's scope one input covers (see the module docstring)."""

    kind: str    # PREFIX (everything under uri) | FOLDER (uri's direct children) | GLOB | FILE | MANIFEST
    uri: str     # as the listing writes URIs: the directory, the glob, the file, the manifest

    @functools.cached_property
    def _glob(self) -> tuple[str, re.Pattern[str]]:
        protocol, sep, path = self.uri.partition("://")
        return (protocol + sep if sep else ""), re.compile(glob_translate(path if sep else self.uri))

    def covers(self, uri: str) -> bool:
        """Whether ``uri`` lies in this region (before the extension filter)."""
        if self.kind == FILE:
            return uri == self.uri
        if self.kind in (PREFIX, FOLDER):
            base = self.uri.rstrip("/") + "/"
            return uri.startswith(base) and (self.kind == PREFIX or "/" not in uri[len(base):])
        if self.kind == GLOB:
            protocol, pattern = self._glob
            return uri.startswith(protocol) and pattern.fullmatch(uri[len(protocol):]) is not None
        return False   # MANIFEST: names files, covers no region


@dataclass(frozen=True)
class Scope:
    """The URIs a run's inputs cover: where a file the listing no longer returns is gone."""

    regions: tuple[Region, ...]
    extensions: frozenset[str] | None     # the listing's filter for prefixes and globs (None: all)
    unlisted: tuple[str, ...] = ()        # folders the listing could not read: out of scope

    def contains(self, uri: str) -> bool:
        if any(uri.startswith(u.rstrip("/") + "/") for u in self.unlisted):
            return False
        for r in self.regions:
            if r.kind != FILE and self.extensions is not None and extension(uri) not in self.extensions:
                continue
            if r.covers(uri):
                return True
        return False

    def describe(self) -> list[str]:
        """One line per input (for run records and messages)."""
        lines = [f"{r.kind} {r.uri}" + (" (names files: removes nothing)" if r.kind == MANIFEST else "")
                 for r in self.regions]
        return lines + [f"unlisted {u} (not readable: out of scope)" for u in self.unlisted]


@dataclass(frozen=True)
class Listing:
    """What :func:`list_archive` found: the files (sorted by URI, deduplicated) and the scope."""

    refs: list[FileRef]
    scope: Scope


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
    return list_archive(source, storage_options, extensions=extensions, recursive=recursive).refs


def list_archive(
    source: str | Sequence[str],
    storage_options: dict | None = None,
    *,
    extensions: Collection[str] | None = None,
    recursive: bool = True,
) -> Listing:
    """:func:`list_inputs`, with the scope the inputs cover (:class:`Scope`)."""
    sources = [source] if isinstance(source, str) else list(source)
    storage_options = dict(storage_options or {})
    keep = _normalise_extensions(extensions)
    refs: dict[str, FileRef] = {}
    regions: list[Region] = []
    unlisted: list[str] = []
    for src in sources:
        found, region = _list_one(src, storage_options, keep, recursive, unlisted)
        regions.append(region)
        for ref in found:
            refs[ref.uri] = ref
    scope = Scope(tuple(regions), keep, tuple(dict.fromkeys(unlisted)))
    return Listing([refs[uri] for uri in sorted(refs)], scope)


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


def _list_one(src: str, storage_options: dict, keep: frozenset[str] | None, recursive: bool,
              unlisted: list[str]) -> tuple[list[FileRef], Region]:
    fs, path = url_to_fs(src, **storage_options)
    if _has_magic(path) and not fs.exists(path):  # a literal "[" in a name is not a glob
        infos = fs.glob(path, detail=True)
        files = [i for i in infos.values() if i.get("type") == "file"]
        refs = [_ref(fs, i) for i in files if keep is None or extension(i["name"]) in keep]
        return refs, Region(GLOB, _uri(fs, path))
    info = fs.info(path)  # FileNotFoundError propagates: the source itself is wrong
    if info.get("type") == "directory":
        region = Region(PREFIX if recursive else FOLDER, _uri(fs, path))
        if recursive and is_local_filesystem(fs):
            def on_error(error: Exception, folder: str) -> None:
                _unlisted(error)
                unlisted.append(_uri(fs, folder))

            infos = _find_local(fs, fs._strip_protocol(path), on_error)
        elif recursive:
            infos = fs.find(path, detail=True, withdirs=False).values()
        else:
            infos = [i for i in fs.ls(path, detail=True) if i.get("type") == "file"]
        return [_ref(fs, i) for i in infos if keep is None or extension(i["name"]) in keep], region
    if extension(path) in MANIFEST_EXTENSIONS:
        if is_local_filesystem(fs) and info.get("type") != "file" and _followed_size_mtime(path)[0] is None:
            raise ValueError(f"manifest {src}: not a regular file (a FIFO or device is never read)")
        return _from_manifest(fs, path, storage_options), Region(MANIFEST, _uri(fs, path))
    ref = _ref(fs, info)
    return [ref], Region(FILE, ref.uri)


def _find_local(fs: fsspec.AbstractFileSystem, root: str,
                on_error: Callable[[Exception, str], None]) -> list[dict[str, Any]]:
    """``fs.find(root, detail=True, withdirs=False)`` of a local folder (the same ``ls`` calls and
    entries, sorted by name), calling ``on_error(error, folder)`` for every folder that cannot be
    listed. (fsspec's ``walk`` passes its ``on_error`` to the top folder only: a subfolder without
    read permission would be left out in silence, and its files taken for removed.)"""
    out: dict[str, dict[str, Any]] = {}
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            listing = fs.ls(folder, detail=True)
        except OSError as e:
            on_error(e, folder)
            continue
        for info in listing:
            name = info["name"].rstrip("/")
            if info["type"] == "directory" and name != folder:
                folders.append(name)
            else:
                out[info["name"]] = info
    return [out[name] for name in sorted(out)]


def _unlisted(error: Exception) -> None:
    """A folder of the input that cannot be listed (no permission, removed meanwhile): its files
    are missing from the run, which the log says (and nothing under it is removed from the tables)."""
    logger.warning("input folder not listed, its files are left out (and kept in the tables): %s: %s",
                   type(error).__name__, escape_uri(str(error)))


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
        content_key=content_key(fs, info),
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


# An S3 ETag that is a content hash: the MD5 of the bytes (single-part upload), or the MD5 of the
# parts' MD5s and the part count (multipart; S3 allows at most 10,000 parts).
_S3_CONTENT_ETAG = re.compile(r"[0-9a-f]{32}(-[1-9][0-9]{0,4})?")
_S3_PROTOCOLS = {"s3", "s3a"}
_GCS_PROTOCOLS = {"gs", "gcs"}


def content_key(fs: fsspec.AbstractFileSystem, info: Mapping[str, Any]) -> str | None:
    """The content key an object store's metadata gives (see the module docstring), or None.

    Read from the store's own content-hash fields only: ``ETag`` on S3 (when it has the form of
    one), ``md5Hash`` on GCS. Never a version id or generation, which :func:`_etag` falls back to
    (they name an upload, not its bytes); local files get theirs from :class:`ContentHasher`."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & _S3_PROTOCOLS:
        etag = str(info.get("ETag") or info.get("etag") or "").strip().strip('"').lower()
        return f"s3-etag:{etag}" if _S3_CONTENT_ETAG.fullmatch(etag) else None
    if protocols & _GCS_PROTOCOLS:
        md5 = info.get("md5Hash")
        return f"gcs-md5:{md5}" if isinstance(md5, str) and md5 else None
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


# --- content keys of local files ------------------------------------------------------------

HASH_THREADS = 4            # hashing threads (hashlib releases the GIL while it hashes a chunk)
HASH_CHUNK = 1 << 20        # bytes read per step


def is_local_uri(uri: str) -> bool:
    """Whether a listing's URI is a local path (the listing writes local files without a scheme)."""
    return "://" not in uri


def sha256_key(ref: FileRef, stop: threading.Event | None = None) -> str | None:
    """``"sha256:<hex>"`` of a local file's bytes, when it is still the version ``ref`` lists.

    None when it is not a regular file, is gone, cannot be read, or its size or mtime differ from
    the listing's before or after the read (it changed meanwhile: processed without a key), or
    when ``stop`` is set (the run is ending). The loop is ``hashlib.file_digest``'s, with a stop
    check per chunk. Opened with ``O_NONBLOCK``: a FIFO swapped in for the file never blocks."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = None
    for path in candidate_paths(ref.uri):
        try:
            fd = os.open(path, flags)
            break
        except FileNotFoundError:
            continue
        except OSError:
            return None
    if fd is None:
        return None
    with os.fdopen(fd, "rb", buffering=0) as f:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode) or not _is_listed_version(before, ref):
            return None
        digest = hashlib.sha256()
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
            if stop is not None and stop.is_set():
                return None
        after = os.fstat(fd)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        return None
    return "sha256:" + digest.hexdigest()


def _is_listed_version(st: os.stat_result, ref: FileRef) -> bool:
    return st.st_size == ref.size_bytes and datetime.fromtimestamp(st.st_mtime, tz=UTC) == ref.mtime


class ContentHasher:
    """Content keys of local files on a thread pool, computed only for the files asked for.

    :meth:`submit` starts hashing (refs that already have a key, remote ones and those without a
    size are left as they are); :meth:`keyed` returns a ref with its key, waiting for its hash.
    The driver asks first for the files that may be a copy of an indexed one (to decide reuse
    before processing), and hands the others to the pool to hash while Ray processes them: their
    keys are needed only when they are committed. :meth:`stop` makes the remaining work end at
    its next chunk (those files get no key). Files over ``max_bytes`` are not hashed: the run does
    not decode them (``too_large``), so their rows are never a source."""

    def __init__(self, threads: int = HASH_THREADS, *, max_bytes: int | None = None):
        self.threads = threads
        self.max_bytes = max_bytes
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self._futures: dict[str, Future[str | None]] = {}
        self._lock = threading.Lock()
        self.files = 0          # files hashed (a key came out)
        self.bytes = 0          # their bytes
        self.seconds = 0.0      # thread time spent hashing

    def wants(self, ref: FileRef) -> bool:
        return (ref.content_key is None and is_local_uri(ref.uri) and bool(ref.size_bytes)
                and (self.max_bytes is None or (ref.size_bytes or 0) <= self.max_bytes))

    def submit(self, refs: Iterable[FileRef]) -> None:
        for ref in refs:
            if self._stop.is_set():
                return
            if not self.wants(ref) or ref.file_id in self._futures:
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="content-hash")
            self._futures[ref.file_id] = self._pool.submit(self._hash, ref)

    def _hash(self, ref: FileRef) -> str | None:
        t0 = time.monotonic()
        try:
            key = sha256_key(ref, self._stop)
        except OSError as e:
            logger.info("no content key for %s: %s: %s", ref.uri, type(e).__name__, e)
            key = None
        with self._lock:
            self.seconds += time.monotonic() - t0
            if key is not None:
                self.files += 1
                self.bytes += ref.size_bytes or 0
        return key

    def keyed(self, ref: FileRef) -> FileRef:
        """``ref`` with its content key (submitted if it was not); ``ref`` itself when there is none."""
        if not self.wants(ref):
            return ref
        self.submit([ref])
        future = self._futures.get(ref.file_id)
        if future is None or future.cancelled():   # stopped before it was hashed
            return ref
        key = future.result()
        return replace(ref, content_key=key) if key is not None else ref

    def stop(self) -> None:
        """End the hashing still to do: running hashes end at their next chunk, queued ones never
        start; their files get no key."""
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class KeyedRefs(Mapping[str, FileRef]):
    """file_id -> FileRef, each with its content key once it is asked for (waiting for its hash):
    what the commit buffer reads when it builds a commit's rows."""

    def __init__(self, refs: Mapping[str, FileRef], hasher: ContentHasher):
        self._refs = dict(refs)
        self._hasher = hasher
        self._keyed: dict[str, FileRef] = {}

    def __getitem__(self, file_id: str) -> FileRef:
        if file_id not in self._keyed:
            self._keyed[file_id] = self._hasher.keyed(self._refs[file_id])
        return self._keyed[file_id]

    def __contains__(self, file_id: object) -> bool:
        return file_id in self._refs

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)
