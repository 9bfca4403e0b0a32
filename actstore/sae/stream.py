"""Train stage, data side: a shuffled, out-of-core stream of activation rows.

Every epoch reads the layer's Zarr chunks in a fresh random order (decoding
ahead in worker threads), keeps the training rows of each chunk, and mixes them
in a shuffle buffer of bounded size: when the buffer holds ``buffer_rows`` rows
it is permuted and all but half of it is emitted as batches. At the end of the
epoch the rest is emitted, so **every training row is seen exactly once per
epoch** and memory stays at about ``1.5 * buffer_rows`` rows plus a few chunks,
whatever the store's size.

The stream is a pure function of ``(seed, epoch)``: a resumed run asks for
``batches(epoch, skip=n)`` and gets exactly the batches an uninterrupted run
would have seen from the ``n``-th on. Skipping replays the buffer on row
*indices* only (no I/O); the buffer's contents at the resume point are then read
with one gathered read.

Rows are split into training and held-out rows *by sample* (:func:`split_rows`),
so no held-out sentence leaks into training.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from actstore.errors import ConfigError, StoreError
from actstore.store.reader import Activations, Tokenization, prefetched


@dataclass
class RowSplit:
    """Which token rows train and which are held out (whole samples)."""

    train_mask: np.ndarray
    """bool ``(n_rows,)``: True for training rows."""
    eval_rows: np.ndarray
    """int64 sorted row numbers of the held-out samples' tokens."""
    eval_samples: np.ndarray
    """int64 sample numbers held out."""

    @property
    def n_train(self) -> int:
        return int(self.train_mask.sum())


def split_rows(
    tok: Tokenization,
    n_rows: int,
    eval_fraction: float = 0.05,
    max_eval_tokens: int = 20_000,
    seed: int = 0,
) -> RowSplit:
    """Hold out random whole samples: up to ``eval_fraction`` of the rows, at most ``max_eval_tokens``.

    Only the first ``n_rows`` (committed) rows take part; samples reaching past
    them are left out of both sets.
    """
    first, n_tok = tok.sample_rows()  # (n_samples,), (n_samples,)
    return split_sample_rows(first, n_tok, n_rows, eval_fraction, max_eval_tokens, seed)


def split_sample_rows(
    first: np.ndarray,
    n_tok: np.ndarray,
    n_rows: int,
    eval_fraction: float,
    max_eval_tokens: int,
    seed: int,
) -> RowSplit:
    """:func:`split_rows` from the samples' ``first_row`` and ``n_tokens`` arrays."""
    # samples are contiguous runs of rows covering the token index; a sample reaching past the
    # committed prefix is left out, so all rows of the samples inside it train unless held out
    inside = np.flatnonzero(first + n_tok <= n_rows)
    lens = n_tok[inside]
    mask = np.ones(n_rows, dtype=bool)
    for s in np.flatnonzero((first < n_rows) & (first + n_tok > n_rows)):
        mask[first[s] : n_rows] = False
    target = min(int(eval_fraction * int(lens.sum())), max_eval_tokens) if eval_fraction > 0 else 0
    held: list[int] = []
    if target > 0 and len(inside) > 1:
        order = np.random.default_rng([seed, 7]).permutation(len(inside))
        total = 0
        for i in order[: len(inside) - 1]:  # always leave one sample to train on
            if total >= target:
                break
            held.append(int(inside[i]))
            total += int(n_tok[inside[i]])
    eval_samples = np.sort(np.asarray(held, dtype=np.int64))
    pieces = [np.arange(first[s], first[s] + n_tok[s], dtype=np.int64) for s in eval_samples]
    eval_rows = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    mask[eval_rows] = False
    return RowSplit(mask, np.sort(eval_rows), eval_samples)


class ShuffledStream:
    """Shuffled batches of training rows of one (model, layer), read chunk by chunk.

    ``batches(epoch)`` yields float32 tensors ``(<= batch_size, d_model)`` (pinned
    when ``pin_memory``), prepared by a background thread while the caller trains.
    """

    def __init__(
        self,
        acts: Activations,
        train_mask: np.ndarray,
        batch_size: int,
        buffer_rows: int,
        seed: int = 0,
        workers: int = 2,
        prefetch: int = 4,
        pin_memory: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {batch_size}")
        self.acts = acts
        self.mask = train_mask
        self.batch_size = batch_size
        self.chunk_rows = acts.chunk_rows
        self.buffer_rows = max(buffer_rows, batch_size * 2)
        self.seed = seed
        self.workers = max(1, workers)
        self.prefetch = max(1, prefetch)
        self.pin_memory = pin_memory
        n = len(train_mask)
        # chunk-aligned blocks that hold at least one training row
        bounds = [(a, min(a + self.chunk_rows, n)) for a in range(0, n, self.chunk_rows)]
        self.chunks = [(a, b) for a, b in bounds if train_mask[a:b].any()]
        self.n_train = int(train_mask.sum())
        if self.n_train == 0:
            raise StoreError(
                "no training rows: the layer has no committed rows outside the held-out samples"
            )

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.batch_size)

    def _rows_of(self, a: int, b: int) -> np.ndarray:
        return np.flatnonzero(self.mask[a:b]) + a  # int64 row numbers

    def read_chunk(self, a: int, b: int) -> np.ndarray:
        """The training rows of rows ``[a, b)`` (one chunk): ``(n_train_rows_there, d_model)`` float32."""
        vals = self.acts[a:b]  # (b - a, d_model) float32
        m = self.mask[a:b]
        return vals if m.all() else vals[m]

    def batches(self, epoch: int, skip: int = 0) -> Iterator[torch.Tensor]:
        """Batches of epoch ``epoch`` from the ``skip``-th on, prepared in a background thread."""

        def produce(stop: threading.Event) -> Iterator[torch.Tensor]:
            for arr in _Epoch(self, epoch, skip, stop).batches():
                t = torch.from_numpy(np.ascontiguousarray(arr))
                yield t.pin_memory() if self.pin_memory else t

        return prefetched(produce, self.prefetch, name="actstore-batches")


