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
``workers`` buckets being finished. A corpus gets as many buckets as keep each under
:data:`BUCKET_ENTRIES` activations (at least ``n_buckets``), so neither grows with the corpus.

Final files use dictionary encoding for ``feature``, DELTA_BINARY_PACKED for ``row`` and
BYTE_STREAM_SPLIT for ``value`` under zstd (about 4 bytes per entry).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from actstore.clock import now
from actstore.encoding.config import EncodeConfig
from actstore.encoding.plan import Plan, make_plan
from actstore.encoding.segments import (
    SegmentJob,
    SegmentWorker,
    done_segments,
    run_segments,
    segment_rows_for,
    sparse_encode,
)
from actstore.encoding.sort import Bucket, Entries, Spiller, finish_bucket, sort_block, spill_files
from actstore.encoding.table import (
    ENCODING_FORMAT,
    MANIFEST,
    PENDING,
    features_dir,
    files_dir,
    generations,
    read_encoding,
    read_pending,
    rm,
    write_manifest,
    write_parquet,
)
from actstore.errors import IntegrityError, StoreError
from actstore.format import layout
from actstore.format.layout import check_name
from actstore.format.metadata import EncodingManifest
from actstore.models.loading import auto_device
from actstore.storage.integrity import update_manifest
from actstore.storage.locks import StoreLock
from actstore.version import __version__

if TYPE_CHECKING:
    from actstore.sae.model import SAE
    from actstore.store.reader import Store


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
    never_fired_fraction: float | None = None
    """Features that fire on no token row of the whole store (a full pass), as a fraction of d_sae."""

    @classmethod
    def of(cls, store: Store, name: str, model: str, layer: int, n_rows: int, man: EncodingManifest,
           seconds: float, resumed_from: int, **kw: Any) -> EncodeResult:  # fmt: skip
        """The result of an encoding whose manifest is ``man``, ``seconds`` after its start at row ``resumed_from``."""
        rate = (n_rows - resumed_from) / seconds if seconds > 0 else 0.0
        return cls(store.url, name, model, layer, n_rows, man.n_feature_rows, man.n_bytes, seconds, rate,
                   resumed_from=resumed_from, never_fired_fraction=man.never_fired_fraction, **kw)  # fmt: skip


def check_sae_layer(store: Store, sae: SAE, name: str) -> tuple[str, int]:
    """``(model, layer)`` an SAE reads, checked against the store (width, tokenization, completeness)."""
    from actstore.sae.model import check_fits

    cfg = sae.cfg
    acts = check_fits(store, cfg, name)
    what = ", ".join(cfg.source_labels()) if cfg.is_crosscoder else f"{cfg.model} layer {cfg.layer}"
    if not acts.complete:
        raise StoreError(
            f"{what} in {store.url} is incomplete ({acts.n_rows} of {acts.n_total} rows): "
            "finish it with the same actstore extract command, then encode"
        )
    return cfg.model, int(cfg.layer)


class _Sink:
    """Takes each encoded block in row order: sorts it into the spiller, spills and commits at the memory budget."""

    def __init__(
        self,
        store: Store,
        cfg: EncodeConfig,
        man: EncodingManifest,
        spiller: Spiller,
        n_rows: int,
        start: int,
        timings: dict[str, float],
    ) -> None:
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
                self.man.spilled_rows = stop
                write_manifest(self.store, self.cfg.sae, self.man, PENDING)
                self.timings["spill"] += time.perf_counter() - t1
        except BaseException:
            self.failed = True
            raise


