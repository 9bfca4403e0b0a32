"""Where a store lives: a local folder or an object-store URL, behind one small interface.

Local paths (and ``file://`` URLs) use Zarr's ``LocalStore`` (atomic writes by
rename); URLs (``s3://``, ``gs://``, ``az://``, ``http(s)://``) go through
fsspec, with credentials and endpoints from each backend's usual environment
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``AZURE_STORAGE_CONNECTION_STRING``, ...) plus ``storage_options``.

Safety rules enforced here:

* every key is checked by :func:`check_key`: no absolute keys, no ``..``, no
  backslashes or empty parts, so a key read from someone else's store can never
  name a file outside the store's root;
* a location is read-only unless opened with ``writable`` (or ``create``), local
  folders included: its Zarr store refuses writes, :meth:`Location.write_bytes`,
  :meth:`Location.delete` and :meth:`Location.rmtree` raise, and :attr:`Location.fs`
  is a filesystem that cannot write — so no module can write to a store the
  command did not open for writing. ``http(s)://`` stores are always read-only;
  :func:`write_access` says when a writing command may open a store writable;
* inside a local store no symbolic link is ever followed, on read, list, copy or
  delete (:func:`refuse_links`): a store that arrives as a folder (tarball, rsync,
  shared disk) cannot make actstore read, upload or delete a file outside itself;
* readers get :attr:`Location.reader_store`, on which a chunk that should exist but
  does not raises (:class:`MissingChunk`), instead of reading as zeros;
* :meth:`Location.read_only_fs` hands DuckDB a filesystem that cannot write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr

from actstore.errors import ConfigError, StoreError
from actstore.storage.guards import (
    PARQUET_BLOCK_SIZE,
    ReadOnlyFileSystem,
    SafeLocalStore,
    check_key,
    link_error,
    refuse_links,
    strict_reads,
)
from actstore.storage.urls import READ_ONLY_SCHEMES, is_remote

CREATE_RETRIES = 5
"""Tries of :meth:`Location.create_exclusive` when its folder vanishes between making it and writing into it: a
released lock removes its empty folders (``locks/`` too), and another process may do so at that very moment."""
STRICT_READS = True
"""Readers raise on an absent chunk (set False only to measure what the check costs: absent chunks then read as 0)."""

# A store deliberately holds objects Zarr does not know (Parquet tables, manifest.json, locks/): Zarr's
# member listing warns about each one; that warning says nothing useful to an actstore user.
warnings.filterwarnings(
    "ignore", message=r"Object at .* is not recognized as a component of a Zarr hierarchy"
)
# Every chunk is written, even one that holds only the fill value: an absent chunk then always means damage,
# and readers raise on it (MissingChunk) instead of reading zeros.
zarr.config.set({"array.write_empty_chunks": True})


PARTIAL = re.compile(r"(\.tmp[0-9]+|\.partial)$")
"""Names of local writes in progress: :meth:`Location.write_bytes`'s and Zarr's LocalStore's temp files."""


