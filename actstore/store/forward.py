"""One unit of extraction: the token rows of a unit, and the forward passes that yield them for every layer.

A forward pass reads one *piece* of a sample: the whole (truncated) sample, or one of its context windows
(``--window N --stride S``), and writes the rows the piece owns: a window owns the tokens it gives the most left
context to (its first ``N`` for window 0, its last ``S`` after), so every token of a sample is one row.

Shared by the in-process extraction and its workers (:mod:`actstore.store.worker`), so a unit computed anywhere is
the same batches in the same order, and the same bytes once encoded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import zarr

from actstore.format import codecs, layout
from actstore.models.taps import LayerTap
from actstore.storage.location import Location


class Batch(NamedTuple):
    """One forward batch of a unit, its owned rows packed on the device."""

    dest: np.ndarray
    """int64 ``(m,)``: each packed row's offset in the unit (``row - u0``)."""
    rows: dict[int, torch.Tensor]
    """layer -> ``(m, d_model)`` rows on the forward pass's device, in the model's dtype."""


def ragged(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For pieces of ``counts (p,)`` elements: each element's piece and its offset within it, ``(sum(counts),)`` each."""
    piece = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    offset = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return piece, offset


def packed_batches(
    tap: LayerTap, ids: np.ndarray, starts: np.ndarray, lens: np.ndarray, u0: int, u1: int, batch_size: int,
    device: str, keep: np.ndarray | None = None,
) -> Iterator[Batch]:  # fmt: skip
    """The forward batches of rows ``[u0, u1)`` (pieces given by absolute ``starts`` and ``lens``, each owning its rows
    from ``starts + keep`` on; ``keep`` default 0), longest pieces first. Inputs are built and the owned rows gathered
    (padding and context dropped) with one index operation per batch, not a loop over the pieces."""
    keep = np.zeros(len(starts), dtype=np.int64) if keep is None else keep
    base = int(starts[0])
    order = np.argsort(-lens, kind="stable")  # bucket by length: longest first
    cuda = device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    for b0 in range(0, len(order), batch_size):
        sel = order[b0 : b0 + batch_size]
        n_tok, width = lens[sel].astype(np.int64), int(lens[sel].max())
        j, off = ragged(n_tok)  # every token of the batch: its row in the batch, its position
        inp = np.zeros((len(sel), width), dtype=np.int64)
        mask = np.zeros((len(sel), width), dtype=np.int64)
        inp[j, off] = ids[starts[sel][j] - base + off]
        mask[j, off] = 1
        r0 = np.maximum(starts[sel] + keep[sel], u0)  # the rows each piece owns within the unit: [r0, r1)
        r1 = np.minimum(starts[sel] + n_tok, u1)
        jo, oo = ragged(np.maximum(r1 - r0, 0))
        pos = r0[jo] - starts[sel][jo] + oo  # (m,) position of each owned row in its piece
        flat = torch.from_numpy(jo * width + pos).to(device, non_blocking=True)  # (m,) into (batch * width)
        with amp:
            hs = tap(torch.from_numpy(inp).to(device, non_blocking=True), torch.from_numpy(mask).to(device, non_blocking=True))
        yield Batch(r0[jo] - u0 + oo, {layer: t.reshape(-1, t.shape[-1]).index_select(0, flat) for layer, t in hs.items()})


def forward_encoded(
    tap: LayerTap, ids: np.ndarray, starts: np.ndarray, lens: np.ndarray, u0: int, u1: int, layers: list[int],
    d_model: int, batch_size: int, device: str, codec: str, chans: dict[int, np.ndarray],
    keep: np.ndarray | None = None,
) -> dict[int, codecs.Encoded]:  # fmt: skip
    """Rows ``[u0, u1)`` of every layer in their stored form (``codec``; ``chans``: each int8 layer's channel scale),
    encoded on the forward pass's device by :mod:`actstore.format.device_codecs` (bit for bit what ``codecs.encode``
    gives for the float32 rows), so only the stored dtype crosses to the host."""
    from actstore.format import device_codecs

    dtype = np.dtype(codecs.STORED_DTYPE[codec])
    vals = {layer: np.empty((u1 - u0, d_model), dtype=dtype) for layer in layers}
    scales = {layer: np.empty(u1 - u0, dtype=codecs.SCALE_DTYPE) for layer in layers} if codec == "int8" else {}
    chan_dev = {layer: torch.from_numpy(np.asarray(c, np.float32)).to(device) for layer, c in chans.items()}
    for batch in packed_batches(tap, ids, starts, lens, u0, u1, batch_size, device, keep):
        for layer in layers:
            enc = device_codecs.to_host(device_codecs.encode(batch.rows[layer], codec, chan_dev.get(layer)))
            vals[layer][batch.dest] = enc.values
            if enc.scale is not None:
                scales[layer][batch.dest] = enc.scale
    return {layer: codecs.Encoded(vals[layer], scales.get(layer)) for layer in layers}


def forward_unit(
    tap: LayerTap, ids: np.ndarray, starts: np.ndarray, lens: np.ndarray, u0: int, u1: int, layers: list[int],
    d_model: int, batch_size: int, device: str, keep: np.ndarray | None = None,
) -> dict[int, np.ndarray]:  # fmt: skip
    """Rows ``[u0, u1)`` of every layer, float32 ``(u1 - u0, d_model)``: :func:`forward_encoded` with the fp32 codec."""
    enc = forward_encoded(tap, ids, starts, lens, u0, u1, layers, d_model, batch_size, device, "fp32", {}, keep)
    return {layer: e.values for layer, e in enc.items()}


class UnitIndex:
    """The token index read once, cut into units of ``unit_rows`` rows: each unit's samples and token ids."""

    def __init__(self, loc: Location, tk: str, n_rows: int, unit_rows: int) -> None:
        from actstore.store.reader import ATTR

        tok = zarr.open_group(loc.zarr_store, path=layout.tokenization_dir(tk), mode="r")
        attrs = tok.attrs.get(ATTR, {})
        self.window, self.stride = attrs.get("window"), attrs.get("stride")
        self.first_row = np.asarray(tok["sample_first_row"][:], dtype=np.int64)  # (n_samples,)
        self.n_tok = np.asarray(tok["sample_n_tokens"][:], dtype=np.int64)  # (n_samples,)
        self.token_id = tok["token_id"]
        self.n_rows, self.unit_rows = n_rows, unit_rows

    def bounds(self, start: int) -> Iterator[tuple[int, int]]:
        for u0 in range(start, self.n_rows, self.unit_rows):
            yield u0, min(u0 + self.unit_rows, self.n_rows)

    def samples(self, u0: int, u1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(token ids of the samples overlapping [u0, u1), the pieces' first rows, lengths, first owned offsets)``:
        the pieces are the samples, or with context windows the windows that own a row of ``[u0, u1)``."""
        s_lo = int(np.searchsorted(self.first_row, u0, side="right")) - 1
        s_hi = int(np.searchsorted(self.first_row, u1, side="left"))
        starts, lens = self.first_row[s_lo:s_hi], self.n_tok[s_lo:s_hi]
        ids = np.asarray(self.token_id[int(starts[0]) : int(starts[-1] + lens[-1])], dtype=np.int64)
        if not self.window:
            return ids, starts, lens, np.zeros(len(starts), dtype=np.int64)
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
        # forward_unit reads piece ids relative to the first piece's start
        return ids[p_start[0] - int(starts[0]) :], as64(p_start), as64(p_len), as64(p_keep)
