"""Integrity: a checksum for every chunk and file of a store, and ``actstore verify``.

Two kinds of checksum cover a store:

* **Zarr chunks** carry their own: every array is written with Zarr v3's
  ``crc32c`` codec as its last codec, so each chunk object ends with the CRC-32C
  of the bytes before it. Reading a corrupted chunk raises
  :class:`~actstore.errors.IntegrityError` naming the array and chunk
  (:func:`chunk_error`), never returns wrong numbers.
* **Every other file** (``zarr.json`` metadata, Parquet parts, ``sae.safetensors``,
  ``cfg.json``, ...) is listed in ``STORE/manifest.json`` with its size and
  SHA-256. Extraction updates the manifest when it finishes; ``actstore verify
  --update-manifest`` (and ``actstore copy``) record files written since.

:func:`verify` checks both and reports each corrupted, missing or unlisted
object by its key.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import product
from typing import Any

import google_crc32c
import numpy as np

from actstore.clock import now
from actstore.errors import IntegrityError
from actstore.format import layout
from actstore.format.metadata import LayerAttrs, in_metadata
from actstore.storage.guards import check_key
from actstore.storage.location import PARTIAL, Location

MANIFEST_KEY = layout.MANIFEST
MANIFEST_FORMAT = 1
SKIP_PREFIXES = (f"{layout.LOCKS}/",)
"""Keys neither the manifest lists nor a copy takes: writers' locks and claims."""
UNSIGNED_PREFIXES = (*SKIP_PREFIXES, f"{layout.UNITS}/")
"""Keys the manifest does not list: those, and the unit markers (written while an array is extracted)."""
TMP = PARTIAL  # a local write in progress


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- chunks
def _codec_names(codecs: list[Any]) -> list[str]:
    """The names of a Zarr v3 codec list (each a ``{"name": ...}`` object or a bare name)."""
    return [str(c.get("name")) if isinstance(c, dict) else str(c) for c in codecs]


@dataclass
class ArrayLayout:
    """Where an array's chunks live and how many of them must exist."""

    path: str
    """Array path in the store, e.g. ``models/m/layer_3``."""
    shape: list[int]
    chunk_shape: list[int]
    separator: str
    """Chunk key separator ('/' for Zarr v3's default encoding)."""
    v2_keys: bool
    """Whether chunk keys use the 'v2' encoding (no ``c/`` prefix)."""
    crc32c_last: bool
    """Whether the last codec is crc32c, so a chunk's raw bytes can be checked without decoding."""
    rows: int
    """Rows that must be present: ``committed_rows`` for activation arrays, else the full first dimension."""
    shard: ShardLayout | None = None
    """How a shard object is cut, when the array is sharded (then ``chunk_shape`` is the shard's)."""

    @classmethod
    def from_metadata(cls, path: str, meta: dict[str, Any]) -> ArrayLayout:
        enc = meta.get("chunk_key_encoding", {"name": "default"})
        sep = (enc.get("configuration") or {}).get(
            "separator", "/" if enc.get("name") == "default" else "."
        )
        codecs = meta.get("codecs", [])
        names = _codec_names(codecs)
        attrs = in_metadata(meta) or {}
        shape = [int(x) for x in meta["shape"]]
        declared = LayerAttrs.rows_in(attrs)
        rows = declared if declared is not None else (shape[0] if shape else 0)
        shard = (
            ShardLayout.from_codec(codecs[0]) if names and names[0] == "sharding_indexed" else None
        )
        return cls(
            path=path,
            shape=shape,
            chunk_shape=[int(x) for x in meta["chunk_grid"]["configuration"]["chunk_shape"]],
            separator=sep,
            v2_keys=enc.get("name") == "v2",
            crc32c_last=bool(names) and names[-1] == "crc32c",
            rows=min(rows, shape[0]) if shape else 0,
            shard=shard,
        )

    @property
    def object_name(self) -> str:
        """What one stored object of the array is called in messages: a shard (format 2) or a chunk."""
        return "shard" if self.shard is not None else "chunk"

    def chunk_key(self, idx: tuple[int, ...]) -> str:
        """Store key of the chunk at grid index ``idx``."""
        body = self.separator.join(str(i) for i in idx) if idx else "0"
        return f"{self.path}/{body}" if self.v2_keys else f"{self.path}/c{self.separator}{body}"

    def expected_chunks(self) -> list[tuple[int, ...]]:
        """Grid indexes of every chunk covering the required rows."""
        if not self.shape:
            return [()]
        grids = [range(math.ceil(self.rows / self.chunk_shape[0]))]
        grids += [
            range(math.ceil(n / c))
            for n, c in zip(self.shape[1:], self.chunk_shape[1:], strict=True)
        ]
        return list(product(*grids))

    def rows_of(self, idx: tuple[int, ...]) -> tuple[int, int]:
        if not idx:
            return (0, 0)
        c = self.chunk_shape[0]
        return idx[0] * c, min((idx[0] + 1) * c, self.shape[0])


