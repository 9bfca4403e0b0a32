"""Writing computed units: the writer threads, and how a written unit is recorded.

Every extraction writes through here, whatever its store format. A computed unit (:class:`~actstore.store.forward.
UnitRows`, packed in batch order in a host slot) is cut into *parts* of whole shards (chunks in an unsharded array),
one per layer and shard, and handed to ``threads`` writer threads: each encodes its part (when the device did not:
:func:`actstore.format.codecs.encode_into`, unpermuting the rows as it reads them) and writes its objects whole
(:mod:`actstore.format.chunks`), so the
codec, checksums and object writes of one unit run on every writer thread at once. When a layer's last part is
written its int8 scales are written whole (one shard per unit); when the unit's last part is written it is recorded
by the store's :class:`Commit` and its slot and claim are released.

- format 3 (:class:`MarkerCommit`): each layer's unit marker, then ``committed_rows`` from the markers; units may
  finish in any order.
- formats 1-2 (:class:`PrefixCommit`): one writer per array (locked), ``committed_rows`` advanced over the
  contiguous prefix of written units, as those formats' readers expect.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from actstore.format.chunks import ChunkWriter
from actstore.storage.location import Location
from actstore.store.forward import UnitRows
from actstore.store.units import commit_prefix, mark_done, set_committed

WRITER_NICE = 10
"""Niceness of the writer threads (Linux): where the forward pass and the writers share the CPU's cores, the forward
pass goes first and the writers fill its idle moments (the three host slots bound how far they may fall behind)."""

Arrays = dict[int, tuple[zarr.Array, zarr.Array | None]]
"""layer -> (its values array, its int8 scale array or None)."""


def chan_list(chan: np.ndarray | None) -> list[float] | None:
    """An int8 layer's channel scale as its attribute holds it (the same on every writer), or None."""
    return None if chan is None else [float(v) for v in chan]


class Commit:
    """How a written unit is recorded (one call at a time per worker)."""

    def done(self, u0: int, u1: int, layers: list[int], chans: dict[int, np.ndarray]) -> None:
        raise NotImplementedError


class MarkerCommit(Commit):
    """Format 3: a marker per layer (exclusive create), then each array's ``committed_rows`` from its markers."""

    def __init__(self, loc: Location, arrays: Arrays) -> None:
        self.loc, self.arrays = loc, arrays

    def done(self, u0: int, u1: int, layers: list[int], chans: dict[int, np.ndarray]) -> None:
        for layer in layers:
            mark_done(self.loc, self.arrays[layer][0].path, u0, u1)
        for layer in layers:
            commit_prefix(self.arrays[layer][0].path, self.loc, chan_list(chans.get(layer)))


class PrefixCommit(Commit):
    """Formats 1-2: ``committed_rows`` of each array advanced over the contiguous prefix of written units."""

    def __init__(self, arrays: Arrays, committed: dict[int, int]) -> None:
        self.arrays = arrays
        self.next = dict(committed)  # layer -> first row not committed
        # layer -> written u0 -> u1
        self.finished: dict[int, dict[int, int]] = {layer: {} for layer in arrays}

    def done(self, u0: int, u1: int, layers: list[int], chans: dict[int, np.ndarray]) -> None:
        for layer in layers:
            self.finished[layer][u0] = u1
            start = self.next[layer]
            while self.next[layer] in self.finished[layer]:
                self.next[layer] = self.finished[layer].pop(self.next[layer])
            if self.next[layer] != start:
                set_committed(self.arrays[layer][0], self.next[layer], chan_list(chans.get(layer)))


@dataclass
class ComputedUnit:
    """A unit handed to the writer: its rows, what to store them with, and what to release once recorded."""

    u0: int
    u1: int
    layers: list[int]
    rows: UnitRows
    chans: dict[int, np.ndarray]
    """Each int8 layer's channel scale (empty for other codecs)."""
    release: Any
    """Called once the unit is recorded or abandoned (frees its slot and claim)."""
    inv: np.ndarray = field(init=False)
    """int64 ``(n,)``: the packed index of each unit row."""
    scales: dict[int, np.ndarray] = field(default_factory=dict)
    """int8: layer -> the unit's per-token scales ``(n,)``, filled part by part."""
    parts_left: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.inv = self.rows.inverse()


