"""Encoding in segments, for many workers (``actstore encode --ray``): rows in segments, then buckets, any order.

Phase 1 cuts the rows into *segments* of ``segment_rows`` (whole blocks of ``batch_rows``, so every block is the
block a single process encodes). A worker encodes one segment through the SAE, sorts its blocks and writes its
runs as spill files ``spill/bXXXXX/r<start>.parquet`` (several when it passes ``spill_entries``), then the
segment's marker ``spill/done/s<start>.done`` by an exclusive create. A worker first deletes any spill file a dead
predecessor left inside its segment, so a segment redone writes exactly what it would have. Phase 2 hands each
bucket to a worker, which merges every spill file of the bucket into its final file (the merged order is the
total order (feature, value desc, row), whatever the segments were) and returns its statistics; the driver
publishes the encoding as :mod:`actstore.encoding.encode` does. So an encoding made by any number of workers
equals a single process's, file for file.

:class:`SegmentWorker` does the work of one worker (in this process, or inside a Ray actor,
:class:`EncodeActor`); :func:`run_segments` drives a list of workers here or a Ray pool.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from actstore.encoding.sort import Bucket, Entries, Spiller, finish_bucket, sort_block, spill_files
from actstore.errors import StoreError
from actstore.sae.archs import get_arch

if TYPE_CHECKING:
    from actstore.sae.model import SAE
    from actstore.store.reader import Store

SEGMENTS_PER_WORKER = 4
"""Segments per worker an encoding is cut into (more: better balance, more spill files)."""


def segment_marker(work: str, start: int) -> str:
    """The marker of the finished segment starting at ``start`` (inside the generation folder ``work``)."""
    return f"{work}/spill/done/s{start:012d}.done"


def segment_rows_for(n_rows: int, batch_rows: int, workers: int) -> int:
    """Rows per segment: about ``SEGMENTS_PER_WORKER`` per worker, in whole blocks of ``batch_rows``."""
    want = -(-n_rows // max(1, workers * SEGMENTS_PER_WORKER))
    return max(batch_rows, -(-want // batch_rows) * batch_rows)


def done_segments(store: Store, work: str) -> set[int]:
    """Start rows of the segments that have their marker."""
    names = [k.rsplit("/", 1)[-1] for k in store.loc.walk(f"{work}/spill/done")]
    return {
        int(n[1:13])
        for n in names
        if n.startswith("s") and n.endswith(".done") and n[1:13].isdigit()
    }


@dataclass
class SegmentJob:
    """What every worker of one segmented encoding needs, as plain data (it travels to Ray workers)."""

    store: str
    storage_options: dict[str, Any] | None
    sae: str
    model: str
    layer: int
    work: str
    """The generation folder (``features/<sae>/gen-<N>``)."""
    n_rows: int
    segment_rows: int
    batch_rows: int
    spill_entries: int
    n_buckets: int
    bucket_features: int
    d_sae: int
    row_group_rows: int
    device: str
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def segments(self) -> list[int]:
        return list(range(0, self.n_rows, self.segment_rows))

    def buckets(self) -> list[int]:
        return list(range(self.n_buckets))


def sparse_encode(sae: SAE, x: torch.Tensor) -> Entries:
    """The non-zero activations of ``sae.encode(x)`` for ``x (n, d_in)``, rows local to the block, in any order.

    Same values as the dense ``sae.encode`` (its ``activate``), without making and scanning the dense
    ``(n, d_sae)`` matrix for top-k SAEs: the top-k (values, indices) are the entries already. Only
    ``(n, k)`` values and indices come back from an accelerator.
    """
    pre = sae.pre_acts(x)  # (n, d_sae)
    k = sae.cfg.k
    if get_arch(sae.cfg.arch).topk_at_inference(sae):
        # the same selection as SAE.activate: torch's CPU top-k picks the same k entries sorted or not
        vals, idx = pre.topk(int(k), dim=-1, sorted=False)  # type: ignore[arg-type]  # (n, k)
        vals, idx = vals.float().cpu().numpy().ravel(), idx.cpu().numpy().ravel()
        # ReLU: the dense encode stores relu(value), so non-positive picks are zeros
        keep = vals > 0
        local = np.repeat(np.arange(pre.shape[0], dtype=np.int64), int(k))  # type: ignore[arg-type]
        return Entries(local[keep], idx[keep].astype(np.int32), vals[keep])
    h = sae.activate(pre, train=False)  # (n, d_sae)
    r, f = torch.nonzero(h, as_tuple=True)
    return Entries(r.cpu().numpy(), f.to(torch.int32).cpu().numpy(), h[r, f].float().cpu().numpy())


class SegmentWorker:
    """Loads the SAE once; encodes segments and finishes buckets of one job."""

    def __init__(self, job: SegmentJob, store: Store | None = None, sae: Any = None) -> None:
        from actstore.models.loading import auto_device
        from actstore.sae.files import load_sae
        from actstore.store.reader import open_store

        if job.threads and sae is None:  # a worker process of its own (a Ray actor)
            torch.set_num_threads(job.threads)
        self.job = job
        self.store = store or open_store(
            job.store, writable=True, storage_options=job.storage_options
        )
        self.device = auto_device(job.device)
        self.sae = (
            sae if sae is not None else load_sae(self.store, job.sae, device=self.device).eval()
        )

    def segment(self, start: int) -> int:
        """Encode rows ``[start, start + segment_rows)`` into spill files and mark the segment; its row count."""
        job, store = self.job, self.store
        stop = min(start + job.segment_rows, job.n_rows)
        for b in range(job.n_buckets):  # what a dead worker left inside this segment
            for s, key in spill_files(store, job.work, b):
                if start <= s < stop:
                    store.loc.delete(key)
        spiller = Spiller(store, job.work, job.n_buckets, job.bucket_features)
        run_start = start
        from actstore.sae.model import check_fits

        acts = check_fits(store, self.sae.cfg, job.sae)  # a crosscoder's sources side by side
        pin = self.device.startswith("cuda")
        with torch.inference_mode():
            for chunk in acts.iter_chunks(start=start, stop=stop, rows=job.batch_rows, prefetch=2):
                x = torch.from_numpy(chunk.values)  # (rows, d_model)
                if pin:
                    x = x.pin_memory().to(self.device, non_blocking=True)
                spiller.add(sort_block(sparse_encode(self.sae, x), chunk.start))
                if spiller.n_buffered >= job.spill_entries and chunk.stop < stop:
                    spiller.flush(run_start)
                    run_start = chunk.stop
        spiller.flush(run_start)
        store.loc.create_exclusive(
            segment_marker(job.work, start), f'{{"rows": [{start}, {stop}]}}'.encode()
        )
        return stop - start

    def bucket(self, b: int) -> Bucket:
        """Merge every spill file of bucket ``b`` into its final file; its manifest entry and statistics."""
        job = self.job
        f0, f1 = b * job.bucket_features, min((b + 1) * job.bucket_features, job.d_sae)
        return finish_bucket(self.store, job.work, b, f0, f1, job.n_rows, job.row_group_rows, [])


class EncodeActor:
    """One Ray worker of an encoding: a :class:`SegmentWorker` living as long as the actor."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.worker = SegmentWorker(SegmentJob(**job))

    def segment(self, start: int) -> int:
        return self.worker.segment(start)

    def bucket(self, b: int) -> Bucket:
        return self.worker.bucket(b)


