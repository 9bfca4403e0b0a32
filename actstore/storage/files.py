"""Local output files (``--out FILE``, exported folders) and standard output, written so that a short write is an error.

A full disk must never leave a file that looks complete, nor an exit status of 0:

- :func:`write_fd` writes bytes to a file descriptor in bounded chunks, checking how many bytes each ``os.write``
  took and continuing after a short write; a write that takes nothing raises ``OSError(ENOSPC)``.
- :func:`write_file` writes ``PATH`` through a temporary sibling (``.PATH.<random>.part``), fsyncs it and renames it
  over ``PATH`` only when every byte is down: on any error the temporary file is removed and an existing ``PATH``
  is left as it was.
- :func:`write_stdout` sends bytes to standard output byte-exact (no ANSI stripping, no newline translation) through
  :func:`write_fd` when standard output is a real file descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

CHUNK_BYTES = 1 << 20
"""Bytes handed to one ``os.write``: a short write is noticed within this much data."""


def write_fd(fd: int, data: bytes | memoryview, chunk: int = CHUNK_BYTES) -> int:
    """Write every byte of ``data`` to ``fd``, chunk by chunk; OSError (ENOSPC when a write takes nothing)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.write(fd, view[done : done + chunk])
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n
    return done


def _real_fd(stream: IO) -> int | None:
    try:
        return stream.fileno()
    except (
        AttributeError,
        OSError,
        ValueError,
    ):  # io.UnsupportedOperation is an OSError and a ValueError
        return None


def write_stdout(data: bytes) -> None:
    """``data`` to standard output, byte-exact; OSError when the output cannot take all of it (a full disk)."""
    out = sys.stdout
    out.flush()
    fd = _real_fd(out)
    if fd is None:  # not a real file (click's test runner, a notebook): its binary buffer, flushed
        buf = getattr(out, "buffer", None)
        if buf is None:
            out.write(data.decode("utf-8", "surrogateescape"))
        else:
            buf.write(data)
            buf.flush()
        return
    write_fd(fd, data)


def is_terminal(stream: IO | None = None) -> bool:
    """Whether ``stream`` (standard output by default) is a terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


OS_ERROR = re.compile(r"os error ([0-9]+)")


def as_os_error(exc: Exception, path: str | Path) -> Exception:
    """``exc`` as the OSError its message reports (``... (os error 28)``: ENOSPC), else ``exc`` itself."""
    m = OS_ERROR.search(str(exc))
    if m is None:
        return exc
    code = int(m.group(1))
    return OSError(code, os.strerror(code), str(path))


def _part_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed over ``path`` when the block ends without an error,
    removed when it raises (``path`` itself untouched then)."""
    path = Path(path)
    tmp = _part_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the data reaches the disk before the name does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_file(path: str | Path, data: bytes | Callable[[Path], None]) -> int:
    """Write ``path`` whole or not at all: ``data`` as bytes, or a function that writes the file it is given (a
    library's own writer, e.g. Parquet); returns the bytes written. See the module docstring."""
    with replacing(path) as tmp:
        if callable(data):
            try:
                data(tmp)
            except OSError:
                raise
            except (
                Exception
            ) as exc:  # Rust writers (polars, safetensors) report the OS error in their message
                raise as_os_error(exc, path) from None
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                write_fd(fd, data)
            finally:
                os.close(fd)
        size = tmp.stat().st_size
    return size


@contextlib.contextmanager
def output_folder(path: str | Path) -> Iterator[Path]:
    """Create the output folder ``path`` (parents included) for the block; if the block raises and the folder was
    created here, it is removed again when nothing is left in it (a refused export leaves no empty folder)."""
    from actstore.errors import StoreError

    path = Path(path)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create output folder {path}: {exc.strerror or exc}; choose a writable --out"
        ) from None
    try:
        yield path
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty
        raise


def save_figure(fig: object, path: str | Path, **kw: object) -> int:
    """A matplotlib figure saved to ``path`` whole or not at all (its format from ``path``'s suffix)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return write_file(path, lambda tmp: fig.savefig(tmp, format=fmt, **kw))  # type: ignore[attr-defined]
