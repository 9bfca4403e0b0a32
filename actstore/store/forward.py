"""One unit of extraction: the token rows of a unit, and the forward passes that yield them for every layer.

A forward pass reads one *piece* of a sample: the whole (truncated) sample, or one of its context windows
(``--window N --stride S``), and writes the rows the piece owns: a window owns the tokens it gives the most left
context to (its first ``N`` for window 0, its last ``S`` after), so every token of a sample is one row.

Shared by the in-process extraction and its workers (:mod:`actstore.store.worker`), so a unit computed anywhere is
the same batches in the same order, and the same bytes once encoded.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
import zarr

from actstore.format import codecs, layout
from actstore.format.device_codecs import DEVICE_STORED_DTYPE
from actstore.format.metadata import TokenizationAttrs
from actstore.models.sites import Tap
from actstore.storage.location import Location


class Pieces(NamedTuple):
    """The forward-pass pieces of a unit: samples, or the context windows that own a row of it."""

    ids: np.ndarray
    """int64 token ids from the first piece's first token on."""
    starts: np.ndarray
    """int64 ``(p,)``: each piece's first row (absolute)."""
    lens: np.ndarray
    """int64 ``(p,)``: each piece's tokens."""
    keep: np.ndarray
    """int64 ``(p,)``: each piece's first owned offset (0 for whole samples and first windows)."""


class Batch(NamedTuple):
    """One forward batch of a unit: its hidden states on the device and where its owned rows go."""

    dest: np.ndarray
    """int64 ``(m,)``: each owned row's offset in the unit (``row - u0``), in the order they are packed."""
    hidden: dict[int, torch.Tensor]
    """layer -> ``(batch, width, d_model)`` on the forward pass's device, in the model's dtype."""
    flat: torch.Tensor
    """int64 ``(m,)`` on the device: each owned row's index into ``(batch * width)``."""

    def rows(self, layer: int) -> torch.Tensor:
        """``(m, d_model)``: the owned rows of ``layer``, packed (one gather; padding and context dropped)."""
        t = self.hidden[layer]
        return t.reshape(-1, t.shape[-1]).index_select(0, self.flat)


def ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For pieces of ``counts (p,)`` elements: each element's piece and its offset within it, ``(sum(counts),)`` each."""
    piece = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    offset = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(
        np.cumsum(counts) - counts, counts
    )
    return piece, offset


def packed_batches(
    tap: Tap, pieces: Pieces, u0: int, u1: int, batch_size: int, device: str
) -> Iterator[Batch]:
    """The forward batches of rows ``[u0, u1)``, longest pieces first. Inputs are built and the owned rows located
    with one index operation per batch, not a loop over the pieces."""
    ids, starts, lens, keep = pieces
    base = int(starts[0])
    order = np.argsort(-lens, kind="stable")  # bucket by length: longest first
    cuda = device.startswith("cuda")
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cuda
        else torch.autocast("cpu", enabled=False)
    )
    for b0 in range(0, len(order), batch_size):
        sel = order[b0 : b0 + batch_size]
        n_tok, width = lens[sel].astype(np.int64), int(lens[sel].max())
        j, off = ragged(n_tok)  # every token of the batch: its row in the batch, its position
        inp = np.zeros((len(sel), width), dtype=np.int64)
        mask = np.zeros((len(sel), width), dtype=np.int64)
        inp[j, off] = ids[starts[sel][j] - base + off]
        mask[j, off] = 1
        # the rows each piece owns within the unit: [r0, r1)
        r0 = np.maximum(starts[sel] + keep[sel], u0)
        r1 = np.minimum(starts[sel] + n_tok, u1)
        jo, oo = ragged(np.maximum(r1 - r0, 0))
        pos = r0[jo] - starts[sel][jo] + oo  # (m,) position of each owned row in its piece
        # (m,) into (batch * width)
        flat = torch.from_numpy(jo * width + pos).to(device, non_blocking=True)
        with amp:
            hs = tap(
                torch.from_numpy(inp).to(device, non_blocking=True),
                torch.from_numpy(mask).to(device, non_blocking=True),
            )
        yield Batch(r0[jo] - u0 + oo, hs, flat)


