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

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from actstore.clock import now
from actstore.encoding.sort import Bucket, Entries, Spiller, finish_bucket, sort_block, spill_files
from actstore.encoding.table import (
    ENCODING_FORMAT,
    MANIFEST,
    PENDING,
    features_dir,
    files_dir,
    generations,
    read_manifest,
    read_pending,
    rm,
    sae_fingerprint,
    write_manifest,
    write_parquet,
)
from actstore.errors import ConfigError, IntegrityError, StoreError
from actstore.format import layout
from actstore.models.loading import auto_device
from actstore.storage.integrity import update_manifest
from actstore.storage.location import check_name
from actstore.storage.locks import StoreLock
from actstore.version import __version__

if TYPE_CHECKING:
    from actstore.sae.model import SAE
    from actstore.store.reader import Store


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


def check_sae_layer(store: Store, sae: SAE, name: str) -> tuple[str, int]:
    """``(model, layer)`` an SAE reads, checked against the store (width, tokenization, completeness)."""
    from actstore.sae.model import check_fits

    cfg = sae.cfg
    acts = check_fits(store, cfg, name)
    if not acts.attrs.get("complete"):
        raise StoreError(
            f"{cfg.model} layer {cfg.layer} in {store.url} is incomplete ({acts.n_rows} of {acts.attrs.get('n_rows')} rows): "
            "finish it with the same actstore extract command, then encode"
        )
    return cfg.model, int(cfg.layer)


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


class _Sink:
    """Takes each encoded block in row order: sorts it into the spiller, spills and commits at the memory budget."""

    def __init__(self, store: Store, cfg: EncodeConfig, man: dict[str, Any], spiller: Spiller, n_rows: int, start: int,
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
                write_manifest(self.store, self.cfg.sae, self.man, PENDING)
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
    from actstore.sae.files import load_sae

    device = auto_device(cfg.device)
    sae = load_sae(store, cfg.sae, device=device).eval()
    model, layer = check_sae_layer(store, sae, cfg.sae)
    lock = StoreLock(store.loc, features_dir(cfg.sae), f"encode {cfg.sae}", cfg.break_lock).acquire()
    try:
        return _encode(store, cfg, sae, model, layer, device, progress)
    finally:
        lock.release()


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
            rm(store, f"{base}/{key}")
        published = None
    try:
        man = read_pending(store, cfg.sae)
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
        gens = generations(store, base)
        keep = (published or {}).get("dir")
        for g in gens:  # earlier unfinished generations (never the published one)
            if layout.generation_name(g) != keep:
                rm(store, f"{base}/{layout.generation_name(g)}")
        man = {
            "format": ENCODING_FORMAT, "sae": cfg.sae, "model": model, "layer": layer,
            "tokenization": store.model_info(model).get("tokenization"), **want,
            "config": asdict(cfg), "sae_config": asdict(sae.cfg),
            "actstore_version": __version__, "created": now(), "phase": "spill", "spilled_rows": 0,
            "files": [], "complete": False, "dir": layout.generation_name(max(gens, default=0) + 1),
        }  # fmt: skip
        write_manifest(store, cfg.sae, man, PENDING)
    assert man is not None
    work = files_dir(cfg.sae, man)

    timings = {"read": 0.0, "encode": 0.0, "sort": 0.0, "spill": 0.0, "stream": 0.0, "finish": 0.0}
    start = resumed_from = int(man["spilled_rows"])
    for b in range(n_buckets):  # drop spill files a killed run wrote past the committed prefix
        for s, key in spill_files(store, work, b):
            if s >= start:
                store.loc.delete(key)
    sink = _Sink(store, cfg, man, Spiller(store, work, n_buckets, bucket_features), n_rows, start, timings)
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

    def finish(b: int) -> Bucket:
        runs, held[b] = held[b], []
        f0, f1 = b * bucket_features, min((b + 1) * bucket_features, d_sae)
        return finish_bucket(store, work, b, f0, f1, n_rows, cfg.row_group_rows, runs)

    if cfg.workers > 1:
        with ThreadPoolExecutor(cfg.workers, thread_name_prefix="actstore-encode") as fpool:
            done = list(fpool.map(finish, range(n_buckets)))
    else:
        done = [finish(b) for b in range(n_buckets)]
    files, stats = [d.entry for d in done], [d.stats for d in done]
    write_parquet(store, f"{work}/stats.parquet", pa.concat_tables(stats), compression="zstd")
    rm(store, f"{work}/spill")
    man.update(
        phase="done", complete=True, files=files, n_feature_rows=sum(f["n_rows"] for f in files),
        n_bytes=sum(f["n_bytes"] for f in files), finished=now(),
    )  # fmt: skip
    write_manifest(store, cfg.sae, man)  # the atomic switch: readers see the new encoding from here on
    store.loc.delete(f"{base}/{PENDING}")
    if published is not None:  # the replaced generation (or the files of an encoding from before generations)
        if published.get("dir") and published["dir"] != man["dir"]:
            rm(store, f"{base}/{published['dir']}")
        elif not published.get("dir"):
            rm(store, f"{base}/acts")
            rm(store, f"{base}/stats.parquet")
    update_manifest(store.loc, prefixes=[base])  # checksums for the new files (actstore verify)
    timings["finish"] = time.perf_counter() - t_fin
    secs = time.perf_counter() - t_start
    return EncodeResult(
        store.url, cfg.sae, model, layer, n_rows, int(man["n_feature_rows"]), int(man["n_bytes"]), secs,
        (n_rows - resumed_from) / secs if secs > 0 else 0.0, resumed_from=resumed_from, n_spills=sink.n_spills,
        timings=timings,
    )  # fmt: skip
