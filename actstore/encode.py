"""Encode stage: run a saved SAE over every token row of its (model, layer) into a Parquet feature table.

Output layout (under the store, one folder per SAE)::

    STORE/features/<sae>/
      encoding.json              the published encoding: SAE, model, layer, tokenization, row counts, files,
                                 config, complete, and ``dir``, the generation folder holding its files
      pending.json               only while an encoding is being made: its state (resumable)
      gen-<N>/                   one generation of files (encodings before ``dir`` existed keep them at the top)
        acts/bucket-00000.parquet  non-zero activations (row int64, feature int32, value float32) of features
        acts/bucket-00001.parquet  [k * bucket_features, (k + 1) * bucket_features), sorted by feature, then
        ...                        value descending, then row; small row groups (min/max stats prune lookups)
        stats.parquet              per feature over ALL token rows (zeros included): feature, n_active,
                                   frequency, mean, max, variance (population)
        spill/                     temporary, only while encoding

One writer at a time: an encode holds the lock ``locks/features/<sae>.lock`` (a second run of the same
SAE is refused, naming the holder). A new encoding (``--overwrite``, or other weights) is made in a new
generation folder; ``encoding.json`` is replaced by one atomic write when it is complete, and only then
are the old generation's files removed. So a failed or killed run never costs the encoding that was there.

Bounded memory, resumable, and no dense pass over the SAE output:

1. **Stream**: read the layer in blocks of ``batch_rows``; the SAE's top-k (or the non-zeros
   of its activation) give each block's entries directly (:func:`sparse_encode`). In a
   background thread (while the next block is encoded) each block is sorted by (feature,
   value desc, row) with one vectorised sort of packed uint64 keys (:func:`sort_block`) and
   cut at the bucket edges into per-bucket runs held in memory. When the runs hold
   ``spill_entries`` entries, each bucket's runs are written to ``spill/bXXXXX/rSTART.parquet``
   and ``spilled_rows`` is committed in ``encoding.json``. A killed run restarts at
   ``spilled_rows`` (later spill files are stale and dropped).
2. **Finish**: per bucket (``workers`` at a time), merge its spill files with its runs still
   in memory (:func:`merge_runs`), compute its feature statistics and write the final bucket
   file. Then ``stats.parquet`` is written, the manifest marked complete and ``spill/``
   removed. The last segment is never spilled, so when everything fits in ``spill_entries``
   nothing touches the disk but the final files; a run killed while finishing restarts at
   ``spilled_rows``.

Memory: about 16 bytes x ``spill_entries`` for the runs, plus ~60 bytes per entry of the
``workers`` buckets being finished (more ``n_buckets`` = smaller buckets).

Final files use dictionary encoding for ``feature``, DELTA_BINARY_PACKED for ``row`` and
BYTE_STREAM_SPLIT for ``value`` under zstd (about 4 bytes per entry).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import layout
from .clock import now
from .errors import ConfigError, IntegrityError, StoreError
from .integrity import check_file, update_manifest
from .location import check_key, check_name, name_ok
from .locks import StoreLock
from .models import auto_device
from .version import __version__

if TYPE_CHECKING:
    from .sae import SAE
    from .store import Store

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
SPILL_PARQUET: dict[str, Any] = {**ACTS_PARQUET, "compression": "lz4", "write_statistics": False, "row_group_size": 1 << 20}
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


@dataclass
class EncodeConfig:
    """Everything one ``actstore encode`` run needs."""

    sae: str
    """Name of the SAE under STORE/saes/ (it names its model and layer)."""
    batch_rows: int = 8192
    """Token rows per SAE forward pass."""
    n_buckets: int = 16
    """Feature-range buckets (files); more buckets = less memory while sorting."""
    spill_entries: int = 16_000_000
    """Non-zero activations held in memory (16 bytes each) before they are spilled to disk as sorted runs."""
    row_group_rows: int = 16384
    """Rows per Parquet row group of the final files (a feature lookup reads only its own groups)."""
    workers: int = 2
    """Threads: blocks are sorted while the next is encoded, and this many buckets are finished at once (1 = none)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when present)."""
    overwrite: bool = False
    """Re-encode from scratch even if a complete or differently-configured encoding exists."""
    break_lock: bool = False
    """Take over the encode lock of a writer that died on another host."""

    def __post_init__(self) -> None:
        if not self.sae:
            raise ConfigError("encode needs --sae NAME: the SAE to run (see actstore info)")
        for name in ("batch_rows", "n_buckets", "spill_entries", "row_group_rows", "workers"):
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
    n_spills: int = 0
    """Times the in-memory runs were spilled to disk (0: everything fit in ``spill_entries``)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent reading, encoding (SAE forward), sorting blocks, spilling, and finishing the files."""


def sae_fingerprint(store: Store, name: str) -> str:
    """sha256 of the SAE's weights file (an encoding is valid only for these weights)."""
    return hashlib.sha256(store.loc.read_bytes(layout.sae_file(name, layout.SAE_WEIGHTS))).hexdigest()


