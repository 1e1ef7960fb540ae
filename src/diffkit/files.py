"""Files that a folder from someone else names: confined to it, regular, and bounded.

A saved pipeline folder names files by relative path (``text.vocab_path``). Read through
this module such a name

- resolves inside the folder: no absolute path, no ``..``, no symbolic link that leaves
  it ([`confined`][diffkit.files.confined]);
- is a regular file: a directory, FIFO, socket or device (``/dev/stdin``, ``/dev/zero``)
  is refused before anything is read, and the file is opened with ``O_NONBLOCK`` and
  checked again on the open descriptor, so swapping in a FIFO after the check cannot
  hang the reader ([`open_regular`][diffkit.files.open_regular]);
- is read up to a limit, decompressed ones included: a gzip file is inflated in bounded
  chunks and refused as soon as it passes the limit
  ([`read_gzip`][diffkit.files.read_gzip]; [`MAX_READ_BYTES`][diffkit.files.MAX_READ_BYTES]
  by default).

Every refusal is an [`UnreadableFileError`][diffkit.files.UnreadableFileError]: one line
that names the file. It is both an ``OSError`` and a ``ValueError``.
"""

import gzip
import os
import stat
import zlib
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import BinaryIO

__all__ = [
    "MAX_READ_BYTES",
    "UnreadableFileError",
    "confined",
    "open_regular",
    "read_bytes",
    "read_gzip",
]

MAX_READ_BYTES = 64 * 2**20
"""The most bytes read from one named file, after decompression (64 MiB).

CLIP's merges file is 1.4 MB compressed and under 2 MB inflated.
"""

_CHUNK = 2**20


class UnreadableFileError(OSError, ValueError):
    """A named file is outside its folder, not a regular file, damaged or too large."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def confined(folder: str | os.PathLike[str], name: str | os.PathLike[str]) -> Path:
    """The regular file ``folder / name``, refused unless it stays inside ``folder``.

    ``name`` must be relative, without ``..`` parts, and resolve (symbolic links
    followed) to a regular file inside ``folder`` (itself resolved). Raises
    ``UnreadableFileError`` naming ``name`` otherwise.
    """
    text = os.fspath(name)
    parts: list[PurePath] = [PurePosixPath(text), PureWindowsPath(text)]
    if not text or any(p.is_absolute() or p.anchor for p in parts):
        raise UnreadableFileError(
            f"{text!r} must be a path relative to the folder {os.fspath(folder)}"
        )
    if any(".." in p.parts for p in parts):
        raise UnreadableFileError(f"{text!r} must not contain '..' (it would leave the folder)")
    root = Path(folder).resolve()
    try:
        target = (root / text).resolve(strict=True)
    except FileNotFoundError:
        raise UnreadableFileError(f"{text!r}: no such file in {root}") from None
    except (OSError, RuntimeError) as err:  # a symlink loop is a RuntimeError before 3.13
        raise UnreadableFileError(f"{text!r} cannot be resolved in {root}: {err}") from None
    if not target.is_relative_to(root):
        raise UnreadableFileError(f"{text!r} leaves the folder {root} (a symbolic link?)")
    mode = target.stat().st_mode
    if not stat.S_ISREG(mode):
        raise UnreadableFileError(f"{text!r} in {root} is {_kind(mode)}, not a regular file")
    return target


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file; never blocks on a FIFO.

    The path is checked with ``os.stat`` first, then opened with ``O_NONBLOCK`` and
    checked again on the descriptor (``fstat``), so a file swapped in between is caught.
    """
    name = os.fspath(path)
    try:
        mode = os.stat(name).st_mode
        if not stat.S_ISREG(mode):
            raise UnreadableFileError(f"{name} is {_kind(mode)}, not a regular file")
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except UnreadableFileError:
        raise
    except OSError as err:
        raise UnreadableFileError(f"cannot read {name}: {err.strerror or err}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnreadableFileError(f"{name} is {_kind(mode)}, not a regular file")
    return os.fdopen(fd, "rb")


def _too_large(name: str, limit: int, what: str) -> UnreadableFileError:
    return UnreadableFileError(
        f"{name} is larger than {limit:,} bytes{what} (diffkit.files.MAX_READ_BYTES)"
    )


def read_bytes(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path``, refused past ``limit`` (``MAX_READ_BYTES``)."""
    limit = MAX_READ_BYTES if limit is None else limit
    name = os.fspath(path)
    with open_regular(path) as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as err:
            raise UnreadableFileError(f"cannot read {name}: {err.strerror or err}") from None
    if len(data) > limit:
        raise _too_large(name, limit, "")
    return data


def read_gzip(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The inflated bytes of the gzip file ``path``, read in chunks and refused past ``limit``.

    A file that is not gzip, is truncated or fails its CRC raises ``UnreadableFileError``.
    """
    limit = MAX_READ_BYTES if limit is None else limit
    name = os.fspath(path)
    chunks: list[bytes] = []
    size = 0
    with open_regular(path) as raw, gzip.GzipFile(fileobj=raw, mode="rb") as handle:
        try:
            while chunk := handle.read(min(_CHUNK, limit + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise _too_large(name, limit, " inflated")
        except UnreadableFileError:
            raise
        except gzip.BadGzipFile:
            raise UnreadableFileError(f"{name} is not a gzip file") from None
        except EOFError:
            raise UnreadableFileError(f"{name} is a truncated gzip file") from None
        except (OSError, zlib.error) as err:
            raise UnreadableFileError(f"{name} is a damaged gzip file: {err}") from None
    return b"".join(chunks)
