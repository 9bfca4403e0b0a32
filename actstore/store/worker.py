"""A worker of a format-3 extraction: claims units, computes them, writes their chunks and markers.

The same :class:`UnitWorker` runs in the ``actstore extract`` process (:func:`run_here`) and inside each Ray actor
(:mod:`actstore.store.distributed`). It loads the model once; for each unit handed to it, it claims the unit
(:mod:`actstore.store.units`), skips it when every layer's marker is there already or another live worker holds
the claim, else runs the unit's forward pass and hands the rows to a background writer thread that writes the
chunks, then the markers, advances ``committed_rows`` and releases the claim. Disjoint units of the same arrays are
written by any number of workers on any number of hosts.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr

from actstore.format import codecs, layout
from actstore.format.layout import ATTR
from actstore.storage.location import Location, open_location
from actstore.storage.locks import POLL_S, Renewer, StoreLock
from actstore.store.forward import UnitIndex, forward_encoded, forward_unit
from actstore.store.units import UNIT_LEASE_S, commit_prefix, completed_units, mark_done

CLAIMED, DONE, QUEUED = "claimed", "done", "queued"
"""What :meth:`UnitWorker.run` did with a unit: another live worker holds it; every layer of it was complete
already; computed and queued for writing."""


@dataclass
class ExtractJob:
    """What every worker of one extraction needs, as plain data (it travels to Ray workers)."""

    store: str
    """Path or URL of the store, the same on every worker."""
    storage_options: dict[str, Any] | None
    """fsspec options for a remote store."""
    model: str
    """What to load (Hugging Face id, local directory, bundled name)."""
    model_key: str
    """The model's key in the store (``models/<key>``)."""
    layers: list[int]
    """hidden_states indices still being written."""
    tokenization: str
    """The token index the arrays follow."""
    n_rows: int
    """Token rows of the arrays."""
    unit_rows: int
    """Rows per unit (whole shards)."""
    codec: str
    """Stored precision of the arrays."""
    batch_size: int
    """Samples per forward pass."""
    device: str
    """cpu, cuda, cuda:N or auto, resolved on each worker."""
    threads: int | None = None
    """torch CPU threads of each worker (None: torch's default)."""
    dtype: str = "fp32"
    """Precision of the model weights (resolved by the driver: every worker loads the same)."""
    break_lock: bool = False
    """Take over units claimed by other writers, live or not (--break-lock: they are known to be dead)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def unit(self, u0: int) -> tuple[int, int]:
        """The rows ``(first, stop)`` of the unit starting at ``u0``."""
        return u0, min(u0 + self.unit_rows, self.n_rows)

    def units(self) -> list[tuple[int, int]]:
        """Every unit's rows ``(first, stop)``."""
        return [self.unit(u0) for u0 in range(0, self.n_rows, self.unit_rows)]

    def pending(self, loc: Location) -> list[tuple[int, int]]:
        """The units some layer of this job has no marker for (one listing per layer)."""
        done = [completed_units(loc, layout.layer_array(self.model_key, layer)) for layer in self.layers]
        return [(u0, u1) for u0, u1 in self.units() if not all(u0 in d for d in done)]


