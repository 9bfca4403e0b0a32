"""The codec presets of :mod:`actstore.format.codecs` in torch, on the device of the forward pass.

:func:`encode` gives bit for bit what ``codecs.encode`` gives for the same float32 rows, on any device, so that only
the stored dtype crosses to the host (1 byte a value for int8, 2 for fp16 / bf16) and the codec's passes over
memory run where the activations are. The stored form and its decoding are ``codecs``'s (docs/FORMAT.md).

- fp16: clamp to +-65504, then the IEEE round-to-nearest-even cast (numpy's and torch's alike).
- bf16: the bit pattern rounded to nearest even on the upper 16 bits, in int64 so no bit is lost, returned as the
  int16 of those 16 bits (torch has no general uint16): :func:`to_host` views it as numpy's uint16.
- int8: divide by the channel scale, the per-token abs-max over 127 as float32, rounded *up* to float16
  (:func:`scale_to_float16`, as ``codecs.scale_dtype_round``), then ``round(x / scale)`` half to even and clipped to
  +-127. Every step is one IEEE float32 operation in both implementations.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from actstore.format.codecs import CODECS, FP16_MAX, SCALE_TOO_LARGE, Encoded

DEVICE_STORED_DTYPE = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.int16,
    "int8": torch.int8,
}
"""The torch dtype of each codec's stored values on the device (bf16: the int16 of its 16 bits; the host views them
as numpy's uint16)."""


class DeviceEncoded(NamedTuple):
    """Stored form of a block on its device: ``values (n, d_model)`` in the stored dtype (bf16: int16 bits) and, for
    int8, ``scale (n,)`` float16."""

    values: torch.Tensor
    scale: torch.Tensor | None


def scale_to_float16(scale: torch.Tensor, check: bool = True) -> torch.Tensor:
    """float32 per-token scales ``(n,)`` (>= 0) as float16, each rounded up where the cast rounded it down, so that
    ``|x / scale| <= 127`` still holds; ValueError when a scale does not fit float16 (or is NaN). ``check=False``
    leaves that check to whoever reads the scales on the host (it would wait for the device: the extractor checks each
    unit's scales in its writer, :meth:`actstore.store.forward.UnitRows.stored`)."""
    s16 = scale.to(torch.float16)
    if check and not bool(torch.isfinite(s16).all()):
        raise ValueError(SCALE_TOO_LARGE)
    # the cast rounded down: the next float16 up (its bits + 1, as scale >= 0)
    low = s16.to(torch.float32) < scale
    bits = s16.view(torch.int16)
    return torch.where(low, bits + 1, bits).view(torch.float16)


def encode(
    x: torch.Tensor, codec: str, chan: torch.Tensor | None = None, check: bool = True
) -> DeviceEncoded:
    """Encode float32 activations ``x (n, d_model)`` on their device (``chan (d_model,)``: the int8 channel scale;
    ``check``: see :func:`scale_to_float16`)."""
    x = x.to(torch.float32)
    if codec == "fp32":
        return DeviceEncoded(x, None)
    if codec == "fp16":
        return DeviceEncoded(x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16), None)
    if codec == "bf16":
        u = (
            x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        )  # the float's bits, unsigned
        top = (
            (u + ((u >> 16) & 1) + 0x7FFF) >> 16
        ) & 0xFFFF  # rounded to nearest even (wrapping as uint32 does)
        return DeviceEncoded(torch.where(top >= 0x8000, top - 0x10000, top).to(torch.int16), None)
    if codec == "int8":
        if chan is not None:
            x = x / chan.to(x.device, torch.float32)[None, :]
        amax = (
            x.abs().amax(dim=1)
            if x.shape[1]
            else torch.zeros(len(x), dtype=torch.float32, device=x.device)
        )
        scale = scale_to_float16(amax / 127.0, check)  # (n,) float16
        s32 = scale.to(torch.float32)
        safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
        q = torch.round(x / safe[:, None]).clamp(-127, 127).to(torch.int8)
        return DeviceEncoded(q, scale)
    raise ValueError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")


def to_host(enc: DeviceEncoded) -> Encoded:
    """The encoded block as numpy arrays in the stored dtypes (``codecs.STORED_DTYPE``): what the writer stores."""
    values = enc.values.cpu().numpy()
    if values.dtype == np.int16:  # bf16 bits
        values = values.view(np.uint16)
    return Encoded(values, None if enc.scale is None else enc.scale.cpu().numpy())
