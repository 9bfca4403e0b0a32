"""What a store may not do, enforced under the code that uses it: keys that leave the store, symbolic links inside a
local store, writes through a handle opened read-only, chunks that should exist and do not.

:class:`actstore.storage.location.Location` builds on these: every key it is given goes through :func:`check_key`,
its local Zarr store is a :class:`SafeLocalStore`, its read-only filesystems are :func:`ReadOnlyFileSystem` and its
readers' store is :func:`strict_reads`.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

import zarr

from actstore.errors import StoreError

PARQUET_BLOCK_SIZE = 1 << 20
"""Bytes per ranged read of a remote Parquet file: fetch row groups, not whole files."""
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def find_link(root: str, key: str) -> str | None:
    """The first prefix of ``key`` that is a symbolic link under the local folder ``root``, or None."""
    p = root
    parts = key.split("/")
    for i, part in enumerate(parts):
        p = os.path.join(p, part)
        try:
            mode = os.lstat(p).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(mode):
            return "/".join(parts[: i + 1])
    return None


def link_error(root: str, link: str) -> StoreError:
    return StoreError(
        f"{link!r} in store {root} is a symbolic link: actstore never follows links inside a store (one could point "
        "anywhere on this machine); replace it with the real file or folder (e.g. copy the store with cp -rL or rsync -L)"
    )


def refuse_links(root: str, key: str) -> None:
    """Raise :class:`StoreError` if any part of ``key`` under the local folder ``root`` is a symbolic link."""
    if key and (link := find_link(root, key)) is not None:
        raise link_error(root, link)


class MissingChunk(StoreError):  # noqa: N818 - an IntegrityError is made of it once the rows are known
    """A Zarr chunk that a reader needs is absent (a reader never sees it as zeros)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"chunk object {key} is missing")
        self.key = key