class _Epoch:
    """One epoch of a :class:`ShuffledStream`: chunks in a seeded random order pour their training rows into a
    buffer of ``buffer_rows``; whenever it is full, all but half a buffer leave it as seeded random batches.

    Resuming at batch ``skip`` replays the same shuffle on row numbers alone (no values read) until batch
    ``skip`` is due, then reads the values of the rows the buffer holds at that moment and goes on reading chunks
    ("going live"), so a resumed epoch yields exactly the batches an uninterrupted one would.
    """

    def __init__(
        self, stream: ShuffledStream, epoch: int, skip: int, stop: threading.Event
    ) -> None:
        self.s, self.skip, self.stop = stream, skip, stop
        self.rng = np.random.default_rng([stream.seed, epoch, 11])
        self.order = [stream.chunks[i] for i in self.rng.permutation(len(stream.chunks))]
        self.cap = stream.buffer_rows + stream.chunk_rows
        self.idx = np.empty(self.cap, dtype=np.int64)  # (cap,) row number of each buffer slot
        self.vals: np.ndarray | None = None  # (cap, d_model), allocated once values are needed
        self.n = 0  # rows in the buffer
        self.done = 0  # batches of this epoch produced (emitted or skipped)
        self.live = skip == 0  # are values being tracked?
        self.pool = ThreadPoolExecutor(stream.workers, thread_name_prefix="actstore-read")
        self.futures: dict[int, Future] = {}  # chunk position in ``order`` -> its rows being read

    def batches(self) -> Iterator[np.ndarray]:
        """The epoch's batches from ``skip`` on, as ``(<= batch_size, d_model)`` arrays, computed in this thread."""
        try:
            if self.live:
                self._values()
                self._read_from(0)
            for pos, (a, b) in enumerate(self.order):
                if self.stop.is_set():
                    return
                rows = self.s._rows_of(a, b)
                m = len(rows)
                self.idx[self.n : self.n + m] = rows
                if self.live:
                    self._read_from(pos + 1)
                    # (m, d_model)
                    self._values()[self.n : self.n + m] = self.futures.pop(pos).result()
                self.n += m
                if self.n >= self.s.buffer_rows:
                    yield from self._flush(False, pos + 1)
            yield from self._flush(True, len(self.order))
        finally:
            for f in self.futures.values():
                f.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _values(self) -> np.ndarray:
        if self.vals is None:
            self.vals = np.empty((self.cap, self.s.acts.d_model), dtype=np.float32)
        return self.vals

    def _read_from(self, pos: int) -> None:
        """Keep the next few chunks from ``pos`` on being read by the pool."""
        for j in range(pos, min(pos + self.s.prefetch + self.s.workers, len(self.order))):
            if j not in self.futures:
                self.futures[j] = self.pool.submit(self.s.read_chunk, *self.order[j])

    def _go_live(self, pos: int) -> None:
        """The resume point is reached: read the values of the buffer's rows, start reading from chunk ``pos``."""
        v = self._values()
        if self.n:
            srt = np.argsort(self.idx[: self.n], kind="stable")
            v[srt] = self.s.acts.take(self.idx[: self.n][srt])  # (n, d_model)
        self.live = True
        self._read_from(pos)

    def _flush(self, final: bool, pos: int) -> Iterator[np.ndarray]:
        """Batches out of the buffer: all of it at the end, else all but half a buffer (whole batches only)."""
        bs, n = self.s.batch_size, self.n
        perm = self.rng.permutation(n)
        n_out = n if final else n - self.s.buffer_rows // 2
        n_b = math.ceil(n_out / bs) if final else n_out // bs
        used = n if final else n_b * bs
        for i in range(n_b):
            if self.done >= self.skip:
                if not self.live:
                    self._go_live(pos)
                yield self._values()[perm[i * bs : (i + 1) * bs]]
            self.done += 1
            if self.stop.is_set():
                return
        rest = perm[used:]
        self.idx[: len(rest)] = self.idx[rest]
        if self.live:
            v = self._values()
            v[: len(rest)] = v[rest]
        self.n = len(rest)