@dataclass
class ShardLayout:
    """The inside of a shard object (Zarr's ``sharding_indexed`` codec): inner chunks, then an index of
    ``(offset, nbytes)`` uint64 pairs per inner chunk in C order, itself checksummed."""

    inner_shape: list[int]
    inner_crc32c_last: bool
    """Whether each inner chunk ends with its own crc32c (actstore writes it so)."""
    index_crc32c: bool
    index_at_end: bool

    @classmethod
    def from_codec(cls, codec: dict[str, Any]) -> ShardLayout:
        conf = codec.get("configuration", {})
        inner, index = (
            _codec_names(conf.get("codecs", [])),
            _codec_names(conf.get("index_codecs", [])),
        )
        shape = [int(x) for x in conf["chunk_shape"]]
        # a store's metadata is untrusted: this is damage, not a division by zero
        if not shape or min(shape) <= 0:
            raise ValueError(f"inner chunk shape {shape} is not positive")
        return cls(
            shape,
            bool(inner) and inner[-1] == "crc32c",
            "crc32c" in index,
            conf.get("index_location", "end") == "end",
        )

    def problems(
        self, raw: bytes, shard_shape: list[int], origin: list[int], need_rows: int
    ) -> str | None:
        """Why the shard ``raw`` (whose first element is at ``origin``) is unsound, naming the inner chunk and its
        rows; None if its index and every inner chunk holding rows below ``need_rows`` check out."""
        grid = [math.ceil(s / c) for s, c in zip(shard_shape, self.inner_shape, strict=True)]
        n = math.prod(grid)
        size = 16 * n + (4 if self.index_crc32c else 0)
        if len(raw) < size:
            return "shard shorter than its index"
        index = raw[-size:] if self.index_at_end else raw[:size]
        if self.index_crc32c and not crc_ok(index):
            return "shard index crc32c checksum mismatch"
        pairs = np.frombuffer(index[: 16 * n], dtype="<u8").reshape(n, 2)
        for i, inner in enumerate(product(*(range(g) for g in grid))):
            r0 = origin[0] + inner[0] * self.inner_shape[0]
            if r0 >= need_rows:
                continue
            rows = f"rows {r0}-{min(r0 + self.inner_shape[0], need_rows) - 1}"
            off, nbytes = (int(x) for x in pairs[i])
            if off == nbytes == 2**64 - 1:
                return f"inner chunk {inner} ({rows}) is missing from the shard"
            if off + nbytes > len(raw):
                return f"inner chunk {inner} ({rows}) runs past the end of the shard"
            if self.inner_crc32c_last and not crc_ok(raw[off : off + nbytes]):
                return f"inner chunk {inner} ({rows}): crc32c checksum mismatch"
        return None


def crc_ok(data: bytes) -> bool:
    """Whether a chunk written with a final crc32c codec matches its stored checksum."""
    if len(data) < 4:
        return False
    return google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")


def check_chunk(
    loc: Location, al: ArrayLayout, idx: tuple[int, ...], data: bytes | None = None
) -> str | None:
    """None if the chunk is sound, else why not ('missing', 'checksum mismatch', ...)."""
    key = al.chunk_key(idx)
    try:
        raw = loc.read_bytes(key) if data is None else data
    except FileNotFoundError:
        return "missing"
    if al.shard is not None:
        origin = [i * c for i, c in zip(idx, al.chunk_shape, strict=True)]
        return al.shard.problems(raw, al.chunk_shape, origin, al.rows)
    if al.crc32c_last:
        return None if crc_ok(raw) else "crc32c checksum mismatch"
    try:  # no crc32c: at least the codec pipeline must decode it
        import zarr

        zarr.open_array(loc.zarr_store, path=al.path, mode="r").blocks[idx]
    except Exception as exc:
        return f"does not decode ({type(exc).__name__}: {exc})"
    return None


