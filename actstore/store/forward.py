"""One unit of extraction: the token rows of a unit, and the forward passes that yield them for every layer.

A forward pass reads one *piece* of a sample: the whole (truncated) sample, or one of its context windows
(``--window N --stride S``), and writes the rows the piece owns: a window owns the tokens it gives the most left
context to (its first ``N`` for window 0, its last ``S`` after), so every token of a sample is one row.

Shared by the in-process extraction and its workers (:mod:`actstore.store.worker`), so a unit computed anywhere is
the same batches in the same order, and the same bytes once encoded.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import zarr

from actstore.format import layout
from actstore.models.taps import LayerTap
from actstore.storage.location import Location


def forward_unit(
    tap: LayerTap, ids: np.ndarray, starts: np.ndarray, lens: np.ndarray, u0: int, u1: int, layers: list[int],
    d_model: int, batch_size: int, device: str, keep: np.ndarray | None = None,
) -> dict[int, np.ndarray]:  # fmt: skip
    """Rows ``[u0, u1)`` of every layer, float32 ``(u1 - u0, d_model)``; pieces given by absolute ``starts`` and
    ``lens``, each owning its rows from ``starts + keep`` on (``keep`` default 0: all of them)."""
    keep = np.zeros(len(starts), dtype=np.int64) if keep is None else keep
    bufs = {layer: np.empty((u1 - u0, d_model), dtype=np.float32) for layer in layers}
    base = int(starts[0])
    order = np.argsort(-lens, kind="stable")  # bucket by length: longest first
    cuda = device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    for b0 in range(0, len(order), batch_size):
        sel = order[b0 : b0 + batch_size]
        width = int(lens[sel].max())
        inp = np.zeros((len(sel), width), dtype=np.int64)
        mask = np.zeros((len(sel), width), dtype=np.int64)
        for j, s in enumerate(sel):
            a = int(starts[s]) - base
            inp[j, : lens[s]] = ids[a : a + lens[s]]
            mask[j, : lens[s]] = 1
        with amp:
            hs = tap(torch.from_numpy(inp).to(device, non_blocking=True), torch.from_numpy(mask).to(device, non_blocking=True))
        host = {}
        for layer, t in hs.items():
            t = t.float()
            if cuda:
                pinned = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
                pinned.copy_(t, non_blocking=True)
                host[layer] = pinned
            else:
                host[layer] = t
        if cuda:
            torch.cuda.synchronize()
        for layer in layers:
            h = host[layer].numpy()  # (batch, width, d_model)
            for j, s in enumerate(sel):
                r0, r1 = max(int(starts[s] + keep[s]), u0), min(int(starts[s]) + int(lens[s]), u1)
                if r1 > r0:
                    p0 = r0 - int(starts[s])
                    bufs[layer][r0 - u0 : r1 - u0] = h[j, p0 : p0 + (r1 - r0)]
    return bufs


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
