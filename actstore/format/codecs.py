"""Codec presets: how float32 activations become stored arrays and back.

Each preset maps a ``(n_tokens, d_model)`` float32 block to one or two Zarr
arrays that plain zarr + numpy can decode (see ``docs/FORMAT.md``):

``fp32``   float32, exact.
``fp16``   float16 (IEEE half), values clipped to +-65504. The default.
``bf16``   bfloat16 bit patterns stored as uint16 (numpy has no bfloat16):
           ``x = (u16.astype(uint32) << 16).view(float32)``; round-to-nearest-even.
``int8``   int8 with a per-token scale and a fixed per-channel scale:
           ``x = q.astype(float32) * scale[:, None] * channel_scale[None, :]``.
           ``scale`` is a float32 array ``(n_tokens,)`` stored beside ``q``
           (``layer_L`` and ``layer_L_scale``); ``channel_scale`` (``(d_model,)``,
           the RMS of each channel over the array's first unit of rows) is in the
           array's attributes. Dividing by the channel scale first flattens the
           outlier channels of transformer residual streams, so the per-token
           ``scale = max|x / channel_scale| / 127`` keeps mean cosine >= 0.9999.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

CODECS = ("fp32", "fp16", "bf16", "int8")
STORED_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "uint16", "int8": "int8"}
FP16_MAX = 65504.0


class Encoded(NamedTuple):
    """Stored form of a block: values ``(n, d_model)`` and, for int8, ``scale`` ``(n,)``."""

    values: np.ndarray
    scale: np.ndarray | None


def channel_scale(x: np.ndarray, rows: np.ndarray | None = None, block: int = 256) -> np.ndarray:
    """Per-channel RMS ``(d_model,)`` of a block ``x[rows] (n, d_model)`` (``rows`` default all), zeros replaced by 1
    (int8 codec): ``sqrt(mean(x ** 2, axis=0))`` in float64, the sum taken row after row as numpy's axis-0 reduction
    does, ``block`` rows at a time (no float64 copy of the whole block)."""
    n = len(x) if rows is None else len(rows)
    acc = np.zeros((1, x.shape[1]), dtype=np.float64)
    for b0 in range(0, n, block):
        part = x[b0 : b0 + block] if rows is None else x.take(rows[b0 : b0 + block], axis=0)
        sq = np.square(part, dtype=np.float64)
        if b0:
            # the running sum first: the same additions, in the same order
            sq = np.concatenate([acc, sq])
        acc = np.add.reduce(sq, axis=0, keepdims=True)
    rms = np.sqrt(acc[0] / n if n else np.full(x.shape[1], np.nan)).astype(np.float32)
    return np.where(rms > 0, rms, np.float32(1.0)).astype(np.float32)


ENCODE_BLOCK_ROWS = 512
"""Rows :func:`encode_into` encodes at a time: 768-wide float32 blocks of 1.5 MiB, so each of the codec's passes
reads and writes the CPU's cache instead of memory, in few enough calls that writer threads seldom wait for each
other's Python."""


def encode(x: np.ndarray, codec: str, chan: np.ndarray | None = None) -> Encoded:
    """Encode float32 activations ``(n, d_model)`` with a codec preset (``chan``: int8 channel scale)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if codec == "fp32":
        return Encoded(x, None)
    out = empty_encoded(len(x), x.shape[1], codec)
    encode_into(x, codec, chan, out)
    return out


def empty_encoded(n: int, d_model: int, codec: str) -> Encoded:
    """Uninitialised stored arrays for ``n`` rows: values ``(n, d_model)`` and, for int8, scales ``(n,)``."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")
    scale = np.empty(n, dtype=SCALE_DTYPE) if codec == "int8" else None
    return Encoded(np.empty((n, d_model), dtype=STORED_DTYPE[codec]), scale)