# ---------------------------------------------------------------- driver
def encode(
    store: Store, cfg: EncodeConfig, progress: bool = True, ray_address: str | None = None
) -> EncodeResult:
    """Encode every token row of the SAE's (model, layer) into ``STORE/features/<sae>/`` (resumable).

    ``store`` must be opened writable (``open_store(path, writable=True)``). One encode of an SAE runs at a
    time (a second raises :class:`~actstore.errors.ConcurrencyError` naming the holder). ``ray_address``
    (``"local"``: a local Ray; else a cluster's address) encodes segments of rows, then buckets, on
    ``cfg.ray_workers`` Ray actors (:mod:`actstore.encoding.segments`); the files equal a single process's.
    """
    if store.loc.read_only:
        raise StoreError(
            f"{store.url} is open read-only: pass --writable (open_store(url, writable=True)) to encode into it"
        )
    check_name(cfg.sae, "SAE")
    from actstore.sae.files import load_sae

    # with Ray the driver only plans
    device = auto_device(cfg.device if ray_address is None else "cpu")
    sae = load_sae(store, cfg.sae, device=device).eval()
    model, layer = check_sae_layer(store, sae, cfg.sae)
    lock = StoreLock(
        store.loc, features_dir(cfg.sae), f"encode {cfg.sae}", cfg.break_lock
    ).acquire()
    try:
        return _encode(store, cfg, sae, model, layer, device, progress, ray_address)
    finally:
        lock.release()


def _encode(
    store: Store,
    cfg: EncodeConfig,
    sae: SAE,
    model: str,
    layer: int,
    device: str,
    progress: bool,
    ray_address: str | None,
) -> EncodeResult:
    from actstore.sae.model import check_fits

    t_start = time.perf_counter()
    # (model, layer), or a crosscoder's sources side by side
    acts = check_fits(store, sae.cfg, cfg.sae)
    plan = make_plan(store, cfg, sae, acts.n_rows)
    published, man = _published_and_pending(store, cfg, plan)
    if published is not None and not cfg.overwrite and man is None:
        if not plan.matches(published):
            raise StoreError(
                f"an encoding of SAE {cfg.sae!r} in {store.url}/{plan.base} is complete with other weights, rows or settings: "
                "pass --overwrite to re-encode (the old one stays until the new one is complete)"
            )
        return EncodeResult.of(
            store, cfg.sae, model, layer, plan.n_rows, published, 0.0, 0, skipped=True
        )
    if man is None or cfg.overwrite or (ray_address is not None and not man.segment_rows):
        man = _new_generation(store, cfg, sae, plan, published, model, layer)
        # fixed for the life of this encoding, so a resumed run cuts the same segments
        if ray_address is not None:
            man.segment_rows = segment_rows_for(plan.n_rows, cfg.batch_rows, cfg.ray_workers or 8)
            write_manifest(store, cfg.sae, man, PENDING)
    timings = {"read": 0.0, "encode": 0.0, "sort": 0.0, "spill": 0.0, "stream": 0.0, "finish": 0.0}
    if man.segment_rows:
        return _encode_segments(
            store, cfg, sae, plan, man, published, model, layer, device, progress, ray_address
        )
    resumed_from = man.spilled_rows
    sink = _spill_phase(store, cfg, sae, acts, plan, man, device, progress, timings)
    _finish_phase(store, cfg, plan, man, sink, published, timings)
    secs = time.perf_counter() - t_start
    return EncodeResult.of(store, cfg.sae, model, layer, plan.n_rows, man, secs, resumed_from,
                           n_spills=sink.n_spills, timings=timings)  # fmt: skip


