"""Codec presets: how float32 activations become stored arrays and back.

Each preset maps a ``(n_tokens, d_model)`` float32 block to one or two Zarr
arrays that plain zarr + numpy can decode (see ``docs/FORMAT.md``):

``fp32``   float32, exact.
``fp16``   float16 (IEEE half), values clipped to +-65504. The default.
``bf16``   bfloat16 bit patterns stored as uint16 (numpy has no bfloat16):
           ``x = (u16.astype(uint32) << 16).view(float32)``; round-to-nearest-even.
``int8``   per-token symmetric int8: ``x = q.astype(float32) * scale[:, None]``
           with ``scale`` a float32 array of shape ``(n_tokens,)`` stored beside
           ``q`` (``layer_L`` and ``layer_L_scale``), ``scale = max|x| / 127``.
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


def encode(x: np.ndarray, codec: str) -> Encoded:
    """Encode float32 activations ``(n, d_model)`` with a codec preset."""
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
        amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(len(x), np.float32)
        scale = (amax / 127.0).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.rint(x / safe[:, None]).clip(-127, 127).astype(np.int8)
        return Encoded(q, scale)
    raise ValueError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")


def decode(values: np.ndarray, scale: np.ndarray | None, codec: str) -> np.ndarray:
    """Decode a stored block back to float32 ``(n, d_model)``."""
    if codec in ("fp32", "fp16"):
        return values.astype(np.float32, copy=False)
    if codec == "bf16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    if codec == "int8":
        if scale is None:
            raise ValueError("int8 block without its scale array")
        return values.astype(np.float32) * scale[:, None]
    raise ValueError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")


def bytes_per_value(codec: str) -> float:
    return {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}[codec]