def files_dir(sae: str, man: dict[str, Any]) -> str:
    """Store key of the folder holding an encoding's ``acts/`` and ``stats.parquet``."""
    return layout.generation_dir(sae, man.get("dir"))


def _load_json(store: Store, key: str) -> dict[str, Any] | None:
    import json

    if not store.loc.exists(key):
        return None
    raw = store.loc.read_bytes(key)
    check_file(store.loc, key, raw)
    try:
        man = json.loads(raw)
        if not isinstance(man, dict):
            raise TypeError
        return man
    except (ValueError, TypeError):
        raise IntegrityError(f"{key} in store {store.url} is not valid JSON: re-encode with --overwrite") from None


def _checked(store: Store, key: str, man: dict[str, Any]) -> dict[str, Any]:
    """An encoding manifest whose numbers and file names are sound (IntegrityError if not)."""

    def bad(what: str) -> IntegrityError:
        return IntegrityError(f"{key} in store {store.url}: {what}; it is damaged or was edited: re-encode with --overwrite")

    for name in ("n_rows", "d_sae", "layer", "spilled_rows", "n_feature_rows", "n_bytes"):
        v = man.get(name, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"{name} is {v!r}, not a non-negative integer")
    if not isinstance(man.get("files", []), list):
        raise bad("files is not a list")
    for f in man.get("files", []):
        try:
            if "/" in str(f["file"]):
                raise ValueError
            check_key(str(f["file"]))
            lo, hi = int(f["feature_start"]), int(f["feature_stop"])
            if not 0 <= lo <= hi <= int(man.get("d_sae", 0)):
                raise ValueError
        except (KeyError, TypeError, ValueError, StoreError):
            raise bad(f"file entry {f!r} is not a bucket of features in 0..d_sae") from None
    d = man.get("dir")
    if d is not None and layout.parse_generation(d) is None:
        raise bad(f"dir {d!r} is not a generation folder {layout.GENERATION_PREFIX}N")
    return man


def read_manifest(store: Store, sae: str, name: str = MANIFEST) -> dict[str, Any] | None:
    """The published ``encoding.json`` of an SAE's feature table (or, with ``name=PENDING``, the state of the
    encoding being made), checked; None if there is none."""
    key = f"{features_dir(sae)}/{name}"
    man = _load_json(store, key)
    return None if man is None else _checked(store, key, man)


def _read_pending(store: Store, sae: str) -> dict[str, Any] | None:
    return read_manifest(store, sae, PENDING)


def _write_manifest(store: Store, sae: str, man: dict[str, Any], name: str = MANIFEST) -> None:
    import json

    man["updated"] = now()
    store.loc.write_bytes(f"{features_dir(sae)}/{name}", json.dumps(man, indent=2, sort_keys=True).encode())


def _rm(store: Store, key: str) -> None:
    store.loc.rmtree(key)


def _write_parquet(store: Store, key: str, table: pa.Table, **kw: Any) -> int:
    with store.loc.open_output(key) as f:
        pq.write_table(table, f, **kw)
    return store.loc.size(key)


def _read_parquet(store: Store, key: str) -> pa.Table:
    if store.loc.local:
        return pq.read_table(store.loc.join(key))
    return pq.read_table(store.loc.fs_path(key), filesystem=store.loc.fs)


