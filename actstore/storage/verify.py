"""``actstore verify``: every chunk's crc32c and every file's SHA-256 against the manifest, what is missing and what
no manifest lists; the published feature tables' unfinished generations. The checks themselves (chunk layouts, the
manifest, checks on read) are :mod:`actstore.storage.integrity`'s."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from actstore.errors import StoreError
from actstore.format import layout
from actstore.storage.integrity import (
    ArrayLayout,
    Problem,
    arrays_and_chunks,
    check_chunk,
    data_files,
    read_manifest,
    sha256,
)
from actstore.storage.location import Location


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`."""

    store: str
    n_chunks: int = 0
    """Chunks checked."""
    n_files: int = 0
    """Non-chunk files checked."""
    n_bytes: int = 0
    """Bytes read."""
    manifest: bool = False
    """Whether the store has a manifest."""
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is corrupted or missing (unlisted files are warnings)."""
        return not any(p.kind in ("corrupted", "missing") for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _parse_check(key: str, data: bytes) -> str | None:
    """A structural check of a file no manifest vouches for."""
    try:
        if key.endswith(".json"):
            json.loads(data)
        elif key.endswith(".parquet"):
            import io

            import pyarrow.parquet as pq

            pq.ParquetFile(io.BytesIO(data)).metadata  # noqa: B018
        elif key.endswith(".safetensors"):
            from safetensors.numpy import load

            load(data)
    except Exception as exc:
        return f"does not parse ({type(exc).__name__})"
    return None


def verify(loc: Location, jobs: int = 8, chunks: bool = True) -> VerifyReport:
    """Check every chunk (crc32c) and every file (manifest SHA-256) of the store at ``loc``."""
    rep = VerifyReport(store=loc.url)
    files = loc.walk()
    if "zarr.json" not in files:
        raise StoreError(f"{loc.url} holds no zarr.json: not an actstore store (check the path)")
    man = read_manifest(loc)
    rep.manifest = man is not None
    arrays, _, bad_meta = arrays_and_chunks(loc, files)
    for key in bad_meta:
        rep.problems.append(Problem(key, "corrupted", "Zarr metadata is not valid JSON"))

    # chunks: every chunk of the required rows must exist and pass its checksum
    todo: list[tuple[ArrayLayout, tuple[int, ...]]] = []
    for al in arrays.values():
        for idx in al.expected_chunks():
            if al.chunk_key(idx) in files:
                todo.append((al, idx))
            else:
                r0, r1 = al.rows_of(idx)
                why = f"{al.object_name} {idx} of array {al.path} (rows {r0}-{r1 - 1}) is absent"
                rep.problems.append(Problem(al.chunk_key(idx), "missing", why))
    if chunks:

        def one(item: tuple[ArrayLayout, tuple[int, ...]]) -> Problem | None:
            al, idx = item
            why = check_chunk(loc, al, idx)
            if why is None:
                return None
            kind = "missing" if why == "missing" else "corrupted"
            return Problem(
                al.chunk_key(idx), kind, f"{al.object_name} {idx} of array {al.path}: {why}"
            )

        with ThreadPoolExecutor(max(1, jobs)) as pool:
            for p in pool.map(one, todo):
                if p is not None:
                    rep.problems.append(p)
        rep.n_chunks = len(todo)
        rep.n_bytes += sum(files[al.chunk_key(idx)] for al, idx in todo)

    # an encode that stopped before publishing its generation: not corruption, an unfinished run
    unpublished = unpublished_generations(loc, files)
    for prefix, sae in unpublished.items():
        rep.problems.append(
            Problem(
                prefix,
                "unfinished",
                f"a generation of SAE {sae}'s feature table that was never "
                f"published (an encode that stopped; nothing reads it): rerun actstore encode --sae "
                f"{sae} (with --overwrite if it was one) to finish it",
            )
        )

    def in_unpublished(key: str) -> bool:
        return any(key.startswith(prefix + "/") for prefix in unpublished)

    # files: manifest hashes where listed, a parse check where not
    listed = (man or {}).get("files", {})
    for key in listed:
        if key not in files and not in_unpublished(key):
            rep.problems.append(Problem(key, "missing", "listed in manifest.json but absent"))
    others = [k for k in data_files(loc, files) if k not in bad_meta and not in_unpublished(k)]

    def one_file(key: str) -> Problem | None:
        data = loc.read_bytes(key)
        if key in listed:
            e = listed[key]
            if len(data) != int(e.get("size", -1)) or sha256(data) != e.get("sha256"):
                return Problem(
                    key,
                    "corrupted",
                    f"SHA-256/size differ from manifest.json ({len(data)} bytes, expected {e.get('size')})",
                )
            return None
        why = _parse_check(key, data)
        if why:
            return Problem(key, "corrupted", why)
        return Problem(
            key,
            "unlisted",
            "not in manifest.json, so no checksum vouches for it (actstore verify --update-manifest)",
        )

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for p in pool.map(one_file, others):
            if p is not None and (rep.manifest or p.kind != "unlisted"):
                rep.problems.append(p)
    rep.n_files = len(others)
    rep.n_bytes += sum(files[k] for k in others)
    rep.problems.sort(key=lambda p: (p.kind, p.key))
    return rep


def unpublished_generations(loc: Location, files: dict[str, int]) -> dict[str, str]:
    """Folders ``features/<sae>/gen-<N>`` that no ``encoding.json`` publishes -> the SAE's name."""
    out: dict[str, str] = {}
    published: dict[str, str | None] = {}
    for key in files:
        parts = key.split("/")
        if (
            len(parts) < 4
            or parts[0] != layout.FEATURES
            or layout.parse_generation(parts[2]) is None
        ):
            continue
        sae = parts[1]
        if sae not in published:
            published[sae] = _published_dir(loc, sae, files)
        if parts[2] != published[sae]:
            out[f"{layout.FEATURES}/{sae}/{parts[2]}"] = sae
    return out


def _published_dir(loc: Location, sae: str, files: dict[str, int]) -> str | None:
    key = f"{layout.features_dir(sae)}/{layout.ENCODING}"
    if key not in files:
        return None
    try:
        man = json.loads(loc.read_bytes(key))
    except (ValueError, RecursionError):
        return None
    return man.get("dir") if isinstance(man, dict) and isinstance(man.get("dir"), str) else None