class HostRows:
    """Host buffers for the rows of one unit of every layer, allocated once and reused unit after unit (a slot of
    :class:`HostSlots`): ``values[layer] (unit_rows, d_model)`` float32 (encoded by the writer) or in the stored dtype
    (encoded on the device), ``scales[layer] (unit_rows,)`` float16 for int8 encoded on the device. Pinned on CUDA, so
    the device-to-host copies run asynchronously."""

    def __init__(
        self, layers: list[int], unit_rows: int, d_model: int, codec: str | None, pin: bool
    ) -> None:
        dtype = torch.float32 if codec is None else DEVICE_STORED_DTYPE[codec]
        new = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, pin_memory=pin)  # noqa: E731
        self.values = {layer: new(unit_rows, d_model) for layer in layers}
        self.scales = (
            {layer: new(unit_rows, dt=torch.float16) for layer in layers} if codec == "int8" else {}
        )


class HostSlots:
    """A fixed pool of :class:`HostRows`: what bounds the memory of units in flight (computed, being written)."""

    def __init__(self, n: int, make: Callable[[], HostRows]) -> None:
        self.free: queue.Queue[HostRows] = queue.Queue()
        for _ in range(n):
            self.free.put(make())

    def take(self) -> HostRows:
        """A free slot, waiting while every slot holds a unit being written."""
        return self.free.get()

    def give_back(self, slot: HostRows) -> None:
        self.free.put(slot)


class DeviceToHost:
    """Copies from the forward pass's device into host buffers: on CUDA on a stream of its own (each copy waits for
    the computation that made its source, and no ``synchronize`` per batch: the forward pass of the next batch runs
    while this one copies); elsewhere a plain copy."""

    def __init__(self, device: str) -> None:
        self.stream = torch.cuda.Stream(torch.device(device)) if device.startswith("cuda") else None

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        if self.stream is None:
            dst.copy_(src)
            return
        self.stream.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        src.record_stream(self.stream)  # its memory is not reused before the copy has read it

    def fence(self) -> Any:
        """A CUDA event after every copy so far (None off CUDA: the copies are done)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event


class UnitRows(NamedTuple):
    """One unit's rows as the forward pass leaves them on the host: packed in batch order in a slot."""

    order: np.ndarray
    """int64 ``(n,)``: the unit offset of each packed row (a permutation of ``0..n-1``)."""
    slot: HostRows
    """Where they are: float32 rows (``encoded`` False) or their stored form."""
    encoded: bool
    """Encoded on the device already (stored dtype), or float32 for the writer to encode."""
    ready: Any
    """A CUDA event to wait for before reading the slot, or None."""

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    def inverse(self) -> np.ndarray:
        """int64 ``(n,)``: the packed index of each unit row."""
        inv = np.empty_like(self.order)
        inv[self.order] = np.arange(len(self.order), dtype=np.int64)
        return inv

    def stored(
        self, layer: int, codec: str, chan: np.ndarray | None, rows: np.ndarray
    ) -> codecs.Encoded:
        """Unit rows ``rows`` (packed indices, from :meth:`inverse`) of ``layer`` in their stored form: encoded here
        (bit for bit the device codec's bytes) or gathered from the device's encoding."""
        self.wait()
        x = self.slot.values[layer].numpy()
        if not self.encoded:
            out = codecs.empty_encoded(len(rows), x.shape[1], codec)
            codecs.encode_into(x, codec, chan, out, rows)
            return out
        values = x.take(rows, axis=0)
        if values.dtype == np.int16:  # bf16 bits
            values = values.view(np.uint16)
        scale = self.slot.scales[layer].numpy().take(rows) if codec == "int8" else None
        # left unchecked on the device (no wait per batch)
        if scale is not None and not np.isfinite(scale).all():
            raise ValueError(codecs.SCALE_TOO_LARGE)
        return codecs.Encoded(values, scale)

    def channel_scale(self, layer: int) -> np.ndarray:
        """The int8 channel scale of these float32 rows of ``layer``, taken in unit order."""
        self.wait()
        return codecs.channel_scale(self.slot.values[layer].numpy(), self.inverse())


