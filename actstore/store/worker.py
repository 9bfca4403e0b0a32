"""A worker of an extraction: claims units, computes them, and hands them to its writer threads.

The same :class:`UnitWorker` runs in the ``actstore extract`` process (:func:`run_here`) and inside each Ray actor
(:mod:`actstore.store.distributed`). It loads the model once; for each unit handed to it, it claims the unit
(:mod:`actstore.store.units`; format 3), skips it when every layer's rows are recorded already or another live
worker holds the claim, else runs the unit's forward pass into a host slot (:mod:`actstore.store.forward`) and
hands it to the writer threads (:mod:`actstore.store.writer`), which write the chunks, record the unit and release
the claim and the slot. Disjoint units of the same arrays are written by any number of workers on any number of
hosts. Formats 1-2 go through the same worker with one writer per array and no claims.

The codec runs on CUDA devices in the forward pass (only the stored dtype crosses to the host, on a copy stream of
its own); elsewhere the writer threads run it, so it scales with them (``codec_on_device`` forces either).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr

from actstore.format import layout
from actstore.format.metadata import LayerAttrs
from actstore.storage.location import Location, open_location
from actstore.storage.locks import POLL_S, Renewer, StoreLock
from actstore.store.forward import (
    DeviceToHost,
    HostRows,
    HostSlots,
    UnitIndex,
    UnitRows,
    compute_unit,
    forward_rows,
)
from actstore.store.units import UNIT_LEASE_S, completed_units
from actstore.store.writer import Commit, ComputedUnit, MarkerCommit, PrefixCommit, UnitWriter

CLAIMED, DONE, QUEUED = "claimed", "done", "queued"
"""What :meth:`UnitWorker.run` did with a unit: another live worker holds it; every layer of it was complete
already; computed and queued for writing."""

GIL_SWITCH_S = 0.0005
"""Python's thread switch interval while a worker runs (its default is 5 ms). The writer threads run many short
numpy calls; with the default, the forward pass's thread waits up to 5 ms for the GIL between two of torch's ops
whenever a writer holds it, which slows the forward pass on a CPU it fills (docs/benchmarks/LOG.md, "Issue 29")."""

SLOTS = 3
"""Units in flight per worker (being computed, waiting, being written): host slots of ``unit_rows`` rows of every
layer, so the memory of an extraction is bounded by ``SLOTS x unit_mb`` whatever the corpus."""


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
    writer_threads: int | None = None
    """Threads of each worker that encode and write rows (None: :func:`default_writer_threads` of its device)."""
    markers: bool = True
    """Units recorded by markers, in any order (format 3); False: one writer per array advancing its prefix."""
    codec_on_device: bool | None = None
    """Run the codec in the forward pass (True), in the writer threads (False), or on CUDA only (None)."""
    site: str = "resid"
    """Where in each block the rows are read (:mod:`actstore.models.sites`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def unit(self, u0: int) -> tuple[int, int]:
        """The rows ``(first, stop)`` of the unit starting at ``u0``."""
        return u0, min(u0 + self.unit_rows, self.n_rows)

    def units(self) -> list[tuple[int, int]]:
        """Every unit's rows ``(first, stop)``."""
        return [self.unit(u0) for u0 in range(0, self.n_rows, self.unit_rows)]

    def committed(self, loc: Location) -> dict[int, int]:
        """Formats 1-2: each layer's committed prefix (:func:`prefix_rows`)."""
        return {
            layer: prefix_rows(
                zarr.open_array(
                    loc.zarr_store, path=layout.layer_array(self.model_key, layer), mode="r"
                ),
                self.unit_rows,
                loc.url,
            )
            for layer in self.layers
        }

    def pending(self, loc: Location) -> list[tuple[int, int]]:
        """The units some layer of this job has not recorded (one listing per layer)."""
        if not self.markers:
            committed = self.committed(loc)
            return [(u0, u1) for u0, u1 in self.units() if any(c <= u0 for c in committed.values())]
        done = [
            completed_units(loc, layout.layer_array(self.model_key, layer)) for layer in self.layers
        ]
        return [(u0, u1) for u0, u1 in self.units() if not all(u0 in d for d in done)]


def prefix_rows(arr: zarr.Array, unit_rows: int, where: str) -> int:
    """A format-1/2 array's ``committed_rows`` as a resume point: checked (an integer in 0..n_rows, else one
    IntegrityError, by :class:`LayerAttrs`) and taken back to a unit's start, so a hand-edited value can neither make a
    resume write nowhere nor loop forever (units are deterministic: a unit recomputed writes the same bytes)."""
    a = LayerAttrs.read(arr, where)
    v = a.committed_rows
    return v if v == a.n_rows else v - v % unit_rows


def default_writer_threads(device: str) -> int:
    """Writer threads of a worker on ``device`` (its own, resolved: a Ray actor's GPU, not its driver's CPU): the
    CPU's cores up to 8 beside a GPU (which runs the codec itself), 2 on a CPU (whose cores also run the forward
    pass)."""
    return min(8, os.cpu_count() or 2) if device.startswith("cuda") else 2


class UnitWorker:
    """Loads the model once and computes the units it is handed (see the module's docstring)."""

    def __init__(self, job: ExtractJob, loaded: Any = None, loc: Location | None = None) -> None:
        import torch

        from actstore.models.loading import auto_device, load_model
        from actstore.models.sites import make_tap

        # a worker process of its own (a Ray actor); in process: extract's threads
        if job.threads and loaded is None:
            torch.set_num_threads(job.threads)
        self.job = job
        self.loc = loc or open_location(
            job.store, storage_options=job.storage_options, create=False, writable=True
        )
        self.device = auto_device(job.device)
        self.loaded = (
            loaded if loaded is not None else load_model(job.model, self.device, job.dtype)
        )
        self.tap = make_tap(self.loaded, job.layers, job.site)
        self.index = UnitIndex(self.loc, job.tokenization, job.n_rows, job.unit_rows)
        self.arrays: dict[int, tuple[zarr.Array, zarr.Array | None]] = {}
        for layer in job.layers:
            arr = zarr.open_array(
                self.loc.zarr_store, path=layout.layer_array(job.model_key, layer), mode="r+"
            )
            scale = None
            if job.codec == "int8":
                scale = zarr.open_array(
                    self.loc.zarr_store, path=layout.scale_array(job.model_key, layer), mode="r+"
                )
            self.arrays[layer] = (arr, scale)
        cuda = self.device.startswith("cuda")
        self.on_device = cuda if job.codec_on_device is None else job.codec_on_device
        stored = job.codec if self.on_device else None
        self.slots = HostSlots(
            SLOTS,
            lambda: HostRows(job.layers, job.unit_rows, self.loaded.d_model, stored, pin=cuda),
        )
        self.transfer = DeviceToHost(self.device)
        self.chans: dict[int, np.ndarray] = {}  # int8: each layer's channel scale, once known
        self.committed = {} if job.markers else job.committed(self.loc)
        commit: Commit = (
            MarkerCommit(self.loc, self.arrays)
            if job.markers
            else PrefixCommit(self.arrays, self.committed)
        )
        self.renewer = Renewer(UNIT_LEASE_S)
        self.renewer.start()
        self.writer = UnitWriter(
            self.loc,
            self.arrays,
            job.codec,
            commit,
            job.writer_threads or default_writer_threads(self.device),
        )
        self.rows_computed = 0
        self.held_by: dict[int, str] = {}
        """Units another writer holds -> what waiting for it means (whom, until when)."""

    # ---- one unit ---------------------------------------------------------
    def marker(self, layer: int, u0: int) -> str:
        return layout.unit_marker(layout.layer_array(self.job.model_key, layer), u0)

    def run(self, u0: int) -> str:
        """Claim, compute and queue the unit starting at row ``u0``: CLAIMED, DONE or QUEUED."""
        u1 = self.job.unit(u0)[1]
        claim = None
        if self.job.markers:
            claim = StoreLock(
                self.loc,
                layout.unit_claim(self.job.model_key, u0),
                f"extract {self.job.model_key}",
                break_lock=self.job.break_lock,
                lease_s=UNIT_LEASE_S,
            )
            holder = claim.try_acquire()
            if holder is not None:
                self.held_by[u0] = claim.waiting_message(holder)
                return CLAIMED
            self.held_by.pop(u0, None)
            self.renewer.add(claim)
        slot = None
        try:
            need = [layer for layer in self.job.layers if self.needs(layer, u0)]
            if not need:
                self._release(claim)
                return DONE
            self.known_chans(need, u0)
            slot = self.slots.take()
            rows = self.compute(u0, u1, need, slot)
            if self.job.codec == "int8":  # unit 0's rows give the channel scales still missing
                self.chans.update(
                    channel_scales(rows, [layer for layer in need if layer not in self.chans])
                )
        except BaseException:
            if slot is not None:
                self.slots.give_back(slot)
            self._release(claim)
            raise

        def release(slot: HostRows = slot, claim: StoreLock | None = claim) -> None:
            self.slots.give_back(slot)
            self._release(claim)

        chans = {layer: self.chans[layer] for layer in need if layer in self.chans}
        self.writer.put(ComputedUnit(u0, u1, need, rows, chans, release))
        self.rows_computed += u1 - u0
        return QUEUED

    def needs(self, layer: int, u0: int) -> bool:
        """Whether ``layer`` has not recorded the unit starting at ``u0``."""
        if self.job.markers:
            return not self.loc.exists(self.marker(layer, u0))
        return self.committed[layer] <= u0

    def compute(self, u0: int, u1: int, layers: list[int], slot: HostRows) -> Any:
        """Rows ``[u0, u1)`` of ``layers`` into ``slot`` (encoded when the codec runs on the device)."""
        import torch

        chans = (
            {layer: torch.from_numpy(c).to(self.device) for layer, c in self.chans.items()}
            if self.on_device
            else None
        )
        return compute_unit(
            self.tap,
            self.index.samples(u0, u1),
            u0,
            u1,
            layers,
            self.job.batch_size,
            self.device,
            slot,
            self.transfer,
            self.job.codec if self.on_device else None,
            chans,
        )

    def known_chans(self, layers: list[int], u0: int) -> None:
        """int8: the channel scale of each of ``layers`` (stored, or from unit 0's float32 rows: the same on every
        worker) in ``self.chans``, unless this worker is about to compute unit 0 and encode it on the host."""
        if self.job.codec != "int8":
            return
        missing = []
        for layer in layers:
            if layer in self.chans:
                continue
            # another worker may have stored it since this one opened the array
            arr = self.arrays[layer][0]
            fresh = zarr.open_array(self.loc.zarr_store, path=arr.path, mode="r")
            stored = LayerAttrs.read(
                fresh, f"array {arr.path} of store {self.loc.url}"
            ).channel_scale
            if stored:
                self.chans[layer] = np.asarray(stored, np.float32)
            else:
                missing.append(layer)
        if missing and (self.on_device or u0 != 0):
            e0 = self.job.unit(0)[1]
            rows = forward_rows(
                self.tap,
                self.index.samples(0, e0),
                0,
                e0,
                missing,
                self.loaded.d_model,
                self.job.batch_size,
                self.device,
            )
            self.chans.update(channel_scales(rows, missing))

    def _release(self, claim: StoreLock | None) -> None:
        if claim is not None:
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


def channel_scales(rows: UnitRows, layers: list[int]) -> dict[int, np.ndarray]:
    """The int8 channel scale of each of ``layers`` from unit 0's float32 ``rows``, one thread per layer."""
    from concurrent.futures import ThreadPoolExecutor

    if not layers:
        return {}
    with ThreadPoolExecutor(len(layers)) as pool:
        return dict(
            zip(layers, pool.map(lambda layer: rows.channel_scale(layer), layers), strict=True)
        )


@contextlib.contextmanager
def gil_switch(seconds: float = GIL_SWITCH_S) -> Iterator[None]:
    """Python's thread switch interval set to ``seconds`` for the block (see :data:`GIL_SWITCH_S`), then restored."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def run_here(worker: UnitWorker, progress: bool, desc: str) -> int:
    """Every pending unit of the job through this process's worker, until none is left: units claimed by other live
    workers (another ``actstore extract`` of the same store) are left to them and waited for; returns the rows
    computed here (Python's switch interval shortened meanwhile: :data:`GIL_SWITCH_S`)."""
    with gil_switch():
        return _run_here(worker, progress, desc)


def _run_here(worker: UnitWorker, progress: bool, desc: str) -> int:
    from tqdm.auto import tqdm

    from actstore.storage.locks import to_stderr

    job = worker.job
    pending = job.pending(worker.loc)
    told: set[str] = set()
    bar = tqdm(
        total=job.n_rows,
        initial=job.n_rows - sum(b - a for a, b in pending),
        desc=desc,
        unit="tok",
        unit_scale=True,
        disable=not progress,
    )
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
            # units finished by other workers count too
            bar.n = job.n_rows - sum(b - a for a, b in pending)
            bar.refresh()
            # others hold these units: wait for their markers (or their claims to lapse)
            if pending and waiting:
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