_META_NAMES = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key inside a store, else raise :class:`StoreError`.

    Refused: absolute keys (``/x``, ``C:x``), ``..`` or ``.`` parts, empty parts
    (``a//b``), backslashes and control characters — anything that could resolve
    outside the store's root when joined to it.
    """
    if not isinstance(key, str) or not key:
        raise StoreError(f"empty or non-text store key {key!r} refused")
    bad = (
        key.startswith(("/", "~"))
        or _WINDOWS_DRIVE.match(key) is not None
        or "\\" in key
        or any(ord(c) < 32 for c in key)
        or "://" in key
    )
    parts = key.split("/")
    if bad or any(p in ("", ".", "..") for p in parts):
        raise StoreError(
            f"unsafe store key {key!r} refused: keys must be relative paths inside the store "
            "(no '..', no leading '/', no backslashes); the store may be malicious or damaged"
        )
    return key


def _read_only_filesystem_class() -> type:
    import fsspec

    class _ReadOnlyFileSystem(fsspec.AbstractFileSystem):
        """Wraps an fsspec filesystem; reads pass through, every write raises PermissionError."""

        cachable = False

        def __init__(self, inner: Any, **kw: Any) -> None:
            super().__init__(**kw)
            self.inner = inner
            self.protocol = inner.protocol

        def _refuse(self, *args: Any, **kw: Any) -> Any:
            raise PermissionError("this store is opened read-only: writes are refused")

        pipe_file = put_file = rm_file = rm = mkdir = makedirs = mv = cp_file = touch = _refuse

        def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kw: Any) -> Any:
            if any(c in mode for c in "wax+"):
                self._refuse()
            kw.setdefault("cache_type", "readahead")
            return self.inner.open(path, mode, block_size=block_size or PARQUET_BLOCK_SIZE, **kw)

        def ls(self, path: str, detail: bool = True, **kw: Any) -> Any:
            return self.inner.ls(path, detail=detail, **kw)

        def info(self, path: str, **kw: Any) -> Any:
            return self.inner.info(path, **kw)

        def cat_file(
            self, path: str, start: int | None = None, end: int | None = None, **kw: Any
        ) -> Any:
            return self.inner.cat_file(path, start=start, end=end, **kw)

        def exists(self, path: str, **kw: Any) -> bool:
            return self.inner.exists(path, **kw)

        def find(self, path: str, *args: Any, **kw: Any) -> Any:
            return self.inner.find(path, *args, **kw)

        def cat(self, path: Any, *args: Any, **kw: Any) -> Any:
            return self.inner.cat(path, *args, **kw)

        def size(self, path: str) -> Any:
            return self.inner.size(path)

        def isdir(self, path: str) -> bool:
            return self.inner.isdir(path)

        def isfile(self, path: str) -> bool:
            return self.inner.isfile(path)

        def invalidate_cache(self, path: str | None = None) -> None:
            self.inner.invalidate_cache(path)

        def modified(self, path: str) -> Any:
            return self.inner.modified(path)

        def _strip_protocol(self, path: str) -> str:
            return self.inner._strip_protocol(path)

    return _ReadOnlyFileSystem


_RO_CLASS: type | None = None


def ReadOnlyFileSystem(inner: Any) -> Any:  # noqa: N802 - behaves like a class
    """A read-only view of the fsspec filesystem ``inner``."""
    global _RO_CLASS
    if _RO_CLASS is None:
        _RO_CLASS = _read_only_filesystem_class()
    return _RO_CLASS(inner)


class SafeLocalStore(zarr.storage.LocalStore):
    """Zarr's LocalStore that never follows a symbolic link inside the store (read, write, list or delete)."""

    def _guard(self, key: str) -> None:
        refuse_links(str(self.root), key.rstrip("/"))

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        self._guard(key)
        return await super().get(key, prototype, byte_range)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            self._guard(key)
        return await super().get_partial_values(prototype, key_ranges)

    async def _set(self, key: str, value: Any, exclusive: bool = False) -> None:
        self._guard(key)
        return await super()._set(key, value, exclusive=exclusive)

    async def delete(self, key: str) -> None:
        self._guard(key)
        return await super().delete(key)

    async def delete_dir(self, prefix: str) -> None:
        self._guard(prefix)
        return await super().delete_dir(prefix)

    async def exists(self, key: str) -> bool:
        self._guard(key)
        return await super().exists(key)

    async def list(self) -> Any:
        async for k in super().list():
            self._guard(k)
            yield k

    async def list_prefix(self, prefix: str) -> Any:
        self._guard(prefix)
        async for k in super().list_prefix(prefix):
            self._guard(k)
            yield k

    async def list_dir(self, prefix: str) -> Any:
        self._guard(prefix)
        async for k in super().list_dir(prefix):
            self._guard(f"{prefix.rstrip('/')}/{k}" if prefix else k)
            yield k


def _present(key: str, buf: Any) -> Any:
    """``buf``, unless it is None for a chunk key (metadata may legitimately be absent): then MissingChunk."""
    if buf is None and key.rsplit("/", 1)[-1] not in _META_NAMES:
        raise MissingChunk(key)
    return buf


def strict_reads(inner: Any) -> Any:
    """``inner`` wrapped so that reading an absent chunk raises :class:`MissingChunk` (metadata may be absent)."""
    from zarr.storage import WrapperStore

    class _StrictReads(WrapperStore):
        def _with_store(self, store: Any) -> Any:
            return type(self)(store)

        def with_read_only(
            self, read_only: bool = False
        ) -> Any:  # zarr < 3.1.6 asks before opening with mode="r"
            return type(self)(self._store.with_read_only(read_only))

        async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
            return _present(key, await self._store.get(key, prototype, byte_range))

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
            key_ranges = list(key_ranges)
            out = await self._store.get_partial_values(prototype, key_ranges)
            return [_present(key, buf) for (key, _), buf in zip(key_ranges, out, strict=True)]

    return _StrictReads(inner)
