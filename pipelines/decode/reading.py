"""Opening an input for PyAV: what a local path is (found by ``stat``, never by opening a FIFO
or device), local files opened non-blocking, objects opened with the listed size and a cached
tail, size limits, and byte-level looks at the start of a file."""

from __future__ import annotations

import errno
import io
import os
import stat

from fsspec.core import url_to_fs
from mutagen.mp3 import skip_id3  # seeks past ID3v2 tags (several, as some taggers stack them)

from pipelines.decode.common import DecodeOptions, Reject
from pipelines.sources import candidate_paths, is_local_filesystem

AVIO_BUFFER_BYTES = 64 * 2**10     # PyAV's read size from the Python file object
TAIL_BYTES = 128 * 2**10           # reads in the last TAIL_BYTES of a remote object: own request


def local_file(path: str) -> tuple[str, os.stat_result]:
    """``(path to open, its stat)`` for a local regular file, found by ``stat`` alone (following
    symlinks; a FIFO or device is never opened). Anything else is a :class:`Reject`:
    a dangling symlink (not_found), a symlink loop, a directory (not_a_file), a FIFO, socket or
    device (not_a_regular_file). A name that was percent-encoded in the listing is unescaped."""
    candidates = candidate_paths(path)
    for i, p in enumerate(candidates):
        try:
            st = os.stat(p)
        except ValueError:      # a NUL byte: no POSIX path holds one
            raise Reject("not_found", "the path contains a NUL byte") from None
        except FileNotFoundError:
            if os.path.islink(p):
                raise Reject("not_found", f"dangling symlink: it points to {os.readlink(p)!r}, "
                                           f"which does not exist") from None
            if i + 1 < len(candidates):
                continue
            raise
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise Reject("symlink_loop", "too many levels of symbolic links (a symlink loop)") from None
            raise
        if stat.S_ISDIR(st.st_mode):
            raise Reject("not_a_file", "a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise Reject("not_a_regular_file", f"a {kind_of(st.st_mode)}, not a regular file: not read "
                                                f"(reading it could block or never end)")
        return p, st
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def is_dir(fs, path: str | None) -> bool:
    try:
        return bool(path) and fs.isdir(path)
    except Exception:  # noqa: BLE001 - only a better label is at stake
        return False


def open_input(uri: str, options: DecodeOptions, storage_options: dict, size: int | None = None):
    """Open ``uri`` for PyAV: a seekable binary file object (a context manager).

    Local files are opened non-blocking and checked to be regular files on the open descriptor,
    so a file replaced by a FIFO after the check cannot hang the read. On object storage the
    size from the listing is handed to the file, which saves the HEAD request an open would make
    (a missing object then shows on the first read, as not_found).
    """
    fs, path = url_to_fs(uri, **storage_options)
    if is_local_filesystem(fs):
        return open_local(local_file(path)[0])
    if size:
        try:
            f = fs.open(path, "rb", block_size=options.block_size, size=size)
        except TypeError:   # a filesystem whose files take no size
            f = fs.open(path, "rb", block_size=options.block_size)
    else:
        f = fs.open(path, "rb", block_size=options.block_size)
    size = getattr(f, "size", None)
    if hasattr(f, "_fetch_range") and size and size > options.block_size + 2 * TAIL_BYTES:
        return TailCachedReader(f, size)
    return f


def open_local(path: str) -> io.FileIO:
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Reject("not_a_regular_file", f"a {kind_of(st.st_mode)}, not a regular file: not read")
        return LocalFile(fd, st.st_size)
    except BaseException:
        os.close(fd)
        raise


class LocalFile(io.FileIO):
    """An open local file that knows its size (PyAV reads it in AVIO_BUFFER_BYTES blocks, so it
    needs no buffer of its own)."""

    def __init__(self, fd: int, size: int):
        super().__init__(fd, "rb", closefd=True)
        self.size = size


def size_of(f) -> int | None:
    """The object's size in bytes, or None where the store cannot say (e.g. some HTTP servers)."""
    size = getattr(f, "size", None)
    if size is None:
        try:
            size = f.seek(0, io.SEEK_END)
            f.seek(0)
        except (OSError, ValueError):
            return None
    return size


def has_mp3_length_header(f) -> bool:
    """Whether the file starts (after any ID3v2 tag) with an MPEG audio frame carrying a
    Xing/Info/VBRI header, i.e. a frame count. Reads a few KB and rewinds."""
    f.seek(0)
    skip_id3(f)
    data = f.read(4096)
    f.seek(0)
    for i in range(len(data) - 1):
        if data[i] == 0xFF and data[i + 1] & 0xE0 == 0xE0:   # the first frame sync
            frame = data[i:i + 200]
            return any(tag in frame for tag in (b"Xing", b"Info", b"VBRI"))
    return False


def check_size(size: int | None, options: DecodeOptions) -> None:
    if size is not None and options.max_bytes is not None and size > options.max_bytes:
        raise Reject("too_large", f"{size} bytes > max_bytes={options.max_bytes}")


class OffsetReader(io.RawIOBase):
    """The bytes of ``f`` from ``offset`` on, as a file of their own (a chained Ogg link)."""

    def __init__(self, f, offset: int):
        super().__init__()
        self._f, self.offset = f, offset
        self._f.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell() - self.offset

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            return self._f.seek(self.offset + max(0, pos)) - self.offset
        return self._f.seek(pos, whence) - self.offset

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:   # the underlying file belongs to the caller
        super().close()




class TailCachedReader(io.RawIOBase):
    """A remote fsspec file, for PyAV: reads that fall in the last TAIL_BYTES of the object come
    from one ranged request made on first use, so a demuxer's look at the end (mp3's ID3v1/APE
    tags, mp4's trailing atoms) does not evict the read-ahead block it is streaming from, which
    would otherwise be fetched again."""

    def __init__(self, f, size: int):
        super().__init__()
        self._f = f
        self.size = size
        self._pos = 0
        self._tail_start = size - TAIL_BYTES
        self._tail: bytes | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self._pos
        if self._pos >= self._tail_start:
            if self._tail is None:
                self._tail = self._f._fetch_range(self._tail_start, self.size)
            i = self._pos - self._tail_start
            data = self._tail[i:i + n]
        else:
            if self._f.tell() != self._pos:
                self._f.seek(self._pos)
            data = self._f.read(min(n, self._tail_start - self._pos))
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()
