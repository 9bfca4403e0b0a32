"""Sorting (row, feature, value) entries into feature order out of core: runs, spills, merges, per-feature stats."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa

from actstore.encoding.table import (
    ACTS_PARQUET,
    ACTS_SCHEMA,
    SPILL_PARQUET,
    STATS_SCHEMA,
    read_parquet,
    write_parquet,
)

if TYPE_CHECKING:
    from actstore.store.reader import Store


# ---------------------------------------------------------------- phase 1: sparse forward
class Entries(NamedTuple):
    """Non-zero activations ``(row, feature, value)``, three aligned ``(nnz,)`` arrays."""

    row: np.ndarray
    """int64 token rows."""
    feature: np.ndarray
    """int32 feature indices."""
    value: np.ndarray
    """float32 activations (non-zero)."""


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
    return pa.Table.from_arrays(
        [pa.array(e.row), pa.array(e.feature), pa.array(e.value)], schema=ACTS_SCHEMA
    )


def _entries(t: pa.Table) -> Entries:
    return Entries(*(t.column(c).to_numpy() for c in ("row", "feature", "value")))


class Spiller:
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
                write_parquet(
                    self.store,
                    f"{self.base}/spill/b{b:05d}/r{start:012d}.parquet",
                    _table(cat),
                    **SPILL_PARQUET,
                )
        self.n_buffered = 0


def spill_files(store: Store, base: str, bucket: int) -> list[tuple[int, str]]:
    """``(start row, key)`` of a bucket's spill files, by start row."""
    prefix = f"{base}/spill/b{bucket:05d}"
    names = [k.rsplit("/", 1)[-1] for k in store.loc.walk(prefix)]
    out = [
        (int(n[1:13]), f"{prefix}/{n}")
        for n in names
        if n.startswith("r") and n.endswith(".parquet") and n[1:13].isdigit()
    ]
    return sorted(out)


# ---------------------------------------------------------------- phase 2
def feature_stats(feat: np.ndarray, value: np.ndarray, f0: int, f1: int, n_rows: int) -> pa.Table:
    """Statistics of features ``[f0, f1)`` over ``n_rows`` token rows from their non-zero entries.

    ``feat`` / ``value`` must be sorted by feature, then value descending (see :func:`sort_entries`).
    """
    # (n_feat + 1,): each feature's first entry
    bounds = np.searchsorted(feat, np.arange(f0, f1 + 1))
    count = np.diff(bounds)
    active = count > 0
    starts = bounds[:-1][active]  # consecutive non-empty segments: reduceat sums exactly each one
    v64 = value.astype(np.float64)
    s1, s2, vmax = np.zeros(f1 - f0), np.zeros(f1 - f0), np.full(f1 - f0, -np.inf)
    if starts.size:
        s1[active] = np.add.reduceat(v64, starts)
        s2[active] = np.add.reduceat(v64 * v64, starts)
        vmax[active] = v64[starts]  # value descending within a feature: its first entry is its max
    # rows without the feature count as 0
    vmax = np.where(count < n_rows, np.maximum(vmax, 0.0), vmax)
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


class Bucket(NamedTuple):
    """A finished bucket: its manifest file entry and its feature statistics."""

    entry: dict[str, Any]
    stats: pa.Table


def finish_bucket(
    store: Store,
    base: str,
    b: int,
    f0: int,
    f1: int,
    n_rows: int,
    row_group_rows: int,
    held: list[Entries],
) -> Bucket:
    """Merge bucket ``b``'s spill files and in-memory runs ``held`` (rows after them) into ``acts/bucket-b.parquet``."""
    runs = [_entries(read_parquet(store, k)) for _, k in spill_files(store, base, b)] + held
    e = merge_runs(runs)
    del runs, held
    name = f"bucket-{b:05d}.parquet"
    n_bytes = write_parquet(
        store, f"{base}/acts/{name}", _table(e), row_group_size=row_group_rows, **ACTS_PARQUET
    )
    entry = {
        "file": name,
        "feature_start": f0,
        "feature_stop": f1,
        "n_rows": int(e.row.size),
        "n_bytes": n_bytes,
    }
    return Bucket(entry, feature_stats(e.feature, e.value, f0, f1, n_rows))