def check_sae_layer(store: Store, sae: SAE, name: str) -> tuple[str, int]:
    """``(model, layer)`` an SAE reads, checked against the store (width, tokenization, completeness)."""
    from .sae import check_fits

    cfg = sae.cfg
    acts = check_fits(store, cfg, name)
    if not acts.attrs.get("complete"):
        raise StoreError(
            f"{cfg.model} layer {cfg.layer} in {store.url} is incomplete ({acts.n_rows} of {acts.attrs.get('n_rows')} rows): "
            "finish it with the same actstore extract command, then encode"
        )
    return cfg.model, int(cfg.layer)


# ---------------------------------------------------------------- phase 1: sparse forward
class Entries(NamedTuple):
    """Non-zero activations ``(row, feature, value)``, three aligned ``(nnz,)`` arrays."""

    row: np.ndarray
    """int64 token rows."""
    feature: np.ndarray
    """int32 feature indices."""
    value: np.ndarray
    """float32 activations (non-zero)."""


def sparse_encode(sae: SAE, x: torch.Tensor) -> Entries:
    """The non-zero activations of ``sae.encode(x)`` for ``x (n, d_in)``, rows local to the block, in any order.

    Same values as the dense ``sae.encode`` (its ``activate``), without making and scanning the dense
    ``(n, d_sae)`` matrix for top-k SAEs: the top-k (values, indices) are the entries already. Only
    ``(n, k)`` values and indices come back from an accelerator.
    """
    pre = sae.pre_acts(x)  # (n, d_sae)
    arch, k = sae.cfg.arch, sae.cfg.k
    if arch == "topk" or (arch == "batchtopk" and float(sae.threshold) <= 0):
        # the same selection as SAE.activate: torch's CPU top-k picks the same k entries sorted or not
        vals, idx = pre.topk(int(k), dim=-1, sorted=False)  # type: ignore[arg-type]  # (n, k)
        vals, idx = vals.float().cpu().numpy().ravel(), idx.cpu().numpy().ravel()
        keep = vals > 0  # ReLU: the dense encode stores relu(value), so non-positive picks are zeros
        local = np.repeat(np.arange(pre.shape[0], dtype=np.int64), int(k))  # type: ignore[arg-type]
        return Entries(local[keep], idx[keep].astype(np.int32), vals[keep])
    h = sae.activate(pre, train=False)  # (n, d_sae)
    r, f = torch.nonzero(h, as_tuple=True)
    return Entries(r.cpu().numpy(), f.to(torch.int32).cpu().numpy(), h[r, f].float().cpu().numpy())