def chunk_error(
    loc: Location, array: Any, row_start: int, row_stop: int, exc: BaseException
) -> BaseException:
    """Turn a failed read of rows ``[row_start, row_stop)`` of a Zarr array into an IntegrityError naming the bad chunk.

    Returns ``exc`` itself when every chunk in the range checks out (the failure was something else).
    """
    al = ArrayLayout.from_metadata(array.path, array.metadata.to_dict())
    c = al.chunk_shape[0] if al.chunk_shape else 1
    first, last = row_start // c, max(row_start, row_stop - 1) // c
    rest = [range(math.ceil(n / k)) for n, k in zip(al.shape[1:], al.chunk_shape[1:], strict=True)]
    for idx in product(range(first, last + 1), *rest):
        why = check_chunk(loc, al, idx)
        if why:
            r0, r1 = al.rows_of(idx)
            state = "missing" if why == "missing" else f"corrupted: {why}"
            return IntegrityError(
                f"{al.object_name} {idx} of array {al.path} in store {loc.url} (object {al.chunk_key(idx)}, rows {r0}-{r1 - 1}) "
                f"is {state}. Its values are not returned (never read as zeros); run `actstore verify {loc.url}` to list "
                "every bad object, then re-copy the store or re-extract that layer"
            )
    from actstore.storage.guards import MissingChunk

    if isinstance(exc, MissingChunk):
        return IntegrityError(
            f"{exc} in store {loc.url}: run `actstore verify {loc.url}`, then re-copy or re-extract"
        )
    return exc


# ---------------------------------------------------------------- manifest
def read_manifest(loc: Location) -> dict[str, Any] | None:
    """The store's manifest (``{"files": {key: {"size", "sha256"}}, ...}``), or None if it has none."""
    try:
        raw = loc.read_bytes(MANIFEST_KEY)
    except FileNotFoundError:
        return None
    try:
        man = json.loads(raw)
        files = man["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(
            f"{loc.join(MANIFEST_KEY)} is not a valid manifest: re-create it with actstore verify --update-manifest"
        ) from None
    for key in files:
        check_key(key)
    return man


def arrays_and_chunks(
    loc: Location, files: dict[str, int]
) -> tuple[dict[str, ArrayLayout], set[str], list[str]]:
    """Parse every zarr.json: ``(arrays by path, keys that are chunks, keys of unreadable metadata)``."""
    arrays: dict[str, ArrayLayout] = {}
    bad_meta = []
    for key in files:
        if key == "zarr.json" or key.endswith("/zarr.json"):
            try:
                meta = json.loads(loc.read_bytes(key))
                if meta.get("node_type") == "array":
                    path = key[: -len("/zarr.json")] if "/" in key else ""
                    arrays[path] = ArrayLayout.from_metadata(path, meta)
            except (ValueError, KeyError, TypeError, AttributeError):
                bad_meta.append(key)
    for (
        path,
        al,
        # an int8 layer's per-token scales: required as far as its values are committed
    ) in arrays.items():
        values = (
            arrays.get(path.removesuffix(layout.SCALE_SUFFIX))
            if path.endswith(layout.SCALE_SUFFIX)
            else None
        )
        if values is not None:
            al.rows = min(al.rows, values.rows)
    chunk_keys = set()
    for key in files:
        parent = key.rsplit("/", 1)[0] if "/" in key else ""
        while parent:
            if parent in arrays:
                if not key.endswith("/zarr.json"):
                    chunk_keys.add(key)
                break
            parent = parent.rsplit("/", 1)[0] if "/" in parent else ""
    return arrays, chunk_keys, bad_meta


def data_files(loc: Location, files: dict[str, int] | None = None) -> list[str]:
    """Keys of the store's files that are not Zarr chunks (what the manifest lists)."""
    files = loc.walk() if files is None else files
    _, chunk_keys, _ = arrays_and_chunks(loc, files)
    return [
        k
        for k in files
        if k not in chunk_keys
        and k != MANIFEST_KEY
        and not k.startswith(UNSIGNED_PREFIXES)
        and not TMP.search(k)
    ]


