"""A unit's rows packed with one gather per batch (issue 29 item 2) equal the per-piece scatter they replace, on
ragged batches and context windows; rows encoded on the device equal the numpy codec of the float rows, bit for bit;
the blocked codec the writers run (rows gathered as they are encoded) equals the whole-array formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actstore.format import codecs
from actstore.models.loading import load_model
from actstore.models.taps import LayerTap
from actstore.store.forward import Pieces, forward_rows, ragged


def forward_unit(tap, pieces, u0, u1, layers, d_model, batch_size, device):
    """Rows ``[u0, u1)`` of every layer, float32 in row order: the packed rows unpermuted by the fp32 codec."""
    rows = forward_rows(tap, pieces, u0, u1, layers, d_model, batch_size, device)
    return {layer: rows.stored(layer, "fp32", None, rows.inverse()).values for layer in layers}


def scatter_reference(tap, ids, starts, lens, u0, u1, layers, d_model, batch_size, keep):
    """The per-piece loop of forward_unit before issue 29, kept as the reference."""
    bufs = {layer: np.full((u1 - u0, d_model), np.nan, dtype=np.float32) for layer in layers}
    base = int(starts[0])
    order = np.argsort(-lens, kind="stable")
    for b0 in range(0, len(order), batch_size):
        sel = order[b0 : b0 + batch_size]
        width = int(lens[sel].max())
        inp = np.zeros((len(sel), width), dtype=np.int64)
        mask = np.zeros((len(sel), width), dtype=np.int64)
        for j, s in enumerate(sel):
            a = int(starts[s]) - base
            inp[j, : lens[s]] = ids[a : a + lens[s]]
            mask[j, : lens[s]] = 1
        hs = tap(torch.from_numpy(inp), torch.from_numpy(mask))
        for layer in layers:
            h = hs[layer].float().numpy()
            for j, s in enumerate(sel):
                r0, r1 = max(int(starts[s] + keep[s]), u0), min(int(starts[s]) + int(lens[s]), u1)
                if r1 > r0:
                    p0 = r0 - int(starts[s])
                    bufs[layer][r0 - u0 : r1 - u0] = h[j, p0 : p0 + (r1 - r0)]
    return bufs


@pytest.fixture(scope="module")
def tap(tiny_bert_dir):
    return LayerTap(load_model(tiny_bert_dir, "cpu"), [1, 3])


def pieces(windowed: bool):
    """Token ids and pieces covering rows 0..n: ragged samples, or overlapping windows owning their tails."""
    rng = np.random.default_rng(3)
    if not windowed:
        lens = rng.integers(1, 40, size=23).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        keep = np.zeros(len(lens), np.int64)
        ids = rng.integers(1000, 2000, size=int(lens.sum())).astype(np.int64)
        return ids, starts, lens, keep, int(lens.sum())
    n, step, length = 16, 8, 70  # one sample of 70 tokens in windows of 16, stride 8
    starts = np.arange(0, length - n + step, step, dtype=np.int64)
    lens = np.minimum(n, length - starts).astype(np.int64)
    keep = np.where(starts == 0, 0, n - step).astype(np.int64)
    ids = rng.integers(1000, 2000, size=length).astype(np.int64)
    return ids, starts, lens, keep, length


@pytest.mark.parametrize("windowed", [False, True])
@pytest.mark.parametrize(("u0", "u1"), [(0, None), (17, 61)])
def test_packed_rows_equal_the_per_piece_scatter(tap, windowed, u0, u1):
    ids, starts, lens, keep, n = pieces(windowed)
    u1 = n if u1 is None else u1
    want = scatter_reference(tap, ids, starts, lens, u0, u1, [1, 3], 32, 5, keep)
    got = forward_unit(tap, Pieces(ids, starts, lens, keep), u0, u1, [1, 3], 32, 5, "cpu")
    for layer in (1, 3):
        assert not np.isnan(want[layer]).any(), "the reference must fill every row"
        np.testing.assert_array_equal(got[layer], want[layer])


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_rows_encoded_on_the_device_equal_the_numpy_codec(tap, codec):
    ids, starts, lens, keep, n = pieces(False)
    pcs = Pieces(ids, starts, lens, keep)
    rows = forward_unit(tap, pcs, 5, n, [1, 3], 32, 4, "cpu")
    chans = (
        {layer: codecs.channel_scale(rows[layer]) for layer in (1, 3)} if codec == "int8" else {}
    )
    packed = forward_rows(tap, pcs, 5, n, [1, 3], 32, 4, "cpu", codec, chans)
    for layer in (1, 3):
        got = packed.stored(layer, codec, None, packed.inverse())
        want = codecs.encode(rows[layer], codec, chans.get(layer))
        assert got.values.dtype == want.values.dtype
        np.testing.assert_array_equal(got.values, want.values)
        if codec == "int8":
            np.testing.assert_array_equal(got.scale, want.scale)


def test_ragged_indices():
    piece, offset = ragged(np.array([2, 0, 3]))
    np.testing.assert_array_equal(piece, [0, 0, 2, 2, 2])
    np.testing.assert_array_equal(offset, [0, 1, 0, 1, 2])


@pytest.mark.parametrize("codec", codecs.CODECS)
@pytest.mark.parametrize("block", [1, 7, 256])
def test_blocked_codec_with_a_gather_equals_the_whole_array_formulas(codec, block):
    rng = np.random.default_rng(block)
    x = (rng.standard_normal((300, 24)) * 10.0 ** rng.uniform(-3, 6, (300, 24))).astype(np.float32)
    x[4] = 0.0
    chan = codecs.channel_scale(x) if codec == "int8" else None
    rows = rng.permutation(300)[:211]
    out = codecs.empty_encoded(len(rows), 24, codec)
    codecs.encode_into(x, codec, chan, out, rows, block=block)
    want = whole_array(x[rows], codec, chan)
    np.testing.assert_array_equal(out.values, want[0])
    if codec == "int8":
        np.testing.assert_array_equal(out.scale, want[1])


def whole_array(x, codec, chan):
    """The codec's formulas of docs/FORMAT.md on the whole array at once (the numpy codec before issue 29)."""
    if codec == "fp32":
        return x, None
    if codec == "fp16":
        return np.clip(x, -codecs.FP16_MAX, codecs.FP16_MAX).astype(np.float16), None
    if codec == "bf16":
        u = x.view(np.uint32)
        return ((u + ((u >> 16) & 1) + np.uint32(0x7FFF)) >> 16).astype(np.uint16), None
    y = x / chan[None, :]
    scale = codecs.scale_dtype_round((np.abs(y).max(axis=1) / 127.0).astype(np.float32))
    safe = np.where(scale > 0, scale.astype(np.float32), 1.0).astype(np.float32)
    return np.rint(y / safe[:, None]).clip(-127, 127).astype(np.int8), scale


@pytest.mark.parametrize(("n", "block"), [(1, 256), (255, 256), (1000, 256), (1000, 7), (5, 1)])
def test_the_blocked_channel_scale_is_the_whole_array_formula(n, block):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((n, 40)) * 10.0 ** rng.uniform(-20, 18, (n, 40))).astype(np.float32)
    x[:, 3] = 0.0
    want = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=0)).astype(np.float32)
    want = np.where(want > 0, want, np.float32(1.0))
    np.testing.assert_array_equal(codecs.channel_scale(x, block=block), want)
    rows = rng.permutation(n)
    np.testing.assert_array_equal(
        codecs.channel_scale(x, rows, block=block), codecs.channel_scale(x[rows], block=block)
    )


def test_the_switch_interval_is_short_while_a_worker_runs_and_restored_after():
    import sys

    from actstore.store.worker import GIL_SWITCH_S, gil_switch

    before = sys.getswitchinterval()
    with gil_switch():
        assert sys.getswitchinterval() == min(before, GIL_SWITCH_S)
    assert sys.getswitchinterval() == before
    with pytest.raises(RuntimeError), gil_switch(0.0001):
        raise RuntimeError("a failed run restores it too")
    assert sys.getswitchinterval() == before
