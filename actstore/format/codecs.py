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


def channel_scale(x: np.ndarray) -> np.ndarray:
    """Per-channel RMS ``(d_model,)`` of a block ``(n, d_model)``, zeros replaced by 1 (int8 codec)."""
    rms = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=0)).astype(np.float32)
    return np.where(rms > 0, rms, np.float32(1.0)).astype(np.float32)


def encode(x: np.ndarray, codec: str, chan: np.ndarray | None = None) -> Encoded:
    """Encode float32 activations ``(n, d_model)`` with a codec preset (``chan``: int8 channel scale)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if codec == "fp32":
        return Encoded(x, None)
    if codec == "fp16":
        return Encoded(np.clip(x, -FP16_MAX, FP16_MAX).astype(np.float16), None)
    if codec == "bf16":
        u = x.view(np.uint32)
        rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
        return Encoded(((u + rounding) >> 16).astype(np.uint16), None)
    if codec == "int8":
        if chan is not None:
            x = x / chan[None, :]
        amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(len(x), np.float32)
        scale = scale_dtype_round((amax / 127.0).astype(np.float32))  # (n,) float16, never below the exact scale
        safe = np.where(scale > 0, scale.astype(np.float32), 1.0).astype(np.float32)
        q = np.rint(x / safe[:, None]).clip(-127, 127).astype(np.int8)
        return Encoded(q, scale)
    raise ValueError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")


SCALE_DTYPE = "float16"
"""dtype of the int8 preset's per-token scale array (stores made before 2026-12 hold float32; both decode alike)."""


def scale_dtype_round(scale: np.ndarray) -> np.ndarray:
    """Per-token scales ``(n,)`` as float16, rounded up so that ``|x / scale| <= 127`` still holds.

    A per-token scale only multiplies the whole token vector, so its rounding (<= 2^-11 relative) leaves
    every cosine unchanged; the quantisation uses the rounded value, so decoding adds no error of its own.
    """
    s16 = scale.astype(np.float16)
    if not np.isfinite(s16).all():
        raise ValueError("activations too large for the int8 preset's float16 scale: use --codec fp16, bf16 or fp32")
    low = s16.astype(np.float32) < scale
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    return s16


def decode(values: np.ndarray, scale: np.ndarray | None, codec: str, chan: np.ndarray | None = None) -> np.ndarray:
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