def update_manifest(
    loc: Location,
    prefixes: Iterable[str] | None = None,
    entries: dict[str, dict[str, Any]] | None = None,
) -> dict:
    """Record size and SHA-256 of the store's non-chunk files (those under ``prefixes``, or all) in ``manifest.json``.

    ``entries`` gives already-known ``{key: {"size", "sha256"}}`` (as copy does).
    Files listed but now gone are dropped. Writers serialise on the 'manifest' lock.
    """
    from actstore.storage.locks import StoreLock

    with StoreLock(loc, "manifest", "update manifest").acquire(wait_s=60):
        files = loc.walk()
        keys = data_files(loc, files)
        pre = tuple(p.rstrip("/") for p in prefixes) if prefixes is not None else None
        man = read_manifest(loc) or {"format": MANIFEST_FORMAT, "created": now(), "files": {}}
        listed: dict[str, Any] = {k: v for k, v in man["files"].items() if k in files}
        known = entries or {}
        for key in keys:
            if key in known:
                listed[key] = dict(known[key])
            elif pre is None or any(key == p or key.startswith(p + "/") for p in pre):
                data = loc.read_bytes(key)
                listed[key] = {"size": len(data), "sha256": sha256(data)}
        if listed == man["files"] and "updated" in man:
            return man  # nothing changed: leave the store byte-identical
        man.update(
            {"format": MANIFEST_FORMAT, "updated": now(), "files": dict(sorted(listed.items()))}
        )
        loc.write_bytes(MANIFEST_KEY, json.dumps(man, indent=1).encode())
    return man


@dataclass
class Problem:
    """One object that failed verification."""

    key: str
    """Store key of the object."""
    kind: str
    """'corrupted', 'missing' or 'unlisted'."""
    detail: str
    """What is wrong, in words."""


# ---------------------------------------------------------------- integrity on read
VERIFY_ON_READ = True
"""Check files against the manifest when they are opened (set False only to measure what the checks cost)."""
_VERIFIED: set[tuple] = set()
_MANIFESTS: dict[tuple, dict[str, Any] | None] = {}


def _cache_dir() -> Any:
    import os
    from pathlib import Path

    d = os.environ.get("ACTSTORE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "actstore",
    )
    return Path(d) / "verified"


def _manifest_cached(loc: Location) -> dict[str, Any] | None:
    """The manifest, re-read only when its own file changed."""
    try:
        ident = (loc.url, *loc.stat_identity(MANIFEST_KEY))
    except FileNotFoundError:
        return None
    if ident not in _MANIFESTS:
        if len(_MANIFESTS) > 16:
            _MANIFESTS.clear()
        _MANIFESTS[ident] = read_manifest(loc)
    return _MANIFESTS[ident]


def check_file(loc: Location, key: str, data: bytes | None = None) -> None:
    """Raise :class:`IntegrityError` unless ``key`` matches its size and SHA-256 in the store's manifest.

    Files the manifest does not list (or stores without one) pass unchecked: ``actstore verify`` reports them.
    A file that passed is remembered by what changes when it is rewritten (local: device, inode, size, mtime
    and ctime; remote: size and ETag), in this process and in ``~/.cache/actstore/verified``
    (``ACTSTORE_CACHE_DIR``), so a warm lookup costs one ``stat``, not a hash. ``data`` (the file's bytes,
    when the caller read them) is hashed directly.
    """
    if not VERIFY_ON_READ:
        return
    man = _manifest_cached(loc)
    entry = (man or {}).get("files", {}).get(key)
    if entry is None:
        return
    if data is not None:
        _compare(loc, key, entry, len(data), sha256(data))
        return
    try:
        ident = (loc.url, key, *loc.stat_identity(key), entry.get("sha256"))
    except FileNotFoundError:
        raise IntegrityError(
            f"{key} in store {loc.url} is listed in manifest.json but missing: re-copy the store from its source, "
            "or re-run the command that made it"
        ) from None
    if ident in _VERIFIED:
        return
    token = hashlib.sha256(repr(ident).encode()).hexdigest()
    marker = _cache_dir() / token[:2] / token
    if not marker.exists():
        h, n = hashlib.sha256(), 0
        with loc.open_input(key) as f:
            while block := f.read(1 << 22):
                h.update(block)
                n += len(block)
        _compare(loc, key, entry, n, h.hexdigest())
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:  # no writable cache: this process still remembers
            pass
    if len(_VERIFIED) > 100_000:
        _VERIFIED.clear()
    _VERIFIED.add(ident)


def check_files(loc: Location, keys: Iterable[str]) -> None:
    """:func:`check_file` for each key."""
    for key in keys:
        check_file(loc, key)


def _compare(loc: Location, key: str, entry: dict[str, Any], size: int, digest: str) -> None:
    if size != int(entry.get("size", -1)) or digest != entry.get("sha256"):
        raise IntegrityError(
            f"{key} in store {loc.url} is corrupted: its size/SHA-256 differ from manifest.json ({size} bytes, expected "
            f"{entry.get('size')}); nothing was read from it. Run `actstore verify {loc.url}` to list every bad object, "
            "then re-copy the store or re-run the command that made the file"
        )