@dataclass
class Location:
    """A store's root: its URL, an fsspec filesystem, and a Zarr store over it."""

    url: str
    """The path or URL the store was opened with (``file://`` resolved to a path)."""
    fs: Any
    """fsspec filesystem of the root."""
    root: str
    """The root as a path of ``fs`` (no scheme)."""
    zarr_store: Any
    """Zarr v3 store over the root (read-only when ``read_only``)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Options the filesystem was made with."""
    read_only: bool = False
    """Writes refused (opened without ``writable``, or any http(s) URL)."""
    _reader: Any = None

    @property
    def local(self) -> bool:
        return not is_remote(self.url)

    @property
    def protocol(self) -> str:
        return "file" if self.local else self.url.split("://", 1)[0]

    @property
    def reader_store(self) -> Any:
        """The Zarr store for readers: a chunk that is absent raises :class:`MissingChunk` (never reads as zeros)."""
        if not STRICT_READS:
            return self.zarr_store
        if self._reader is None:
            self._reader = strict_reads(self.zarr_store)
        return self._reader

    def path_of(self, key: str) -> str:
        """The path or URL of ``key`` for naming it (in SQL text, say), not for opening: links are checked by
        :meth:`join`, which whoever opens the file calls (``query.connect`` does for every file DuckDB may read)."""
        check_key(key)
        return os.path.join(self.root, key) if self.local else self.url.rstrip("/") + "/" + key

    def join(self, key: str) -> str:
        """A path or URL for ``key`` under the root, usable by pyarrow/polars/duckdb (links refused)."""
        check_key(key)
        if self.local:
            refuse_links(self.root, key)
            return str(Path(self.root) / key)
        return self.url.rstrip("/") + "/" + key

    def fs_path(self, key: str) -> str:
        if not key:
            return self.root
        check_key(key)
        if self.local:
            refuse_links(self.root, key)
        return f"{self.root.rstrip('/')}/{key}"

    def remove_partial_writes(self, key: str) -> int:
        """Delete the temp files of writes a killed writer left under ``key`` (:data:`PARTIAL`; local folders: object
        stores write whole objects, so they have none); returns how many. Their chunks are rewritten by the resumed
        writer."""
        if not self.local or self.read_only:
            return 0
        n = 0
        for tmp in Path(self.fs_path(key)).rglob("*"):
            if PARTIAL.search(tmp.name) and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
                n += 1
        return n

    def key_of(self, fs_path: str) -> str:
        """The store key of a path of ``fs`` under the root (inverse of :meth:`fs_path`)."""
        root = self.root.rstrip("/") + "/"
        p = fs_path.replace(os.sep, "/") if self.local else fs_path
        if not p.startswith(root):
            raise StoreError(f"{fs_path!r} is not under store root {self.root!r}")
        return p[len(root) :]

    def _refresh(self, path: str) -> None:
        try:
            self.fs.invalidate_cache(path)
        except Exception:  # not every filesystem caches listings
            pass

    def list_dirs(self, key: str) -> list[str]:
        """Names of the immediate sub-folders of ``key`` (empty if it does not exist); a link among them, or a name
        that is not one safe key part (``..`` listed by an object store), raises StoreError."""
        path = self.fs_path(key)
        if self.local:
            try:
                entries = list(os.scandir(path))
            except (FileNotFoundError, NotADirectoryError):
                return []
            for e in entries:
                if e.is_symlink():
                    raise link_error(self.root, f"{key}/{e.name}" if key else e.name)
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        self._refresh(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = sorted(
            e["name"].rstrip("/").rsplit("/", 1)[-1]
            for e in entries
            if e.get("type") == "directory"
        )
        for name in names:  # an object store may list '..' or '' from a key such as models/../x: refuse, never follow
            check_key(f"{key}/{name}" if key else name)
        return names

    def walk(self, key: str = "") -> dict[str, int]:
        """Every file under ``key`` as ``{store key: size in bytes}``, sorted by key."""
        path = self.fs_path(key)
        if self.local:
            return self._walk_local(key, path)
        self._refresh(path)
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for name, info in found.items():
            if info.get("type", "file") == "directory":
                continue
            out[self.key_of(name)] = int(info.get("size") or 0)
        return dict(sorted(out.items()))

    def _walk_local(self, key: str, path: str) -> dict[str, int]:
        out: dict[str, int] = {}
        if os.path.isfile(path) and not os.path.islink(path):
            return {key: os.lstat(path).st_size}
        stack = [(key, path)]
        while stack:
            k, p = stack.pop()
            try:
                entries = list(os.scandir(p))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for e in entries:
                ek = f"{k}/{e.name}" if k else e.name
                if e.is_symlink():
                    raise link_error(self.root, ek)
                if e.is_dir(follow_symlinks=False):
                    stack.append((ek, e.path))
                elif e.is_file(follow_symlinks=False):
                    try:
                        out[ek] = e.stat(follow_symlinks=False).st_size
                    # removed since the listing (another writer's temporary file): not there
                    except FileNotFoundError:
                        continue
        return dict(sorted(out.items()))

    def exists(self, key: str) -> bool:
        path = self.fs_path(key)
        self._refresh(path)
        return bool(self.fs.exists(path))

    def size(self, key: str) -> int:
        return int(self.fs.size(self.fs_path(key)))

    def _check_writable(self, key: str) -> None:
        if self.read_only:
            raise StoreError(
                f"store {self.url} was opened read-only, so {key} cannot be written: "
                "pass --writable (open_store(url, writable=True)) to write to a shared store"
            )

    def write_bytes(self, key: str, data: bytes | list[Any]) -> None:
        """Write ``key`` whole (a temp file renamed into place, or one PUT): ``data``, or the concatenation of a list
        of buffers (bytes, contiguous numpy arrays), written one after the other with no copy to join them locally."""
        self._check_writable(key)
        path = self.fs_path(key)
        if self.local:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + f".tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                for part in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
                    f.write(part)
            tmp.replace(p)
        else:
            self.fs.pipe_file(path, data if isinstance(data, bytes) else b"".join(data))

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist, whole or not at all; False if it exists.

        Local: the bytes go to a temporary sibling first, which is then hard-linked to ``key`` (the link fails if
        ``key`` exists), so a crash or a full disk can never leave ``key`` empty or half-written; where links are
        not supported, ``O_CREAT | O_EXCL``. S3: a conditional PUT (``If-None-Match: *``). Other fsspec backends:
        their ``mode="create"`` (exists-check on the weakest).
        """
        self._check_writable(key)
        path = self.fs_path(key)
        if self.local:
            p = Path(path)
            tmp = p.with_name(f"{p.name}.tmp{os.getpid()}{threading.get_ident() % 10**6:06d}")
            try:
                for attempt in range(CREATE_RETRIES):
                    p.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        tmp.write_bytes(data)
                        break
                    except (
                        FileNotFoundError
                    ):  # another writer's lock release removed the empty folder just now
                        if attempt == CREATE_RETRIES - 1:
                            raise
                try:
                    os.link(tmp, p)
                except FileExistsError:
                    return False
                except OSError as exc:  # no hard links here (some network or FUSE filesystems)
                    if exc.errno not in (
                        errno.EPERM,
                        errno.ENOTSUP,
                        errno.EOPNOTSUPP,
                        errno.EXDEV,
                        errno.EMLINK,
                    ):
                        raise
                    return self._create_excl_open(p, data)
                return True
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        self._refresh(path)
        return True

    @staticmethod
    def _create_excl_open(p: Path, data: bytes) -> bool:
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def modified(self, key: str) -> float | None:
        """When ``key`` was last written (POSIX seconds, from the filesystem or the bucket, not from its bytes); None
        when the backend does not say."""
        try:
            if self.local:
                return os.lstat(self.path_of(key)).st_mtime
            m = self.fs.modified(self.fs_path(key))
            return float(m.timestamp())
        except FileNotFoundError:
            raise
        except Exception:
            return None

    def delete(self, key: str) -> None:
        """Remove one file (no error if it is already gone)."""
        self._check_writable(key)
        try:
            self.fs.rm_file(self.fs_path(key))
        except FileNotFoundError:
            pass
        self._refresh(self.fs_path(key))

    def rmtree(self, key: str) -> None:
        """Remove everything under ``key`` (no error if it is absent); a link inside it raises before anything goes."""
        self._check_writable(key)
        path = self.fs_path(key)
        if self.local:
            import shutil

            if not os.path.lexists(path):
                return
            self._walk_local(key, path)  # refuses links anywhere below, before deleting anything
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            return
        self._refresh(path)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self._refresh(path)

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.fs_path(key))

    def stat_identity(self, key: str) -> tuple:
        """What changes whenever the file ``key`` is rewritten: local (device, inode, size, mtime, ctime), one
        ``lstat`` with no link walk (whoever opens the file checks links); remote (size, ETag or modification time).
        FileNotFoundError if absent."""
        if self.local:
            st = os.lstat(self.path_of(key))
            return ("file", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        path = self.fs_path(key)
        info = self.fs.info(path)
        return (
            self.protocol,
            path,
            info.get("size"),
            str(
                info.get("ETag")
                or info.get("etag")
                or info.get("LastModified")
                or info.get("mtime")
                or info.get("last_modified")
            ),
        )

    def open_output(self, key: str):
        self._check_writable(key)
        path = self.fs_path(key)
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return self.fs.open(path, "wb")

    def open_input(self, key: str):
        """A binary file object for ``key``; remote files read in ranged blocks, not whole."""
        if self.local:
            return open(self.fs_path(key), "rb")  # noqa: SIM115
        return self.fs.open(
            self.fs_path(key), "rb", block_size=PARQUET_BLOCK_SIZE, cache_type="readahead"
        )

    def read_only_fs(self) -> Any:
        """The filesystem wrapped so that nothing can write through it (for DuckDB and pyarrow)."""
        return (
            self.fs if getattr(self.fs, "inner", None) is not None else ReadOnlyFileSystem(self.fs)
        )

    def read_parquet(self, keys: list[str], columns: list[str] | None = None) -> Any:
        """Parquet files ``keys`` as one polars DataFrame, reading only what is needed from a remote store."""
        import polars as pl
        import pyarrow.parquet as pq

        if self.local:
            return pl.read_parquet([self.join(k) for k in keys], columns=columns)
        paths = [self.fs_path(k) for k in keys]
        return pl.DataFrame(
            pl.from_arrow(pq.read_table(paths, filesystem=self.read_only_fs(), columns=columns))
        )


def _remote_fs(url: str, opts: dict[str, Any]) -> tuple[Any, str]:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url, **opts)
    except ImportError as exc:
        scheme = url.split("://", 1)[0]
        pkg = {
            "s3": "s3fs",
            "s3a": "s3fs",
            "gs": "gcsfs",
            "gcs": "gcsfs",
            "az": "adlfs",
            "abfs": "adlfs",
            "abfss": "adlfs",
        }
        raise ConfigError(
            f"opening {url} needs the fsspec backend for {scheme}://: pip install {pkg.get(scheme, 'its fsspec package')} "
            "(or pip install 'actstore[remote]')"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad --storage-option for {url}: {exc}") from None
    fs.invalidate_cache()  # fsspec shares one instance per options: a store opened anew sees the bucket as it is now
    return fs, root


def remote_options(url: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The fsspec options actstore opens ``url`` with: the user's, over actstore's defaults for the backend.

    s3fs sizes an object with a HEAD before every whole-object GET when ``max_concurrency > 1`` (its default), so
    s3 stores get ``max_concurrency=1``: one request per chunk (``bench/bench_remote.py`` measures both)."""
    if url.startswith(("s3://", "s3a://")):
        return {"max_concurrency": 1, **opts}
    return dict(opts)


def open_location(
    path: str,
    storage_options: dict[str, Any] | None = None,
    create: bool = False,
    writable: bool = False,
) -> Location:
    """Resolve a path or URL into a :class:`Location`.

    ``create`` makes a local folder if missing and opens it for writing (as
    extraction does); otherwise the location is read-only unless ``writable``,
    local folders and URLs alike (see :func:`write_access` for when commands
    that write pass ``writable``).
    """
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
                raise StoreError(
                    f"cannot write to store {p}: {exc.strerror or exc}; choose a writable path"
                ) from None
        elif not p.exists():
            raise StoreError(
                f"store {p} does not exist: check the path, or run actstore extract to create it"
            )
        elif not p.is_dir():
            raise StoreError(f"store {p} is a file, not a folder: give the store's folder")
        ro = not (create or writable)
        fs = fsspec.filesystem("file")
        return Location(
            str(p),
            ReadOnlyFileSystem(fs) if ro else fs,
            str(p),
            SafeLocalStore(str(p), read_only=ro),
            opts,
            ro,
        )
    if path.startswith(READ_ONLY_SCHEMES) and (create or writable):
        raise StoreError(
            f"{path} is an http(s) URL, which is read-only: write to a local path or an s3/gs/az bucket instead"
        )
    read_only = not (create or writable)
    opts = remote_options(path, opts)
    fs, root = _remote_fs(path, opts)
    # Zarr drives its own event loop, so it gets its own asynchronous instance of the filesystem
    zstore = zarr.storage.FsspecStore.from_url(path, storage_options=opts, read_only=read_only)
    # a read-only location hands out only a read-only filesystem (DuckDB, pyarrow and polars get this one)
    return Location(
        path.rstrip("/"),
        ReadOnlyFileSystem(fs) if read_only else fs,
        root.rstrip("/"),
        zstore,
        opts,
        read_only,
    )
