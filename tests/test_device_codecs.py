"""The torch codecs (issue 29 item 1) give bit for bit what the numpy codecs give, NaN, inf, huge and zero rows
included; CUDA parity runs in bench/gpu_check.sh when a GPU is there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from actstore.format import codecs, device_codecs

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)
BLOCKS = arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 24)), elements=FLOATS)
FINITE = arrays(
    np.float32,
    st.tuples(st.integers(1, 12), st.integers(1, 24)),
    elements=st.floats(-3e4, 3e4, width=32),
)


def _same(x: np.ndarray, codec: str, chan: np.ndarray | None = None) -> None:
    try:
        want = codecs.encode(x, codec, chan)
    except (
        ValueError
    ) as exc:  # int8 refuses what its float16 scale cannot hold: so must the torch codec
        with pytest.raises(ValueError, match=str(exc)[:30]):
            device_codecs.encode(
                torch.from_numpy(x), codec, None if chan is None else torch.from_numpy(chan)
            )
        return
    got = device_codecs.to_host(
        device_codecs.encode(
            torch.from_numpy(x), codec, None if chan is None else torch.from_numpy(chan)
        )
    )
    assert got.values.dtype == np.dtype(codecs.STORED_DTYPE[codec])
    # bits, NaN payloads too
    np.testing.assert_array_equal(got.values.view(np.uint8), want.values.view(np.uint8))
    if want.scale is None:
        assert got.scale is None
    else:
        assert got.scale.dtype == want.scale.dtype
        np.testing.assert_array_equal(got.scale.view(np.uint16), want.scale.view(np.uint16))


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16"])
@settings(max_examples=150, deadline=None)
@given(x=BLOCKS)
def test_float_codecs_match_numpy_bit_for_bit(codec, x):
    _same(x, codec)


@settings(max_examples=150, deadline=None)
@given(x=BLOCKS)
def test_int8_matches_numpy_bit_for_bit_on_any_values(x):
    _same(x, "int8")


@settings(max_examples=150, deadline=None)
@given(x=FINITE, data=st.data())
def test_int8_with_a_channel_scale_matches_numpy_bit_for_bit(x, data):
    chan = codecs.channel_scale(x)
    _same(x, "int8", chan)
    tiny = np.full(
        x.shape[1],
        data.draw(st.floats(float(np.float32(1e-3)), float(np.float32(1e3)), width=32)),
        np.float32,
    )
    _same(x, "int8", tiny)


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_zero_rows_huge_values_and_wide_blocks(codec):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 768)).astype(np.float32) * 10
    x[3] = 0.0  # a zero row
    x[5, 7] = 6e4  # an outlier channel
    x[9] = np.float32(1e-40)  # subnormals
    _same(x, codec)
    _same(x, codec, codecs.channel_scale(x) if codec == "int8" else None)
    _same(np.zeros((4, 0), np.float32), codec)


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="unknown codec 'fp8'"):
        device_codecs.encode(torch.zeros(2, 2), "fp8")