class UnitWriter:
    """``threads`` threads that encode and write the parts of computed units (see the module's docstring)."""

    def __init__(
        self, loc: Location, arrays: Arrays, codec: str, commit: Commit, threads: int
    ) -> None:
        self.arrays, self.codec, self.commit = arrays, codec, commit
        # whole objects written by this thread (no hop through Zarr's event loop); None: an array Zarr writes
        self.chunks = {
            layer: ChunkWriter.for_array(arr, loc.write_bytes) for layer, (arr, _) in arrays.items()
        }
        self.q: queue.Queue[tuple[ComputedUnit, int, int, int] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.in_flight = 0
        self.idle = threading.Condition()
        self.commit_lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, daemon=True, name=f"actstore-writer-{i}")
            for i in range(threads)
        ]
        for t in self.threads:
            t.start()

    def part_rows(self, layer: int) -> int:
        """Rows of one part: a shard (a chunk of an unsharded array), so no two parts share an object."""
        arr = self.arrays[layer][0]
        return int((arr.shards or arr.chunks)[0])

    def put(self, unit: ComputedUnit) -> None:
        """Queue every part of ``unit`` (raises an earlier write's error instead)."""
        if self.error is not None:
            unit.release()
            raise self.error
        n = unit.u1 - unit.u0
        parts = []
        for layer in unit.layers:
            step = self.part_rows(layer)
            cuts = list(range(0, n, step))
            unit.parts_left[layer] = len(cuts)
            if self.codec == "int8":
                unit.scales[layer] = np.empty(n, dtype=np.float16)
            parts += [(unit, layer, r0, min(r0 + step, n)) for r0 in cuts]
        with self.idle:
            self.in_flight += 1
        for part in parts:
            self.q.put(part)

    def _run(self) -> None:
        # Linux: below the forward pass's threads on a busy CPU
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        while (part := self.q.get()) is not None:
            unit, layer, r0, r1 = part
            self._guard(self._write, unit, layer, r0, r1)
            with unit.lock:
                unit.parts_left[layer] -= 1
                layer_done = unit.parts_left[layer] == 0
                unit_done = not any(unit.parts_left.values())
            scale = self.arrays[layer][1]
            if layer_done and scale is not None:
                self._guard(scale.__setitem__, slice(unit.u0, unit.u1), unit.scales[layer])
            if unit_done:
                self._finish(unit)

    def _guard(self, fn: Any, *args: Any) -> None:
        if self.error is not None:
            return
        try:
            fn(*args)
        except BaseException as exc:  # raised by put / drain / finish in the worker's thread
            self.error = self.error or exc

    def _write(self, unit: ComputedUnit, layer: int, r0: int, r1: int) -> None:
        enc = unit.rows.stored(layer, self.codec, unit.chans.get(layer), unit.inv[r0:r1])
        chunks = self.chunks[layer]
        if chunks is not None:
            chunks.write(unit.u0 + r0, enc.values)
        else:
            self.arrays[layer][0][unit.u0 + r0 : unit.u0 + r1] = enc.values
        if enc.scale is not None:
            unit.scales[layer][r0:r1] = enc.scale

    def _finish(self, unit: ComputedUnit) -> None:
        try:
            with self.commit_lock:
                self._guard(self.commit.done, unit.u0, unit.u1, unit.layers, unit.chans)
        finally:
            unit.release()
            with self.idle:
                self.in_flight -= 1
                self.idle.notify_all()

    def drain(self) -> None:
        """Wait until every queued unit is recorded (raising a write's error)."""
        with self.idle:
            self.idle.wait_for(lambda: self.in_flight == 0)
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Drain, then stop the threads."""
        try:
            self.drain()
        finally:
            for _ in self.threads:
                self.q.put(None)
            for t in self.threads:
                t.join()