def _encode_segments(
    store: Store,
    cfg: EncodeConfig,
    sae: SAE,
    plan: Plan,
    man: EncodingManifest,
    published: EncodingManifest | None,
    model: str,
    layer: int,
    device: str,
    progress: bool,
    ray_address: str | None,
) -> EncodeResult:
    """An encoding in segments (made with --ray, or resumed from one): segments, then buckets, on Ray workers or
    here (:mod:`actstore.encoding.segments`), then published like any other."""
    t_start = time.perf_counter()
    work = files_dir(cfg.sae, man)
    job = SegmentJob(
        store=store.loc.root if store.loc.local else store.url,
        storage_options=store.loc.storage_options,
        sae=cfg.sae,
        model=model,
        layer=layer,
        work=work,
        n_rows=plan.n_rows,
        segment_rows=int(man.segment_rows or 0),
        batch_rows=cfg.batch_rows,
        spill_entries=cfg.spill_entries,
        n_buckets=plan.n_buckets,
        bucket_features=plan.bucket_features,
        d_sae=plan.d_sae,
        row_group_rows=cfg.row_group_rows,
        device=cfg.device,
        threads=cfg.threads,
    )
    resumed_from = min(
        [s for s in job.segments() if s not in done_segments(store, work)], default=plan.n_rows
    )
    local = SegmentWorker(job, store, sae) if ray_address is None else None
    done, phase = run_segments(job, store, ray_address, cfg.ray_workers, progress, local)
    timings = {"stream": phase["segments"], "finish": phase["buckets"]}
    t_pub = time.perf_counter()
    _publish(store, cfg, plan, man, done, published)
    timings["finish"] += time.perf_counter() - t_pub
    secs = time.perf_counter() - t_start
    return EncodeResult.of(
        store, cfg.sae, model, layer, plan.n_rows, man, secs, resumed_from, timings=timings
    )


def _published_and_pending(
    store: Store, cfg: EncodeConfig, plan: Plan
) -> tuple[EncodingManifest | None, EncodingManifest | None]:
    """The published encoding (if usable) and the pending one to resume (only if it has these exact settings)."""
    try:
        published = read_encoding(store, cfg.sae)
    except IntegrityError:
        if not cfg.overwrite:
            raise
        published = (
            None  # a damaged encoding is replaced; its files go once the new one is published
        )
    if published is not None and not published.complete:
        # an unfinished encoding of a version before pending.json: nothing usable, so start over
        for key in ("acts", "spill", "stats.parquet", MANIFEST):
            rm(store, f"{plan.base}/{key}")
        published = None
    try:
        man = read_pending(store, cfg.sae)
    except IntegrityError:
        man = None
    if man is None or not plan.matches(man) or man.format != ENCODING_FORMAT:
        return published, None
    return published, man if man.phase == "spill" and man.dir else None


def _new_generation(
    store: Store,
    cfg: EncodeConfig,
    sae: SAE,
    plan: Plan,
    published: EncodingManifest | None,
    model: str,
    layer: int,
) -> EncodingManifest:
    """Start a fresh generation folder (dropping earlier unfinished ones, never the published one); its pending.json."""
    gens = generations(store, plan.base)
    keep = published.dir if published is not None else None
    for g in gens:
        if layout.generation_name(g) != keep:
            rm(store, f"{plan.base}/{layout.generation_name(g)}")
    man = EncodingManifest(
        format=ENCODING_FORMAT,
        sae=cfg.sae,
        model=model,
        layer=layer,
        tokenization=store.model_info(model).tokenization,
        **plan.want,
        config=asdict(cfg),
        sae_config=asdict(sae.cfg),
        actstore_version=__version__,
        created=now(),
        phase="spill",
        dir=layout.generation_name(max(gens, default=0) + 1),
    )
    write_manifest(store, cfg.sae, man, PENDING)
    return man


