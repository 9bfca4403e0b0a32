"""Where a store lives: a local folder or an object-store URL, behind one small interface.

Local paths use Zarr's ``LocalStore`` (atomic writes by rename); URLs
(``s3://``, ``gs://``, ``az://``, ``http(s)://``, ``file://``) go through fsspec.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr

from .errors import StoreError

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "http://", "https://", "memory://")


def is_remote(path: str) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


@dataclass
class Location:
    """A store's root: its URL, an fsspec filesystem, and a Zarr store over it."""

    url: str
    fs: Any
    root: str
    zarr_store: Any
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        return not is_remote(self.url)

    def join(self, key: str) -> str:
        """A path or URL for ``key`` under the root, usable by pyarrow/polars/duckdb."""
        if self.local:
            return str(Path(self.root) / key)
        return self.url.rstrip("/") + "/" + key

    def fs_path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}" if key else self.root

    def list_dirs(self, key: str) -> list[str]:
        """Names of the immediate sub-folders of ``key`` (empty if it does not exist)."""
        path = self.fs_path(key)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.fs_path(key)))

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self.fs_path(key)
        if self.local:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(p)
        else:
            self.fs.pipe_file(path, data)

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.fs_path(key))

    def open_output(self, key: str):
        path = self.fs_path(key)
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return self.fs.open(path, "wb")


def open_location(path: str, storage_options: dict[str, Any] | None = None, create: bool = False) -> Location:
    """Resolve a path or URL into a :class:`Location`; ``create`` makes a local folder if missing."""
    path = str(path)
    opts = dict(storage_options or {})
    if path.startswith("file://"):
        path = path[len("file://") :]
    if not is_remote(path):
        import fsspec

        p = Path(path).expanduser().absolute()
        if create:
            try:
                p.mkdir(parents=True, exist_ok=True)
                probe = p / f".write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise StoreError(f"cannot write to store {p}: {exc.strerror or exc}; choose a writable path") from None
        elif not p.exists():
            raise StoreError(f"store {p} does not exist: check the path, or run actstore extract to create it")
        return Location(str(p), fsspec.filesystem("file"), str(p), zarr.storage.LocalStore(str(p)), opts)
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **opts)
    if not getattr(fs, "async_impl", False):
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        afs = AsyncFileSystemWrapper(fs)
    else:
        afs = fs
    zstore = zarr.storage.FsspecStore(afs, path=root, read_only=False)
    return Location(path.rstrip("/"), fs, root.rstrip("/"), zstore, opts)