def compute_unit(
    tap: Tap,
    pieces: Pieces,
    u0: int,
    u1: int,
    layers: list[int],
    batch_size: int,
    device: str,
    slot: HostRows,
    transfer: DeviceToHost,
    codec: str | None = None,
    chans: dict[int, torch.Tensor] | None = None,
) -> UnitRows:
    """Rows ``[u0, u1)`` of every layer into ``slot``, packed in batch order: float32 (``codec`` None: the writer
    encodes them), or encoded on the device by :mod:`actstore.format.device_codecs` (bit for bit what
    ``codecs.encode`` gives; ``chans``: each int8 layer's channel scale on the device) so that only the stored dtype
    crosses to the host."""
    from actstore.format import device_codecs

    order = np.empty(u1 - u0, dtype=np.int64)
    p0 = 0
    for batch in packed_batches(tap, pieces, u0, u1, batch_size, device):
        m = len(batch.dest)
        order[p0 : p0 + m] = batch.dest
        for layer in layers:
            dst = slot.values[layer][p0 : p0 + m]
            if (
                codec is None
                and batch.hidden[layer].dtype == torch.float32
                and transfer.stream is None
            ):
                t = batch.hidden[layer]  # the gather writes straight into the slot
                torch.index_select(t.reshape(-1, t.shape[-1]), 0, batch.flat, out=dst)
                continue
            rows = batch.rows(layer)
            if codec is None:
                transfer.copy(rows.to(torch.float32), dst)
                continue
            # checked by the writer
            enc = device_codecs.encode(rows, codec, (chans or {}).get(layer), check=False)
            transfer.copy(enc.values, dst)
            if enc.scale is not None:
                transfer.copy(enc.scale, slot.scales[layer][p0 : p0 + m])
        p0 += m
    if p0 != u1 - u0:
        raise AssertionError(f"the pieces of rows {u0}-{u1} own {p0} rows, not {u1 - u0}")
    return UnitRows(order, slot, codec is not None, transfer.fence())


def forward_rows(
    tap: Tap,
    pieces: Pieces,
    u0: int,
    u1: int,
    layers: list[int],
    d_model: int,
    batch_size: int,
    device: str,
    codec: str | None = None,
    chans: dict[int, np.ndarray] | None = None,
) -> UnitRows:
    """:func:`compute_unit` into a fresh slot (unpinned): a unit computed outside the writer's pool (the int8
    channel scale's first unit) and the reference of the tests."""
    slot = HostRows(layers, u1 - u0, d_model, codec, pin=False)
    dev = {
        layer: torch.from_numpy(np.asarray(c, np.float32)).to(device)
        for layer, c in (chans or {}).items()
    }
    return compute_unit(
        tap, pieces, u0, u1, layers, batch_size, device, slot, DeviceToHost(device), codec, dev
    )


class UnitIndex:
    """The token index read once, cut into units of ``unit_rows`` rows: each unit's samples and token ids."""

    def __init__(self, loc: Location, tk: str, n_rows: int, unit_rows: int) -> None:
        tok = zarr.open_group(loc.zarr_store, path=layout.tokenization_dir(tk), mode="r")
        attrs = TokenizationAttrs.read(tok, f"tokenization {tk} of store {loc.url}")
        self.window, self.stride = attrs.window, attrs.stride

        def array(name: str) -> zarr.Array:  # one of the token index's arrays
            return zarr.open_array(loc.zarr_store, path=layout.token_array(tk, name), mode="r")

        self.first_row = np.asarray(array("sample_first_row")[:], dtype=np.int64)  # (n_samples,)
        self.n_tok = np.asarray(array("sample_n_tokens")[:], dtype=np.int64)  # (n_samples,)
        self.token_id = array("token_id")
        self.n_rows, self.unit_rows = n_rows, unit_rows

    def bounds(self, start: int) -> Iterator[tuple[int, int]]:
        for u0 in range(start, self.n_rows, self.unit_rows):
            yield u0, min(u0 + self.unit_rows, self.n_rows)

    def samples(self, u0: int, u1: int) -> Pieces:
        """The pieces of rows ``[u0, u1)``: the samples overlapping it, or with context windows the windows that own a
        row of it."""
        s_lo = int(np.searchsorted(self.first_row, u0, side="right")) - 1
        s_hi = int(np.searchsorted(self.first_row, u1, side="left"))
        starts, lens = self.first_row[s_lo:s_hi], self.n_tok[s_lo:s_hi]
        ids = np.asarray(self.token_id[int(starts[0]) : int(starts[-1] + lens[-1])], dtype=np.int64)
        if not self.window:
            return Pieces(ids, starts, lens, np.zeros(len(starts), dtype=np.int64))
        n, step = int(self.window), int(self.stride or self.window)
        p_start, p_len, p_keep = [], [], []
        for s0, length in zip(starts.tolist(), lens.tolist(), strict=True):
            k = 0
            while True:
                b = k * step
                own0 = 0 if k == 0 else n - step  # first owned offset within the window
                if b + own0 >= length:
                    break
                end = min(b + n, length)
                if s0 + b + own0 < u1 and s0 + end > u0:  # owns a row of this unit
                    p_start.append(s0 + b)
                    p_len.append(end - b)
                    p_keep.append(own0)
                k += 1
        as64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
        # packed_batches reads piece ids relative to the first piece's start
        return Pieces(ids[p_start[0] - int(starts[0]) :], as64(p_start), as64(p_len), as64(p_keep))