def _spill_phase(
    store: Store,
    cfg: EncodeConfig,
    sae: SAE,
    acts: Any,
    plan: Plan,
    man: EncodingManifest,
    device: str,
    progress: bool,
    timings: dict[str, float],
) -> _Sink:
    """Phase 1: every row from ``spilled_rows`` on through the SAE; blocks sorted and spilled per bucket in order, in
    one background thread beside the SAE forward."""
    from tqdm.auto import tqdm

    work = files_dir(cfg.sae, man)
    start = man.spilled_rows
    for b in range(plan.n_buckets):  # drop spill files a killed run wrote past the committed prefix
        for s, key in spill_files(store, work, b):
            if s >= start:
                store.loc.delete(key)
    sink = _Sink(
        store,
        cfg,
        man,
        Spiller(store, work, plan.n_buckets, plan.bucket_features),
        plan.n_rows,
        start,
        timings,
    )
    bar = tqdm(
        total=plan.n_rows,
        initial=start,
        desc=f"encode {cfg.sae}",
        unit="tok",
        unit_scale=True,
        disable=not progress,
    )
    pin = device.startswith("cuda")
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
                    # at most one block waiting
                    while len(pending) > 1 or (pending and pending[0].done()):
                        pending.popleft().result()
                bar.update(chunk.stop - chunk.start)
                t0 = time.perf_counter()
            while pending:
                pending.popleft().result()
    finally:
        # stopped early: queued blocks must not spill or commit
        sink.failed = sink.failed or bool(pending)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    timings["stream"] = time.perf_counter() - t_stream
    return sink


def _finish_phase(
    store: Store,
    cfg: EncodeConfig,
    plan: Plan,
    man: EncodingManifest,
    sink: _Sink,
    published: EncodingManifest | None,
    timings: dict[str, float],
) -> None:
    """Phase 2: per bucket, merge its spill files with its runs still in memory into the final file (``workers``
    buckets at a time); then publish (the atomic switch of encoding.json) and drop the replaced generation.
    Nothing of the last segment is spilled: a run killed here restarts at spilled_rows."""
    t_fin = time.perf_counter()
    work = files_dir(cfg.sae, man)
    held = [sink.spiller.take(b) for b in range(plan.n_buckets)]

    def finish(b: int) -> Bucket:
        runs, held[b] = held[b], []
        f0, f1 = b * plan.bucket_features, min((b + 1) * plan.bucket_features, plan.d_sae)
        return finish_bucket(store, work, b, f0, f1, plan.n_rows, cfg.row_group_rows, runs)

    if cfg.workers > 1:
        with ThreadPoolExecutor(cfg.workers, thread_name_prefix="actstore-encode") as fpool:
            done = list(fpool.map(finish, range(plan.n_buckets)))
    else:
        done = [finish(b) for b in range(plan.n_buckets)]
    _publish(store, cfg, plan, man, done, published)
    timings["finish"] = time.perf_counter() - t_fin


def _publish(
    store: Store,
    cfg: EncodeConfig,
    plan: Plan,
    man: EncodingManifest,
    done: list[Bucket],
    published: EncodingManifest | None,
) -> None:
    """The finished buckets' statistics written, the encoding published (the atomic switch of encoding.json), the
    replaced generation and the spill files dropped, the new files' checksums recorded."""
    work = files_dir(cfg.sae, man)
    files, stats = [d.entry for d in done], [d.stats for d in done]
    table = pa.concat_tables(stats)
    write_parquet(store, f"{work}/stats.parquet", table, compression="zstd")
    rm(store, f"{work}/spill")
    # features that fire on some token of the store
    fired = int(pc.sum(pc.greater(table["n_active"], 0)).as_py() or 0)
    man.phase, man.complete, man.files, man.finished = "done", True, files, now()
    man.n_feature_rows = sum(f["n_rows"] for f in files)
    man.n_bytes = sum(f["n_bytes"] for f in files)
    man.never_fired = plan.d_sae - fired
    man.never_fired_fraction = (plan.d_sae - fired) / plan.d_sae if plan.d_sae else 0.0
    # the atomic switch: readers see the new encoding from here on
    write_manifest(store, cfg.sae, man)
    store.loc.delete(f"{plan.base}/{PENDING}")
    # the replaced generation (or the files of an encoding from before generations)
    if published is not None:
        if published.dir and published.dir != man.dir:
            rm(store, f"{plan.base}/{published.dir}")
        elif not published.dir:
            rm(store, f"{plan.base}/acts")
            rm(store, f"{plan.base}/stats.parquet")
    # checksums for the new files (actstore verify)
    update_manifest(store.loc, prefixes=[plan.base])
