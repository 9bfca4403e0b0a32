"""Sharing stores: verified copies between local folders and buckets, and the provenance record.

``actstore copy SRC DST`` copies a store (or only some models, layers and SAEs
of it) object by object, in parallel. Every object is checked twice: as read
from the source (a chunk's crc32c, a file's SHA-256 from the source manifest
where it has one) and again as read back from the destination. Objects already
at the destination with the same bytes are skipped, so an interrupted copy is
resumed by running the same command. Zarr metadata is written last, so a
partial copy never shows arrays whose chunks are not there yet. Keys from the
source are checked before anything is written: ``..``, absolute keys and the
like are refused (see :func:`actstore.storage.guards.check_key`).
"""

from __future__ import annotations

import fnmatch
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actstore.errors import ConfigError, IntegrityError, StoreError
from actstore.format import layout
from actstore.format.metadata import StoreAttrs, in_metadata
from actstore.storage.config import CopyConfig
from actstore.storage.guards import check_key
from actstore.storage.integrity import (
    MANIFEST_KEY,
    SKIP_PREFIXES,
    TMP,
    ArrayLayout,
    Problem,
    arrays_and_chunks,
    check_chunk,
    read_manifest,
    sha256,
    update_manifest,
)
from actstore.storage.location import Location, open_location


@dataclass
class CopyResult:
    """What a copy did."""

    src: str
    dst: str
    n_objects: int
    """Objects selected for copying."""
    n_copied: int
    """Objects written this run."""
    n_skipped: int
    """Objects already present at the destination with the right bytes (resume)."""
    bytes_copied: int
    seconds: float
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def include_patterns(include: list[str]) -> list[str]:
    """Turn ``--include`` items into key-prefix globs.

    ``MODEL`` -> ``models/MODEL``; ``MODEL:LAYER`` -> ``models/MODEL/layer_LAYER``;
    ``sae:NAME`` -> ``saes/NAME``; anything with a ``/`` is a key glob as given.
    """
    return [layout.include_prefix(item) for item in include]


def _selected(key: str, patterns: list[str]) -> bool:
    """Whether ``key`` is needed for the selection: always the root, token index and manifest; else a matching prefix."""
    if not patterns or layout.always_copied(key):
        return True
    if (array := layout.units_of(key)) is not None:  # a unit marker goes with its array
        return _selected(f"{array}/{layout.ROOT_META}", patterns)
    parts = key.split("/")
    for pat in patterns:
        n = pat.count("/") + 1
        head = "/".join(parts[:n])
        if fnmatch.fnmatchcase(head, pat) or fnmatch.fnmatchcase(head, pat + layout.SCALE_SUFFIX):
            return True
        # the parent groups' metadata of a selected layer (models/zarr.json, models/M/zarr.json)
        if parts[-1] == "zarr.json" and fnmatch.fnmatchcase(
            "/".join(parts[:-1]), "/".join(pat.split("/")[: len(parts) - 1])
        ):
            return True
    return False


def _copy_order(key: str) -> tuple[int, str]:
    """Data first, then array/group metadata deepest first, the root's zarr.json last."""
    if key == "zarr.json":
        return (3, key)
    if key.endswith("zarr.json"):
        return (2, f"{9999 - key.count('/'):04d}{key}")
    return (0 if "/c/" in key else 1, key)


def _check_dst(dst: Location, src_root: StoreAttrs) -> None:
    if not dst.exists("zarr.json"):
        return
    try:
        theirs = StoreAttrs.from_dict(
            in_metadata(json.loads(dst.read_bytes("zarr.json"))) or {}, dst.url
        )
    except (ValueError, IntegrityError):
        theirs = StoreAttrs()
    if theirs.created != src_root.created:
        raise StoreError(
            f"destination {dst.url} already holds a different store (created {theirs.created}, the source "
            f"{src_root.created}): choose an empty destination"
        )