def encode_into(
    x: np.ndarray,
    codec: str,
    chan: np.ndarray | None,
    out: Encoded,
    rows: np.ndarray | None = None,
    block: int = ENCODE_BLOCK_ROWS,
) -> None:
    """Encode float32 rows ``x[rows]`` (``rows (n,)``, default all of ``x``) into ``out`` (from
    :func:`empty_encoded`), ``block`` rows at a time: the same IEEE operations, so the same bytes, as the whole-array
    formulas of the module's docstring. The gather of ``rows`` is fused into the first pass (a writer unpermutes the
    batch-ordered rows of a unit as it encodes them)."""
    n = len(x) if rows is None else len(rows)
    d = x.shape[1]
    tmp = np.empty((min(block, n), d), dtype=np.float32)  # this block's float32 rows, in cache
    tmp2 = np.empty_like(tmp) if codec in ("int8", "bf16") else tmp
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        y, z = tmp[: b1 - b0], tmp2[: b1 - b0]
        if rows is None:
            np.copyto(y, x[b0:b1])
        else:
            np.take(x, rows[b0:b1], axis=0, out=y)
        if codec == "fp32":
            out.values[b0:b1] = y
        elif codec == "fp16":
            np.clip(y, -FP16_MAX, FP16_MAX, out=y)
            np.copyto(out.values[b0:b1], y, casting="unsafe")
        elif codec == "bf16":
            u, r = y.view(np.uint32), z.view(np.uint32)
            np.right_shift(u, 16, out=r)
            np.bitwise_and(r, 1, out=r)
            r += np.uint32(0x7FFF)
            u += r  # wraps as uint32, as the whole-array formula does
            np.right_shift(u, 16, out=u)
            np.copyto(out.values[b0:b1], u, casting="unsafe")
        elif codec == "int8":
            if chan is not None:
                np.divide(y, chan[None, :], out=y)
            amax = np.abs(y, out=z).max(axis=1) if d else np.zeros(len(y), np.float32)
            # (m,) float16, never below the exact scale
            scale = scale_dtype_round((amax / 127.0).astype(np.float32))
            safe = np.where(scale > 0, scale.astype(np.float32), 1.0).astype(np.float32)
            np.divide(y, safe[:, None], out=y)
            np.rint(y, out=y)
            np.clip(y, -127, 127, out=y)
            np.copyto(out.values[b0:b1], y, casting="unsafe")
            assert out.scale is not None
            out.scale[b0:b1] = scale
        else:
            raise ValueError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")


SCALE_TOO_LARGE = (
    "activations too large for the int8 preset's float16 scale: use --codec fp16, bf16 or fp32"
)

SCALE_DTYPE = "float16"
"""dtype of the int8 preset's per-token scale array (stores made before 2026-12 hold float32; both decode alike)."""


def scale_dtype_round(scale: np.ndarray) -> np.ndarray:
    """Per-token scales ``(n,)`` as float16, rounded up so that ``|x / scale| <= 127`` still holds.

    A per-token scale only multiplies the whole token vector, so its rounding (<= 2^-11 relative) leaves
    every cosine unchanged; the quantisation uses the rounded value, so decoding adds no error of its own.
    """
    s16 = scale.astype(np.float16)
    if not np.isfinite(s16).all():
        raise ValueError(SCALE_TOO_LARGE)
    low = s16.astype(np.float32) < scale
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    return s16


def decode(
    values: np.ndarray, scale: np.ndarray | None, codec: str, chan: np.ndarray | None = None
) -> np.ndarray:
    """Decode a stored block back to float32 ``(n, d_model)`` (``chan``: int8 channel scale)."""
    if codec in ("fp32", "fp16"):
        return values.astype(np.float32, copy=False)
    if codec == "bf16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    if codec == "int8":
        if scale is None:
            raise ValueError("int8 block without its scale array")
        x = values.astype(np.float32) * scale.astype(np.float32)[:, None]
        return x * chan[None, :] if chan is not None else x
    raise ValueError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")
