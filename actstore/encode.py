"""Encode stage: run a saved SAE over every token row of its (model, layer) into a Parquet feature table.

Output layout (under the store, one folder per SAE)::

    STORE/features/<sae>/
      encoding.json              manifest: SAE, model, layer, tokenization, row counts, files, config, complete
      acts/bucket-00000.parquet  non-zero activations (row int64, feature int32, value float32) of features
      acts/bucket-00001.parquet  [k * bucket_features, (k + 1) * bucket_features), sorted by feature, then
      ...                        value descending, then row; small row groups (min/max stats prune lookups)
      stats.parquet              per feature over ALL token rows (zeros included): feature, n_active,
                                 frequency, mean, max, variance (population)
      spill/                     temporary, only while encoding (resumable state)

Two phases, bounded memory and resumable:

1. **Spill**: stream the layer in blocks of ``batch_rows``; encode each block with
   the SAE, take the non-zeros in feature-major order and append them to one in-memory
   buffer per feature bucket. When the buffers hold ``spill_entries`` entries, each
   bucket's buffer is written as ``spill/bXXXXX/rSTART.parquet`` and
   ``spilled_rows`` is committed in ``encoding.json``. A killed run restarts at
   ``spilled_rows`` (later spill files are stale and dropped).
2. **Sort**: bucket by bucket, read its spill files, sort by (feature, value desc,
   row), compute the bucket's feature statistics, and write the final bucket file.
   Finished buckets are recorded in ``encoding.json``; then ``stats.parquet`` is
   written, ``spill/`` removed, and the manifest marked complete.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import __version__
from .errors import ConfigError, NotFoundError, StoreError

if TYPE_CHECKING:
    from .sae import SAE
    from .store import Store

ENCODING_FORMAT = 1
MANIFEST = "encoding.json"
ACTS_SCHEMA = pa.schema([("row", pa.int64()), ("feature", pa.int32()), ("value", pa.float32())])
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
    return f"features/{sae}"


@dataclass
class EncodeConfig:
    """Everything one ``actstore encode`` run needs."""

    sae: str
    """Name of the SAE under STORE/saes/ (it names its model and layer)."""
    batch_rows: int = 8192
    """Token rows per SAE forward pass."""
    n_buckets: int = 16
    """Feature-range buckets (files); more buckets = less memory while sorting."""
    spill_entries: int = 4_000_000
    """Non-zero activations buffered in memory before they are spilled to disk."""
    row_group_rows: int = 16384
    """Rows per Parquet row group of the final files (a feature lookup reads only its own groups)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when present)."""
    overwrite: bool = False
    """Re-encode from scratch even if a complete or differently-configured encoding exists."""

    def __post_init__(self) -> None:
        if not self.sae:
            raise ConfigError("encode needs --sae NAME: the SAE to run (see actstore info)")
        for name in ("batch_rows", "n_buckets", "spill_entries", "row_group_rows"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass
class EncodeResult:
    """What an encode run did."""

    store: str
    sae: str
    model: str
    layer: int
    n_rows: int
    """Token rows encoded."""
    n_feature_rows: int
    """Non-zero (row, feature, value) entries written."""
    n_bytes: int
    """Bytes of the final acts/*.parquet files."""
    seconds: float
    rows_per_s: float
    resumed_from: int = 0
    """Token row the spill phase restarted at (0 for a fresh run)."""
    skipped: bool = False
    """True when a complete encoding already existed and nothing was done."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent reading, encoding, spilling and sorting."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _auto_device(device: str) -> str:
    from .extract import auto_device

    return auto_device(device)


def sae_fingerprint(store: Store, name: str) -> str:
    """sha256 of the SAE's weights file (an encoding is valid only for these weights)."""
    return hashlib.sha256(store.loc.read_bytes(f"saes/{name}/sae.safetensors")).hexdigest()


def read_manifest(store: Store, sae: str) -> dict[str, Any] | None:
    """The ``encoding.json`` of an SAE's feature table, or None if it was never encoded."""
    import json

    key = f"{features_dir(sae)}/{MANIFEST}"
    if not store.loc.exists(key):
        return None
    return json.loads(store.loc.read_bytes(key))


def _write_manifest(store: Store, sae: str, man: dict[str, Any]) -> None:
    import json

    man["updated"] = _now()
    store.loc.write_bytes(f"{features_dir(sae)}/{MANIFEST}", json.dumps(man, indent=2, sort_keys=True).encode())


def _rm(store: Store, key: str) -> None:
    path = store.loc.fs_path(key)
    if store.loc.fs.exists(path):
        store.loc.fs.rm(path, recursive=True)


def _write_parquet(store: Store, key: str, table: pa.Table, **kw: Any) -> int:
    with store.loc.open_output(key) as f:
        pq.write_table(table, f, **kw)
    return int(store.loc.fs.size(store.loc.fs_path(key)))


def _read_parquet(store: Store, key: str) -> pa.Table:
    if store.loc.local:
        return pq.read_table(store.loc.join(key))
    return pq.read_table(store.loc.fs_path(key), filesystem=store.loc.fs)


def check_sae_layer(store: Store, sae: SAE, name: str) -> tuple[str, int]:
    """``(model, layer)`` an SAE reads, checked against the store (width, tokenization, completeness)."""
    cfg = sae.cfg
    if cfg.model is None or cfg.layer is None:
        raise ConfigError(f"SAE {name!r} has no model/layer in its cfg.json: it cannot be matched to the store's rows")
    acts = store.activations(cfg.model, cfg.layer)
    if acts.d_model != cfg.d_in:
        raise ConfigError(f"SAE {name!r} reads {cfg.d_in}-wide vectors but {cfg.model} layer {cfg.layer} is {acts.d_model} wide")
    tk = store.model_info(cfg.model).get("tokenization")
    if cfg.tokenization and tk and cfg.tokenization != tk:
        raise ConfigError(f"SAE {name!r} was trained on tokenization {cfg.tokenization}, but {cfg.model} uses {tk}")
    if not acts.attrs.get("complete"):
        raise StoreError(
            f"{cfg.model} layer {cfg.layer} in {store.url} is incomplete ({acts.n_rows} of {acts.attrs.get('n_rows')} rows): "
            "finish it with the same actstore extract command, then encode"
        )
    return cfg.model, int(cfg.layer)


# ---------------------------------------------------------------- phase 1
def nonzero_feature_major(acts: np.ndarray, row0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-zeros of ``acts (n, d_sae)`` as ``(feature int32, row int64, value float32)``, ordered by feature then row."""
    feat, r = np.nonzero(acts.T)  # acts.T (d_sae, n): row-major nonzero = feature-major
    return feat.astype(np.int32), r.astype(np.int64) + row0, acts[r, feat]


class _Spiller:
    """Per-bucket buffers of (row, feature, value) entries, written as Parquet when full."""

    def __init__(self, store: Store, base: str, n_buckets: int, bucket_features: int) -> None:
        self.store, self.base = store, base
        self.n_buckets, self.bucket_features = n_buckets, bucket_features
        self.bufs: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(n_buckets)]
        self.n_buffered = 0

    def add(self, feat: np.ndarray, row: np.ndarray, value: np.ndarray) -> None:
        # feat is sorted: cut it at the bucket edges
        edges = np.searchsorted(feat, np.arange(1, self.n_buckets) * self.bucket_features)
        bounds = np.concatenate([[0], edges, [feat.size]])
        for b in range(self.n_buckets):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            if hi > lo:
                self.bufs[b].append((row[lo:hi], feat[lo:hi], value[lo:hi]))
        self.n_buffered += feat.size

    def flush(self, start: int) -> None:
        """Write every bucket's buffer as ``spill/bXXXXX/r<start>.parquet``."""
        for b, parts in enumerate(self.bufs):
            if not parts:
                continue
            cols = [np.concatenate([p[i] for p in parts]) for i in range(3)]
            table = pa.Table.from_arrays([pa.array(c) for c in cols], schema=ACTS_SCHEMA)
            _write_parquet(self.store, f"{self.base}/spill/b{b:05d}/r{start:012d}.parquet", table, compression="lz4")
        self.bufs = [[] for _ in range(self.n_buckets)]
        self.n_buffered = 0


def _spill_files(store: Store, base: str, bucket: int) -> list[tuple[int, str]]:
    """``(start row, key)`` of a bucket's spill files, by start row."""
    path = store.loc.fs_path(f"{base}/spill/b{bucket:05d}")
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in store.loc.fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    out = [(int(n[1:13]), f"{base}/spill/b{bucket:05d}/{n}") for n in names if n.startswith("r") and n.endswith(".parquet")]
    return sorted(out)


# ---------------------------------------------------------------- phase 2
def _desc_float_key(value: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is ``value``'s descending order (any sign)."""
    bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
    asc = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    return ~asc


def sort_entries(row: np.ndarray, feat: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Permutation ordering entries by feature, then value descending, then row (entries come in row order)."""
    key = (feat.astype(np.uint64) << np.uint64(32)) | _desc_float_key(value).astype(np.uint64)
    order = np.argsort(key, kind="stable")  # stable: ties keep row order
    return order


def feature_stats(feat: np.ndarray, value: np.ndarray, f0: int, f1: int, n_rows: int) -> pa.Table:
    """Statistics of features ``[f0, f1)`` over ``n_rows`` token rows from their non-zero entries.

    ``feat`` / ``value`` must be sorted by feature, then value descending (see :func:`sort_entries`).
    """
    n_feat = f1 - f0
    idx = feat.astype(np.int64) - f0
    v64 = value.astype(np.float64)
    count = np.bincount(idx, minlength=n_feat)
    s1 = np.bincount(idx, weights=v64, minlength=n_feat)
    s2 = np.bincount(idx, weights=v64 * v64, minlength=n_feat)
    first = np.searchsorted(idx, np.arange(n_feat))  # entries are sorted by feature, value descending
    vmax = np.where(count > 0, v64[np.minimum(first, max(idx.size - 1, 0))] if idx.size else 0.0, -np.inf)
    vmax = np.where(count < n_rows, np.maximum(vmax, 0.0), vmax)  # rows without the feature count as 0
    n = max(n_rows, 1)
    mean = s1 / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(f0, f1, dtype=np.int32)),
            pa.array(count.astype(np.int64)),
            pa.array(count / n),
            pa.array(mean),
            pa.array(vmax.astype(np.float32)),
            pa.array(var),
        ],
        schema=STATS_SCHEMA,
    )


def _sort_bucket(store: Store, base: str, b: int, f0: int, f1: int, n_rows: int, row_group_rows: int) -> dict[str, Any]:
    """Sort one bucket's spill files into ``acts/bucket-b.parquet`` and its stats; returns its file entry."""
    files = [k for _, k in _spill_files(store, base, b)]
    t = pa.concat_tables([_read_parquet(store, k) for k in files]) if files else ACTS_SCHEMA.empty_table()
    row = t.column("row").to_numpy()
    feat = t.column("feature").to_numpy()
    value = t.column("value").to_numpy()
    del t
    order = sort_entries(row, feat, value)
    row, feat, value = row[order], feat[order], value[order]
    del order
    out = pa.Table.from_arrays([pa.array(row), pa.array(feat), pa.array(value)], schema=ACTS_SCHEMA)
    name = f"bucket-{b:05d}.parquet"
    n_bytes = _write_parquet(
        store, f"{base}/acts/{name}", out, row_group_size=row_group_rows, compression="zstd", write_statistics=True
    )
    _write_parquet(store, f"{base}/spill/stats-{b:05d}.parquet", feature_stats(feat, value, f0, f1, n_rows))
    return {"file": name, "feature_start": f0, "feature_stop": f1, "n_rows": int(row.size), "n_bytes": n_bytes}


# ---------------------------------------------------------------- driver
def encode(store: Store, cfg: EncodeConfig, progress: bool = True) -> EncodeResult:
    """Encode every token row of the SAE's (model, layer) into ``STORE/features/<sae>/`` (resumable).

    ``store`` must be opened writable (``open_store(path, writable=True)``).
    """
    from tqdm.auto import tqdm

    from .sae import load_sae

    t_start = time.perf_counter()
    if not store.writable:
        raise StoreError(f"{store.url} was opened read-only: open it with open_store(path, writable=True) to encode")
    device = _auto_device(cfg.device)
    sae = load_sae(store, cfg.sae, device=device).eval()
    model, layer = check_sae_layer(store, sae, cfg.sae)
    acts = store.activations(model, layer)
    n_rows, d_sae = acts.n_rows, sae.cfg.d_sae
    n_buckets = min(cfg.n_buckets, d_sae)
    bucket_features = -(-d_sae // n_buckets)
    n_buckets = -(-d_sae // bucket_features)
    base = features_dir(cfg.sae)
    sha = sae_fingerprint(store, cfg.sae)
    layout = {"n_rows": n_rows, "d_sae": d_sae, "n_buckets": n_buckets, "bucket_features": bucket_features, "sae_sha256": sha}

    man = read_manifest(store, cfg.sae)
    if man is not None and not cfg.overwrite:
        if any(man.get(k) != v for k, v in layout.items()) or man.get("row_group_rows") != cfg.row_group_rows:
            what = "is complete" if man.get("complete") else "was started"
            raise StoreError(
                f"an encoding of SAE {cfg.sae!r} in {store.url}/{base} {what} with other weights, rows or settings: "
                "pass --overwrite to re-encode"
            )
        if man.get("complete"):
            return EncodeResult(store.url, cfg.sae, model, layer, n_rows, int(man["n_feature_rows"]), int(man["n_bytes"]),
                                0.0, 0.0, skipped=True)  # fmt: skip
    if man is None or cfg.overwrite:
        _rm(store, base)
        man = {
            "format": ENCODING_FORMAT, "sae": cfg.sae, "model": model, "layer": layer,
            "tokenization": store.model_info(model).get("tokenization"), **layout,
            "row_group_rows": cfg.row_group_rows, "config": asdict(cfg), "sae_config": asdict(sae.cfg),
            "actstore_version": __version__, "created": _now(), "phase": "spill", "spilled_rows": 0,
            "sorted_buckets": [], "files": [], "complete": False,
        }  # fmt: skip
        _write_manifest(store, cfg.sae, man)

    timings = {"read": 0.0, "encode": 0.0, "nonzero": 0.0, "spill": 0.0, "sort": 0.0}
    resumed_from = int(man["spilled_rows"])
    if man["phase"] == "spill":
        start = resumed_from
        for b in range(n_buckets):  # drop spill files a killed run wrote past the committed prefix
            for s, key in _spill_files(store, base, b):
                if s >= start:
                    _rm(store, key)
        spiller = _Spiller(store, base, n_buckets, bucket_features)
        seg_start = start
        bar = tqdm(total=n_rows, initial=start, desc=f"encode {cfg.sae}", unit="tok", unit_scale=True, disable=not progress)
        pin = device.startswith("cuda")
        t0 = time.perf_counter()
        with torch.inference_mode():
            for chunk in acts.iter_chunks(start=start, rows=cfg.batch_rows, prefetch=2):
                t1 = time.perf_counter()
                timings["read"] += t1 - t0
                x = torch.from_numpy(chunk.values)  # (rows, d_model)
                if pin:
                    x = x.pin_memory().to(device, non_blocking=True)
                h = sae.encode(x).float().cpu().numpy()  # (rows, d_sae)
                t2 = time.perf_counter()
                feat, row, value = nonzero_feature_major(h, chunk.start)
                spiller.add(feat, row, value)
                t3 = time.perf_counter()
                timings["encode"] += t2 - t1
                timings["nonzero"] += t3 - t2
                if spiller.n_buffered >= cfg.spill_entries or chunk.stop >= n_rows:
                    spiller.flush(seg_start)
                    seg_start = chunk.stop
                    man["spilled_rows"] = chunk.stop
                    _write_manifest(store, cfg.sae, man)
                timings["spill"] += time.perf_counter() - t3
                bar.update(chunk.stop - chunk.start)
                t0 = time.perf_counter()
        bar.close()
        man["phase"] = "sort"
        _write_manifest(store, cfg.sae, man)

    t_sort = time.perf_counter()
    done = set(man["sorted_buckets"])
    files = {f["file"]: f for f in man["files"]}
    for b in range(n_buckets):
        if b in done:
            continue
        f0, f1 = b * bucket_features, min((b + 1) * bucket_features, d_sae)
        entry = _sort_bucket(store, base, b, f0, f1, n_rows, cfg.row_group_rows)
        files[entry["file"]] = entry
        man["files"] = sorted(files.values(), key=lambda e: e["feature_start"])
        man["sorted_buckets"] = sorted(done | {b})
        done.add(b)
        _write_manifest(store, cfg.sae, man)
        _rm(store, f"{base}/spill/b{b:05d}")
    stats = [_read_parquet(store, f"{base}/spill/stats-{b:05d}.parquet") for b in range(n_buckets)]
    _write_parquet(store, f"{base}/stats.parquet", pa.concat_tables(stats), compression="zstd")
    _rm(store, f"{base}/spill")
    timings["sort"] = time.perf_counter() - t_sort
    man.update(
        phase="done", complete=True, n_feature_rows=sum(f["n_rows"] for f in man["files"]),
        n_bytes=sum(f["n_bytes"] for f in man["files"]), finished=_now(),
    )  # fmt: skip
    _write_manifest(store, cfg.sae, man)
    secs = time.perf_counter() - t_start
    return EncodeResult(
        store.url, cfg.sae, model, layer, n_rows, int(man["n_feature_rows"]), int(man["n_bytes"]), secs,
        (n_rows - resumed_from) / secs if secs > 0 else 0.0, resumed_from=resumed_from, timings=timings,
    )  # fmt: skip


def encoded_saes(store: Store) -> list[str]:
    """Names of the SAEs whose feature table is completely encoded in the store."""
    out = []
    for name in store.loc.list_dirs("features"):
        man = read_manifest(store, name)
        if man and man.get("complete"):
            out.append(name)
    return out


def encoding(store: Store, sae: str) -> dict[str, Any]:
    """The complete encoding manifest of ``sae``, or a NotFoundError saying how to make it."""
    man = read_manifest(store, sae)
    if not man or not man.get("complete"):
        state = "is not finished" if man else "does not exist"
        raise NotFoundError(
            f"the feature table of SAE {sae!r} in {store.url} {state}: run actstore encode {store.url} --sae {sae}"
        )
    return man