def run_segments(
    job: SegmentJob,
    store: Store,
    ray_address: str | None,
    workers: int | None,
    progress: bool,
    local: SegmentWorker | None = None,
) -> tuple[list[Bucket], dict[str, float]]:
    """Every segment without its marker, then every bucket: here (``local``) or on Ray; the finished buckets in
    order, and seconds per phase."""
    from tqdm.auto import tqdm

    timings = {"segments": 0.0, "buckets": 0.0}
    todo = [s for s in job.segments() if s not in done_segments(store, job.work)]
    bar = tqdm(
        total=job.n_rows,
        initial=job.n_rows - sum(min(s + job.segment_rows, job.n_rows) - s for s in todo),
        desc=f"encode {job.sae}",
        unit="tok",
        unit_scale=True,
        disable=not progress,
    )
    buckets: list[Bucket | None] = [None] * job.n_buckets
    try:
        if ray_address is None:
            worker = local or SegmentWorker(job, store)
            t0 = time.perf_counter()
            for s in todo:
                bar.update(worker.segment(s))
            _check_segments(job, store)
            t1 = time.perf_counter()
            for b in job.buckets():
                buckets[b] = worker.bucket(b)
            timings.update(segments=t1 - t0, buckets=time.perf_counter() - t1)
        else:
            from actstore.cluster import ActorPool, actor_resources, default_workers, ray_session

            with ray_session(ray_address) as ray:
                actor = ray.remote(EncodeActor).options(**actor_resources(ray, job.threads))
                n = workers or default_workers(ray, job.threads)
                pool = ActorPool(
                    ray, lambda: actor.remote(job.to_dict()), min(n, max(1, len(job.segments())))
                )
                try:
                    t0 = time.perf_counter()
                    pool.map("segment", todo, lambda s, rows: bar.update(rows))
                    _check_segments(job, store)
                    t1 = time.perf_counter()
                    pool.map("bucket", job.buckets(), lambda b, done: buckets.__setitem__(b, done))
                    timings.update(segments=t1 - t0, buckets=time.perf_counter() - t1)
                finally:
                    for a in pool.actors:
                        ray.kill(a)
    finally:
        bar.close()
    return [b for b in buckets if b is not None], timings


def _check_segments(job: SegmentJob, store: Store) -> None:
    """Every segment has its marker (else StoreError: nothing is published, the same command resumes)."""
    missing = [s for s in job.segments() if s not in done_segments(store, job.work)]
    if missing:
        raise StoreError(
            f"segments {missing[:5]} of the encoding of {job.sae} in {store.url} have no marker: run the "
            "same encode again (finished segments are kept)"
        )