class UnitWorker:
    """Loads the model once and computes the units it is handed (see the module's docstring)."""

    def __init__(self, job: ExtractJob, loaded: Any = None, loc: Location | None = None) -> None:
        import torch

        from actstore.models.loading import auto_device, load_model
        from actstore.models.taps import LayerTap

        if job.threads and loaded is None:  # a worker process of its own (a Ray actor); in process: extract's threads
            torch.set_num_threads(job.threads)
        self.job = job
        self.loc = loc or open_location(job.store, storage_options=job.storage_options, create=False, writable=True)
        self.device = auto_device(job.device)
        self.loaded = loaded if loaded is not None else load_model(job.model, self.device, job.dtype)
        self.tap = LayerTap(self.loaded, job.layers)
        self.index = UnitIndex(self.loc, job.tokenization, job.n_rows, job.unit_rows)
        self.arrays: dict[int, tuple[zarr.Array, zarr.Array | None]] = {}
        for layer in job.layers:
            arr = zarr.open_array(self.loc.zarr_store, path=layout.layer_array(job.model_key, layer), mode="r+")
            scale = None
            if job.codec == "int8":
                scale = zarr.open_array(self.loc.zarr_store, path=layout.scale_array(job.model_key, layer), mode="r+")
            self.arrays[layer] = (arr, scale)
        self.renewer = Renewer(UNIT_LEASE_S)
        self.renewer.start()
        self.writer = _UnitWriter(self)
        self.writer.start()
        self.rows_computed = 0
        self.held_by: dict[int, str] = {}
        """Units another writer holds -> what waiting for it means (whom, until when)."""

    # ---- one unit ---------------------------------------------------------
    def marker(self, layer: int, u0: int) -> str:
        return layout.unit_marker(layout.layer_array(self.job.model_key, layer), u0)

    def run(self, u0: int) -> str:
        """Claim, compute and queue the unit starting at row ``u0``: CLAIMED, DONE or QUEUED."""
        u1 = self.job.unit(u0)[1]
        claim = StoreLock(self.loc, layout.unit_claim(self.job.model_key, u0), f"extract {self.job.model_key}",
                          break_lock=self.job.break_lock, lease_s=UNIT_LEASE_S)  # fmt: skip
        holder = claim.try_acquire()
        if holder is not None:
            self.held_by[u0] = claim.waiting_message(holder)
            return CLAIMED
        self.held_by.pop(u0, None)
        self.renewer.add(claim)
        try:
            need = [layer for layer in self.job.layers if not self.loc.exists(self.marker(layer, u0))]
            if not need:
                self._release(claim)
                return DONE
            chan = {layer: self.channel_scale(layer) for layer in need} if self.job.codec == "int8" else {}
            encoded = self.forward_encoded(u0, u1, need, chan)
        except BaseException:
            self._release(claim)
            raise
        self.writer.put((u0, u1, encoded, chan, claim))
        self.rows_computed += u1 - u0
        return QUEUED

    def forward(self, u0: int, u1: int, layers: list[int]) -> dict[int, np.ndarray]:
        """float32 ``(u1 - u0, d_model)`` rows of each of ``layers``."""
        ids, starts, lens, keep = self.index.samples(u0, u1)
        return forward_unit(self.tap, ids, starts, lens, u0, u1, layers, self.loaded.d_model, self.job.batch_size,
                            self.device, keep)  # fmt: skip

    def forward_encoded(self, u0: int, u1: int, layers: list[int], chan: dict[int, np.ndarray]) -> dict[int, codecs.Encoded]:
        """Rows ``[u0, u1)`` of each of ``layers`` in their stored form, encoded on the model's device."""
        ids, starts, lens, keep = self.index.samples(u0, u1)
        return forward_encoded(self.tap, ids, starts, lens, u0, u1, layers, self.loaded.d_model, self.job.batch_size,
                               self.device, self.job.codec, chan, keep)  # fmt: skip

    def channel_scale(self, layer: int) -> np.ndarray:
        """An int8 layer's per-channel scale: stored, or computed from unit 0's rows (the same on every worker)."""
        arr = self.arrays[layer][0]
        stored = arr.attrs[ATTR].get("channel_scale")
        if not stored:  # another worker may have stored it since this one opened the array
            stored = zarr.open_array(self.loc.zarr_store, path=arr.path, mode="r").attrs[ATTR].get("channel_scale")
        if stored:
            return np.asarray(stored, np.float32)
        x = self.forward(0, min(self.job.unit_rows, self.job.n_rows), [layer])[layer]
        return codecs.channel_scale(x)

    def _release(self, claim: StoreLock) -> None:
        self.renewer.discard(claim)
        claim.release()

    # ---- lifetime ---------------------------------------------------------
    def flush(self) -> int:
        """Wait until every queued unit is written (raising a write's error); the rows this worker computed."""
        self.writer.drain()
        return self.rows_computed

    def close(self) -> None:
        try:
            self.writer.finish()
        finally:
            self.renewer.stop()


class _UnitWriter(threading.Thread):
    """Writes computed (encoded) units in any order, then their markers; advances the prefix, frees the claim."""

    def __init__(self, worker: UnitWorker) -> None:
        super().__init__(daemon=True, name="actstore-unit-writer")
        self.w = worker
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            try:
                if self.error is None:
                    self._write(*item)
            except BaseException as exc:  # raised by put / drain / finish in the worker's thread
                self.error = exc
            finally:
                self.w._release(item[4])
                self.q.task_done()
        self.q.task_done()

    def _write(self, u0: int, u1: int, bufs: dict[int, codecs.Encoded], chan: dict[int, np.ndarray],
               claim: StoreLock) -> None:  # fmt: skip
        loc = self.w.loc
        for layer, enc in bufs.items():
            arr, scale = self.w.arrays[layer]
            arr[u0:u1] = enc.values
            if scale is not None:
                scale[u0:u1] = enc.scale
        for layer in bufs:
            arr = self.w.arrays[layer][0]
            mark_done(loc, arr.path, u0, u1)
            extra = {"channel_scale": [float(v) for v in chan[layer]]} if layer in chan else None
            commit_prefix(arr.path, loc, extra)

    def put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def drain(self) -> None:
        self.q.join()
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def run_here(worker: UnitWorker, progress: bool, desc: str) -> int:
    """Every pending unit of the job through this process's worker, until none is left: units claimed by other live
    workers (another ``actstore extract`` of the same store) are left to them and waited for; returns the rows
    computed here."""
    from tqdm.auto import tqdm

    from actstore.storage.locks import to_stderr

    job = worker.job
    pending = job.pending(worker.loc)
    told: set[str] = set()
    bar = tqdm(total=job.n_rows, initial=job.n_rows - sum(b - a for a, b in pending), desc=desc, unit="tok",
               unit_scale=True, disable=not progress)  # fmt: skip
    try:
        while pending:
            waiting = False
            for u0, u1 in pending:
                outcome = worker.run(u0)
                waiting |= outcome == CLAIMED
                if outcome != CLAIMED:
                    bar.update(u1 - u0)
            worker.flush()
            pending = job.pending(worker.loc)
            bar.n = job.n_rows - sum(b - a for a, b in pending)  # units finished by other workers count too
            bar.refresh()
            if pending and waiting:  # others hold these units: wait for their markers (or their claims to lapse)
                left = {u0 for u0, _ in pending}
                for u0, message in sorted(worker.held_by.items()):
                    if u0 in left and message not in told:  # once per holder and lease
                        told.add(message)
                        to_stderr(f"unit of rows {u0}-{job.unit(u0)[1]}: {message}")
                time.sleep(POLL_S)
        worker.flush()
    finally:
        bar.close()
    return worker.rows_computed