def copy_store(cfg: CopyConfig, progress: bool = False) -> CopyResult:
    """Copy the store ``cfg.src`` to ``cfg.dst`` with verification; see the module docstring."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    src, listing, root_attrs = _open_source(cfg)
    keys = _keys_to_copy(src, listing, cfg)
    copier = _Copier(src, listing)
    res = CopyResult(src.url, cfg.dst, len(keys), 0, 0, 0, 0.0)
    res.problems += copier.absent_chunks(include_patterns(cfg.include))
    # a chunk inside the committed rows that is absent would read as zeros at the destination
    if res.problems:
        res.seconds = time.perf_counter() - t0
        return res
    copier.open_destination(cfg, root_attrs)
    res.dst = copier.dst.url
    # data objects in parallel; metadata after them, in order
    data_keys = [k for k in keys if _copy_order(k)[0] < 2]
    meta_keys = [k for k in keys if _copy_order(k)[0] >= 2]
    bar = tqdm(total=len(keys), desc="copy", unit=" objects", disable=not progress)
    with ThreadPoolExecutor(cfg.jobs) as pool:
        for state, n, problem in pool.map(copier.one, data_keys):
            _tally(res, state, n, problem)
            bar.update()
    if not res.problems:
        for key in meta_keys:
            _tally(res, *copier.one(key))
            bar.update()
    bar.close()
    if not res.problems:
        update_manifest(copier.dst, prefixes=[], entries=copier.hashes)
    res.seconds = time.perf_counter() - t0
    return res


def _open_source(cfg: CopyConfig) -> tuple[Location, dict[str, int], StoreAttrs]:
    """The source, its listing and root attributes; refused before anything is written when it is not an actstore
    store or holds keys that would leave the destination."""
    src = open_location(cfg.src, cfg.src_options)
    listing = src.walk()
    if "zarr.json" not in listing:
        raise StoreError(f"{src.url} holds no zarr.json: not an actstore store (check the path)")
    root_attrs = in_metadata(json.loads(src.read_bytes("zarr.json")))
    if root_attrs is None:
        raise StoreError(
            f"{src.url} is a Zarr group but not an actstore store (no '{layout.ATTR}' attribute)"
        )
    unsafe = []
    for key in listing:
        try:
            check_key(key)
        except StoreError:
            unsafe.append(key)
    if unsafe:
        raise StoreError(
            f"source store {src.url} holds unsafe keys {unsafe[:5]!r}: copy refused before writing anything "
            "(keys must stay inside the store: no '..', no absolute keys)"
        )
    return src, listing, StoreAttrs.from_dict(root_attrs, f"store {src.url}")


def _keys_to_copy(src: Location, listing: dict[str, int], cfg: CopyConfig) -> list[str]:
    """The keys ``--include`` selects (all, without it), data before metadata."""
    patterns = include_patterns(cfg.include)
    keys = [
        k
        for k in listing
        if k != MANIFEST_KEY
        and not k.startswith(SKIP_PREFIXES)
        and not TMP.search(k)
        and _selected(k, patterns)
    ]
    if patterns and not any(layout.selects_content(k) for k in keys):
        raise ConfigError(
            f"--include {' '.join(cfg.include)} matches nothing in {src.url}: see actstore info for its models and SAEs"
        )
    return sorted(keys, key=_copy_order)


class _Copier:
    """Copies one object at a time from ``src`` to ``dst``, checking it at the source (chunk crc32c, file SHA-256
    from the source manifest) and reading it back at the destination; records the SHA-256 of the files it copied."""

    def __init__(self, src: Location, listing: dict[str, int]) -> None:
        self.src, self.listing = src, listing
        self.listed = (read_manifest(src) or {}).get("files", {})
        arrays, self.chunk_keys, _ = arrays_and_chunks(src, listing)
        self.layout_of: dict[
            str, tuple[ArrayLayout, tuple[int, ...]]
        ] = {}  # chunk key -> (its array, its index)
        for al in arrays.values():
            for idx in al.expected_chunks():
                self.layout_of[al.chunk_key(idx)] = (al, idx)
        self.hashes: dict[str, dict[str, Any]] = {}
        self.dst: Location = src  # set by open_destination
        self.dst_have: dict[str, int] = {}

    def absent_chunks(self, patterns: list[str]) -> list[Problem]:
        out = []
        for key in sorted(
            k for k in self.layout_of if k not in self.listing and _selected(k, patterns)
        ):
            al, idx = self.layout_of[key]
            r0, r1 = al.rows_of(idx)
            why = f"{al.object_name} {idx} of array {al.path} (rows {r0}-{r1 - 1}) is absent at the source; nothing copied"
            out.append(Problem(key, "missing", why))
        return out

    def open_destination(self, cfg: CopyConfig, root_attrs: StoreAttrs) -> None:
        self.dst = open_location(cfg.dst, cfg.dst_options, create=True)
        _check_dst(self.dst, root_attrs)
        self.dst_have = self.dst.walk()

    def check_source(self, key: str, data: bytes) -> str | None:
        if key in self.chunk_keys:
            if key in self.layout_of:
                return check_chunk(self.src, self.layout_of[key][0], self.layout_of[key][1], data)
            return None  # a chunk past the committed rows: copied as is
        entry = self.listed.get(key)
        if entry and (len(data) != int(entry["size"]) or sha256(data) != entry["sha256"]):
            return "SHA-256/size differ from the source manifest"
        return None

    def one(self, key: str) -> tuple[str, int, Problem | None]:
        """Copy one object: returns ('copied'|'skipped'|'failed', bytes written, problem)."""
        data = self.src.read_bytes(key)
        why = self.check_source(key, data)
        if why:
            return "failed", 0, Problem(key, "corrupted", f"at the source: {why}; not copied")
        digest = sha256(data)
        if key not in self.chunk_keys:
            self.hashes[key] = {"size": len(data), "sha256": digest}
        if self.dst_have.get(key) == len(data) and sha256(self.dst.read_bytes(key)) == digest:
            return "skipped", 0, None
        # refuse paths that escape the destination (check_key already did; belt and braces)
        if self.dst.local:
            target = Path(self.dst.fs_path(key)).resolve()
            if not str(target).startswith(str(Path(self.dst.root).resolve()) + "/"):
                return (
                    "failed",
                    0,
                    Problem(key, "corrupted", "resolves outside the destination; refused"),
                )
        for _attempt in range(2):
            self.dst.write_bytes(key, data)
            if sha256(self.dst.read_bytes(key)) == digest:
                return "copied", len(data), None
        return (
            "failed",
            0,
            Problem(
                key, "corrupted", "bytes read back from the destination differ from the source"
            ),
        )


def _tally(res: CopyResult, state: str, n: int, problem: Problem | None) -> None:
    if state == "copied":
        res.n_copied += 1
        res.bytes_copied += n
    elif state == "skipped":
        res.n_skipped += 1
    if problem is not None:
        res.problems.append(problem)