def _desc_float_key(value: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is ``value``'s descending order (any sign)."""
    bits = np.ascontiguousarray(value, dtype=np.float32).view(np.uint32)
    asc = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    return ~asc


def _value_of_desc_key(desc: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_desc_float_key`: float32 values of uint32 keys."""
    asc = ~np.asarray(desc, dtype=np.uint32)
    sign = np.uint32(0x80000000)
    return np.where(asc & sign, asc ^ sign, ~asc).astype(np.uint32).view(np.float32)


def sort_entries(row: np.ndarray, feat: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Permutation ordering entries by feature, then value descending, then row (entries come in row order).

    A stable sort on one uint64 key: ties keep their (row) order, and runs that are sorted already
    (blocks, spill files) are merged rather than re-sorted.
    """
    key = (feat.astype(np.uint64) << np.uint64(32)) | _desc_float_key(value).astype(np.uint64)
    return np.argsort(key, kind="stable")


def sort_rows(e: Entries) -> Entries:
    """Entries sorted by (feature, value desc, row); ties in the fallback keep the input (row) order.

    When feature and row (relative to their minimum) and the value fit in 64 bits, they are packed
    into unique uint64 keys, sorted with numpy's vectorised (SIMD) sort and unpacked: no permutation,
    no gather. Else a stable argsort of (feature, value) keys, which merges runs sorted already.
    """
    if e.row.size < 2:
        return e
    f_lo, r_lo = int(e.feature.min()), int(e.row.min())
    fb, rb = (int(e.feature.max()) - f_lo).bit_length(), (int(e.row.max()) - r_lo).bit_length()
    if fb + 32 + rb > 64:
        order = sort_entries(e.row, e.feature, e.value)
        return Entries(e.row[order], e.feature[order], e.value[order])
    key = (e.feature - f_lo).astype(np.uint64) << np.uint64(32 + rb)
    key |= _desc_float_key(e.value).astype(np.uint64) << np.uint64(rb)
    key |= (e.row - r_lo).astype(np.uint64)
    key.sort()
    return Entries(
        (key & np.uint64((1 << rb) - 1)).astype(np.int64) + r_lo,
        (key >> np.uint64(32 + rb)).astype(np.int32) + np.int32(f_lo),
        _value_of_desc_key((key >> np.uint64(rb)).astype(np.uint32)),
    )


def sort_block(e: Entries, row0: int) -> Entries:
    """One block's entries (local rows, in row order) sorted by (feature, value desc, row), rows made global."""
    return sort_rows(Entries(e.row + row0, e.feature, e.value))


def merge_runs(runs: list[Entries]) -> Entries:
    """One run sorted by (feature, value desc, row) from runs (each sorted so, or concatenations of such), in row order."""
    runs = [r for r in runs if r.row.size] or runs[:1]
    if not runs:
        return Entries(np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.float32))
    if len(runs) == 1:
        return runs[0]
    return sort_rows(Entries(*(np.concatenate([r[i] for r in runs]) for i in range(3))))


def _table(e: Entries) -> pa.Table:
    return pa.Table.from_arrays([pa.array(e.row), pa.array(e.feature), pa.array(e.value)], schema=ACTS_SCHEMA)


def _entries(t: pa.Table) -> Entries:
    return Entries(*(t.column(c).to_numpy() for c in ("row", "feature", "value")))


class _Spiller:
    """Per-bucket lists of sorted block runs; ``flush`` writes each bucket's runs to one spill file."""

    def __init__(self, store: Store, base: str, n_buckets: int, bucket_features: int) -> None:
        self.store, self.base = store, base
        self.n_buckets, self.bucket_features = n_buckets, bucket_features
        self.runs: list[list[Entries]] = [[] for _ in range(n_buckets)]
        self.n_buffered = 0

    def add(self, e: Entries) -> None:
        """Add one block's entries, sorted by feature (see :func:`sort_block`)."""
        edges = np.searchsorted(e.feature, np.arange(1, self.n_buckets) * self.bucket_features)
        bounds = np.concatenate([[0], edges, [e.feature.size]])
        for b in range(self.n_buckets):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            if hi > lo:
                self.runs[b].append(Entries(e.row[lo:hi], e.feature[lo:hi], e.value[lo:hi]))
        self.n_buffered += e.feature.size

    def take(self, b: int) -> list[Entries]:
        """Bucket ``b``'s buffered runs, removed from the buffer."""
        runs, self.runs[b] = self.runs[b], []
        self.n_buffered -= sum(r.row.size for r in runs)
        return runs

    def flush(self, start: int) -> None:
        """Write every bucket's buffer as ``spill/bXXXXX/r<start>.parquet``: its sorted runs, in row order.

        The runs are not merged here: the finish merges every run of a bucket in one sort anyway.
        """
        for b in range(self.n_buckets):
            runs = self.take(b)
            if runs:
                cat = Entries(*(np.concatenate([r[i] for r in runs]) for i in range(3)))
                _write_parquet(self.store, f"{self.base}/spill/b{b:05d}/r{start:012d}.parquet", _table(cat), **SPILL_PARQUET)
        self.n_buffered = 0


def _spill_files(store: Store, base: str, bucket: int) -> list[tuple[int, str]]:
    """``(start row, key)`` of a bucket's spill files, by start row."""
    prefix = f"{base}/spill/b{bucket:05d}"
    names = [k.rsplit("/", 1)[-1] for k in store.loc.walk(prefix)]
    out = [(int(n[1:13]), f"{prefix}/{n}") for n in names if n.startswith("r") and n.endswith(".parquet") and n[1:13].isdigit()]
    return sorted(out)


# ---------------------------------------------------------------- phase 2
def feature_stats(feat: np.ndarray, value: np.ndarray, f0: int, f1: int, n_rows: int) -> pa.Table:
    """Statistics of features ``[f0, f1)`` over ``n_rows`` token rows from their non-zero entries.

    ``feat`` / ``value`` must be sorted by feature, then value descending (see :func:`sort_entries`).
    """
    bounds = np.searchsorted(feat, np.arange(f0, f1 + 1))  # (n_feat + 1,): each feature's first entry
    count = np.diff(bounds)
    active = count > 0
    starts = bounds[:-1][active]  # consecutive non-empty segments: reduceat sums exactly each one
    v64 = value.astype(np.float64)
    s1, s2, vmax = np.zeros(f1 - f0), np.zeros(f1 - f0), np.full(f1 - f0, -np.inf)
    if starts.size:
        s1[active] = np.add.reduceat(v64, starts)
        s2[active] = np.add.reduceat(v64 * v64, starts)
        vmax[active] = v64[starts]  # value descending within a feature: its first entry is its max
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


class _Bucket(NamedTuple):
    """A finished bucket: its manifest file entry and its feature statistics."""

    entry: dict[str, Any]
    stats: pa.Table


def _finish_bucket(
    store: Store, base: str, b: int, f0: int, f1: int, n_rows: int, row_group_rows: int, held: list[Entries]
) -> _Bucket:
    """Merge bucket ``b``'s spill files and in-memory runs ``held`` (rows after them) into ``acts/bucket-b.parquet``."""
    runs = [_entries(_read_parquet(store, k)) for _, k in _spill_files(store, base, b)] + held
    e = merge_runs(runs)
    del runs, held
    name = f"bucket-{b:05d}.parquet"
    n_bytes = _write_parquet(store, f"{base}/acts/{name}", _table(e), row_group_size=row_group_rows, **ACTS_PARQUET)
    entry = {"file": name, "feature_start": f0, "feature_stop": f1, "n_rows": int(e.row.size), "n_bytes": n_bytes}
    return _Bucket(entry, feature_stats(e.feature, e.value, f0, f1, n_rows))


class _Sink:
    """Takes each encoded block in row order: sorts it into the spiller, spills and commits at the memory budget."""

    def __init__(self, store: Store, cfg: EncodeConfig, man: dict[str, Any], spiller: _Spiller, n_rows: int, start: int,
                 timings: dict[str, float]) -> None:  # fmt: skip
        self.store, self.cfg, self.man, self.spiller = store, cfg, man, spiller
        self.n_rows, self.seg_start, self.timings = n_rows, start, timings
        self.n_spills = 0
        self.failed = False
        """Set once a block failed (or the stream stopped): later blocks are dropped, nothing more is committed."""

    def absorb(self, e: Entries, start: int, stop: int) -> None:
        """Add the block of token rows ``[start, stop)`` (entries with local rows)."""
        if self.failed:
            return
        try:
            t0 = time.perf_counter()
            self.spiller.add(sort_block(e, start))
            t1 = time.perf_counter()
            self.timings["sort"] += t1 - t0
            if self.spiller.n_buffered >= self.cfg.spill_entries and stop < self.n_rows:
                # memory budget reached: spill the buffer, commit its rows (a killed run restarts here)
                self.spiller.flush(self.seg_start)
                self.n_spills += 1
                self.seg_start = stop
                self.man["spilled_rows"] = stop
                _write_manifest(self.store, self.cfg.sae, self.man, PENDING)
                self.timings["spill"] += time.perf_counter() - t1
        except BaseException:
            self.failed = True
            raise


# ---------------------------------------------------------------- driver
def encode(store: Store, cfg: EncodeConfig, progress: bool = True) -> EncodeResult:
    """Encode every token row of the SAE's (model, layer) into ``STORE/features/<sae>/`` (resumable).

    ``store`` must be opened writable (``open_store(path, writable=True)``). One encode of an SAE runs at a
    time (a second raises :class:`~actstore.errors.ConcurrencyError` naming the holder).
    """
    if store.loc.read_only:
        raise StoreError(f"{store.url} is open read-only: pass --writable (open_store(url, writable=True)) to encode into it")
    check_name(cfg.sae, "SAE")
    from .sae import load_sae

    device = auto_device(cfg.device)
    sae = load_sae(store, cfg.sae, device=device).eval()
    model, layer = check_sae_layer(store, sae, cfg.sae)
    lock = StoreLock(store.loc, features_dir(cfg.sae), f"encode {cfg.sae}", cfg.break_lock).acquire()
    try:
        return _encode(store, cfg, sae, model, layer, device, progress)
    finally:
        lock.release()


def _generations(store: Store, base: str) -> list[int]:
    return sorted(n for n in map(layout.parse_generation, store.loc.list_dirs(base)) if n is not None)


def _encode(store: Store, cfg: EncodeConfig, sae: SAE, model: str, layer: int, device: str, progress: bool) -> EncodeResult:
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    acts = store.activations(model, layer)
    n_rows, d_sae = acts.n_rows, sae.cfg.d_sae
    n_buckets = min(cfg.n_buckets, d_sae)
    bucket_features = -(-d_sae // n_buckets)
    n_buckets = -(-d_sae // bucket_features)
    base = features_dir(cfg.sae)
    sha = sae_fingerprint(store, cfg.sae)
    want = {"n_rows": n_rows, "d_sae": d_sae, "n_buckets": n_buckets, "bucket_features": bucket_features, "sae_sha256": sha,
            "row_group_rows": cfg.row_group_rows}  # fmt: skip

    def matches(m: dict[str, Any]) -> bool:
        """Whether an encoding (published or pending) was made with these weights, rows and settings."""
        return all(m.get(k) == v for k, v in want.items())

    try:
        published = read_manifest(store, cfg.sae)
    except IntegrityError:
        if not cfg.overwrite:
            raise
        published = None  # a damaged encoding is replaced; its files go once the new one is published
    if published is not None and not published.get("complete"):
        # an unfinished encoding of a version before pending.json: nothing usable, so start over
        for key in ("acts", "spill", "stats.parquet", MANIFEST):
            _rm(store, f"{base}/{key}")
        published = None
    try:
        man = _read_pending(store, cfg.sae)
    except IntegrityError:
        man = None
    same = man is not None and matches(man) and man.get("format") == ENCODING_FORMAT
    same = same and man.get("phase") == "spill" and bool(man.get("dir"))
    if published is not None and not cfg.overwrite and not same:
        if not matches(published):
            raise StoreError(
                f"an encoding of SAE {cfg.sae!r} in {store.url}/{base} is complete with other weights, rows or settings: "
                "pass --overwrite to re-encode (the old one stays until the new one is complete)"
            )
        return EncodeResult(store.url, cfg.sae, model, layer, n_rows, int(published["n_feature_rows"]),
                            int(published["n_bytes"]), 0.0, 0.0, skipped=True)  # fmt: skip
    if not same or cfg.overwrite:  # a fresh generation (an unfinished one of the same settings is resumed instead)
        gens = _generations(store, base)
        keep = (published or {}).get("dir")
        for g in gens:  # earlier unfinished generations (never the published one)
            if layout.generation_name(g) != keep:
                _rm(store, f"{base}/{layout.generation_name(g)}")
        man = {
            "format": ENCODING_FORMAT, "sae": cfg.sae, "model": model, "layer": layer,
            "tokenization": store.model_info(model).get("tokenization"), **want,
            "config": asdict(cfg), "sae_config": asdict(sae.cfg),
            "actstore_version": __version__, "created": now(), "phase": "spill", "spilled_rows": 0,
            "files": [], "complete": False, "dir": layout.generation_name(max(gens, default=0) + 1),
        }  # fmt: skip
        _write_manifest(store, cfg.sae, man, PENDING)
    assert man is not None
    work = files_dir(cfg.sae, man)

    timings = {"read": 0.0, "encode": 0.0, "sort": 0.0, "spill": 0.0, "stream": 0.0, "finish": 0.0}
    start = resumed_from = int(man["spilled_rows"])
    for b in range(n_buckets):  # drop spill files a killed run wrote past the committed prefix
        for s, key in _spill_files(store, work, b):
            if s >= start:
                store.loc.delete(key)
    sink = _Sink(store, cfg, man, _Spiller(store, work, n_buckets, bucket_features), n_rows, start, timings)
    bar = tqdm(total=n_rows, initial=start, desc=f"encode {cfg.sae}", unit="tok", unit_scale=True, disable=not progress)
    pin = device.startswith("cuda")
    # the SAE forward runs here; sorting blocks and spilling run in order in one background thread
    pool = ThreadPoolExecutor(1, thread_name_prefix="actstore-encode") if cfg.workers > 1 else None
    pending: deque[Future] = deque()
    t_stream = t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for chunk in acts.iter_chunks(start=start, rows=cfg.batch_rows, prefetch=2):
                t1 = time.perf_counter()
                timings["read"] += t1 - t0
                x = torch.from_numpy(chunk.values)  # (rows, d_model)
                if pin:
                    x = x.pin_memory().to(device, non_blocking=True)
                e = sparse_encode(sae, x)  # (nnz,) each, rows local to the chunk
                timings["encode"] += time.perf_counter() - t1
                if pool is None:
                    sink.absorb(e, chunk.start, chunk.stop)
                else:
                    pending.append(pool.submit(sink.absorb, e, chunk.start, chunk.stop))
                    while len(pending) > 1 or (pending and pending[0].done()):  # at most one block waiting
                        pending.popleft().result()
                bar.update(chunk.stop - chunk.start)
                t0 = time.perf_counter()
            while pending:
                pending.popleft().result()
    finally:
        sink.failed = sink.failed or bool(pending)  # stopped early: queued blocks must not spill or commit
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    timings["stream"] = time.perf_counter() - t_stream

    # finish: per bucket, merge its spill files (if any) with its runs still in memory, write the final file
    # (``workers`` buckets at a time). Nothing of the last segment is spilled: a run killed here restarts
    # at spilled_rows.
    t_fin = time.perf_counter()
    held = [sink.spiller.take(b) for b in range(n_buckets)]

    def finish(b: int) -> _Bucket:
        runs, held[b] = held[b], []
        f0, f1 = b * bucket_features, min((b + 1) * bucket_features, d_sae)
        return _finish_bucket(store, work, b, f0, f1, n_rows, cfg.row_group_rows, runs)

    if cfg.workers > 1:
        with ThreadPoolExecutor(cfg.workers, thread_name_prefix="actstore-encode") as fpool:
            done = list(fpool.map(finish, range(n_buckets)))
    else:
        done = [finish(b) for b in range(n_buckets)]
    files, stats = [d.entry for d in done], [d.stats for d in done]
    _write_parquet(store, f"{work}/stats.parquet", pa.concat_tables(stats), compression="zstd")
    _rm(store, f"{work}/spill")
    man.update(
        phase="done", complete=True, files=files, n_feature_rows=sum(f["n_rows"] for f in files),
        n_bytes=sum(f["n_bytes"] for f in files), finished=now(),
    )  # fmt: skip
    _write_manifest(store, cfg.sae, man)  # the atomic switch: readers see the new encoding from here on
    store.loc.delete(f"{base}/{PENDING}")
    if published is not None:  # the replaced generation (or the files of an encoding from before generations)
        if published.get("dir") and published["dir"] != man["dir"]:
            _rm(store, f"{base}/{published['dir']}")
        elif not published.get("dir"):
            _rm(store, f"{base}/acts")
            _rm(store, f"{base}/stats.parquet")
    update_manifest(store.loc, prefixes=[base])  # checksums for the new files (actstore verify)
    timings["finish"] = time.perf_counter() - t_fin
    secs = time.perf_counter() - t_start
    return EncodeResult(
        store.url, cfg.sae, model, layer, n_rows, int(man["n_feature_rows"]), int(man["n_bytes"]), secs,
        (n_rows - resumed_from) / secs if secs > 0 else 0.0, resumed_from=resumed_from, n_spills=sink.n_spills,
        timings=timings,
    )  # fmt: skip


def encoded_saes(store: Store) -> list[str]:
    """Names of the SAEs whose feature table is completely encoded in the store."""
    out = []
    for name in store.loc.list_dirs(layout.FEATURES):
        if not name_ok(name):
            continue
        man = read_manifest(store, name)
        if man and man.get("complete"):
            out.append(name)
    return out
