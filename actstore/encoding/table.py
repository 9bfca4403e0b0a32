"""The feature table's files: ``features/<sae>/`` generations, ``encoding.json``/``pending.json``, Parquet schemas."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from actstore.clock import now
from actstore.errors import IntegrityError
from actstore.format import layout
from actstore.format.layout import name_ok
from actstore.format.metadata import EncodingManifest
from actstore.storage.integrity import check_file

if TYPE_CHECKING:
    from actstore.store.reader import Store


ENCODING_FORMAT = 1
MANIFEST = layout.ENCODING
PENDING = layout.PENDING
ACTS_SCHEMA = pa.schema([("row", pa.int64()), ("feature", pa.int32()), ("value", pa.float32())])
# final files: feature sorted (dictionary + RLE), rows (DELTA_BINARY_PACKED) and values (BYTE_STREAM_SPLIT)
# compress far better than with dictionaries on every column, and write ~3x faster
ACTS_PARQUET: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": ["feature"],
    "column_encoding": {"row": "DELTA_BINARY_PACKED", "value": "BYTE_STREAM_SPLIT"},
    "write_statistics": True,
}
# spill runs are read back once: lz4 reads ~5x faster than zstd here, at the same size
SPILL_PARQUET: dict[str, Any] = {
    **ACTS_PARQUET,
    "compression": "lz4",
    "write_statistics": False,
    "row_group_size": 1 << 20,
}
STATS_SCHEMA = pa.schema(
    [
        ("feature", pa.int32()),
        ("n_active", pa.int64()),
        ("frequency", pa.float64()),
        ("mean", pa.float64()),
        ("max", pa.float32()),
        ("variance", pa.float64()),
    ]
)


def features_dir(sae: str) -> str:
    """Store key of an SAE's encoded feature table."""
    return layout.features_dir(sae)


def sae_fingerprint(store: Store, name: str) -> str:
    """sha256 of the SAE's weights file (an encoding is valid only for these weights)."""
    return hashlib.sha256(
        store.loc.read_bytes(layout.sae_file(name, layout.SAE_WEIGHTS))
    ).hexdigest()


def files_dir(sae: str, man: EncodingManifest) -> str:
    """Store key of the folder holding an encoding's ``acts/`` and ``stats.parquet``."""
    return layout.generation_dir(sae, man.dir)


def read_encoding(store: Store, sae: str, name: str = MANIFEST) -> EncodingManifest | None:
    """The published ``encoding.json`` of an SAE's feature table (or, with ``name=PENDING``, the state of the
    encoding being made), checked (:class:`EncodingManifest`); None if there is none."""
    import json

    key = f"{features_dir(sae)}/{name}"
    if not store.loc.exists(key):
        return None
    raw = store.loc.read_bytes(key)
    check_file(store.loc, key, raw)
    try:
        man = json.loads(raw)
    except (ValueError, RecursionError):
        raise IntegrityError(
            f"{key} in store {store.url} is not valid JSON: re-encode with --overwrite"
        ) from None
    return EncodingManifest.from_dict(man, f"{key} in store {store.url}")


def read_pending(store: Store, sae: str) -> EncodingManifest | None:
    return read_encoding(store, sae, PENDING)


def write_manifest(store: Store, sae: str, man: EncodingManifest, name: str = MANIFEST) -> None:
    """Write ``encoding.json`` (or ``pending.json``) whole, stamped ``updated``."""
    import json

    man.updated = now()
    store.loc.write_bytes(
        f"{features_dir(sae)}/{name}", json.dumps(man.to_dict(), indent=2, sort_keys=True).encode()
    )


def rm(store: Store, key: str) -> None:
    store.loc.rmtree(key)


def write_parquet(store: Store, key: str, table: pa.Table, **kw: Any) -> int:
    with store.loc.open_output(key) as f:
        pq.write_table(table, f, **kw)
    return store.loc.size(key)


def read_parquet(store: Store, key: str) -> pa.Table:
    if store.loc.local:
        return pq.read_table(store.loc.join(key))
    return pq.read_table(store.loc.fs_path(key), filesystem=store.loc.fs)


def generations(store: Store, base: str) -> list[int]:
    return sorted(
        n for n in map(layout.parse_generation, store.loc.list_dirs(base)) if n is not None
    )


def encoded_saes(store: Store) -> list[str]:
    """Names of the SAEs whose feature table is completely encoded in the store."""
    out = []
    for name in store.loc.list_dirs(layout.FEATURES):
        if not name_ok(name):
            continue
        man = read_encoding(store, name)
        if man and man.complete:
            out.append(name)
    return out
