"""Whole chunk and shard objects of a layer array, encoded here rather than through Zarr's write machinery.

Zarr writes a block of rows by a partial-update path (read the shard if it exists, one buffer per inner chunk,
combine, then write) with asyncio overhead per chunk; the extractor writes only whole objects, so it builds their
bytes itself (``bench/bench_extract.py --null-model`` measures it). The bytes are exactly the Zarr v3 encoding
docs/FORMAT.md describes, read by Zarr (and checked by ``actstore verify``) like any other:

- an unsharded array: one object per chunk of ``chunk_rows`` rows: ``bytes`` (little-endian) -> [``zstd``] ->
  ``crc32c`` (its 4 bytes appended, little-endian); the last chunk padded with the fill value (0) to full size;
- a sharded array: one object per shard: each inner chunk encoded as above, concatenated, then the index (per inner
  chunk, in C order, its ``(offset, nbytes)`` as little-endian uint64; ``2^64 - 1`` twice for a chunk past the array's
  end) with its own crc32c, at the end.

:func:`ChunkWriter.for_array` returns None for any other codec chain (an array made by another tool or version):
its rows are then written through Zarr.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync

MISSING = np.uint64(2**64 - 1)


def _crc(body: Any) -> list[Any]:
    """``body`` (bytes or a contiguous array) and its crc32c's 4 bytes: the buffers of a checksummed object."""
    return [body, google_crc32c.value(body).to_bytes(4, "little")]


def _chain(codecs: tuple) -> str | None:
    """``"plain"`` or ``"zstd"`` for the chains bytes -> [zstd level 1] -> crc32c, else None."""
    names = [type(c) for c in codecs]
    if (
        not names
        or names[0] is not BytesCodec
        or getattr(codecs[0].endian, "value", "little") != "little"
    ):
        return None  # this module writes little-endian values (an int8 array's endian is None)
    if names == [BytesCodec, Crc32cCodec]:
        return "plain"
    if (
        names == [BytesCodec, ZstdCodec, Crc32cCodec]
        and codecs[1].level == 1
        and not codecs[1].checksum
    ):
        return "zstd"
    return None


class ChunkWriter:
    """Writes whole objects of one 2-D layer array (see the module's docstring)."""

    def __init__(
        self,
        arr: zarr.Array,
        object_rows: int,
        inner_rows: int,
        compression: str,
        put: Callable[[str, list[Any]], None] | None = None,
    ) -> None:
        self.arr = arr
        self.put = put
        self.n_rows, self.d = arr.shape
        self.object_rows, self.inner_rows = object_rows, inner_rows
        self.sharded = inner_rows != object_rows
        self.dtype = np.dtype(arr.dtype).newbyteorder("<")
        self.zstd = None
        if compression == "zstd":
            from numcodecs import Zstd

            self.zstd = Zstd(level=1)
        self.proto = default_buffer_prototype()

    @classmethod
    def for_array(
        cls, arr: zarr.Array, put: Callable[[str, list[Any]], None] | None = None
    ) -> ChunkWriter | None:
        """A writer for ``arr``, or None when its layout is not one this module encodes. ``put(key, buffers)`` writes
        an object (its buffers one after the other) at a key of the store's root (default: through the array's Zarr
        store)."""
        meta = arr.metadata
        if len(arr.shape) != 2 or not isinstance(meta, ArrayV3Metadata) or meta.fill_value != 0:
            return None
        if not isinstance(meta.chunk_grid, RegularChunkGrid):
            return None
        if (
            getattr(meta.chunk_key_encoding, "separator", None) != "/"
            or type(meta.chunk_key_encoding).__name__ != "DefaultChunkKeyEncoding"
        ):
            return None
        codecs = tuple(meta.codecs)
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            sh = codecs[0]
            inner = _chain(tuple(sh.codecs))
            index = [type(c) for c in sh.index_codecs]
            shard = meta.chunk_grid.chunk_shape
            end = sh.index_location == ShardingCodecIndexLocation.end
            if (
                inner is None
                or index != [BytesCodec, Crc32cCodec]
                or not end
                or shard[0] % sh.chunk_shape[0]
            ):
                return None
            if sh.chunk_shape[1] != arr.shape[1] or shard[1] != arr.shape[1]:
                return None
            return cls(arr, int(shard[0]), int(sh.chunk_shape[0]), inner, put)
        chain = _chain(codecs)
        rows, width = meta.chunk_grid.chunk_shape
        if chain is None or width != arr.shape[1]:
            return None
        return cls(arr, int(rows), int(rows), chain, put)

    def _chunk(self, block: np.ndarray) -> list[Any]:
        """One (inner) chunk's encoded buffers: ``block (<= inner_rows, d)`` padded with zeros to full size."""
        if len(block) < self.inner_rows:
            full = np.zeros((self.inner_rows, self.d), dtype=self.dtype)
            full[: len(block)] = block
            block = full
        # no copy for a whole chunk of encoded rows
        body = np.ascontiguousarray(block, dtype=self.dtype)
        return _crc(self.zstd.encode(body.tobytes()) if self.zstd is not None else body)

    def _object(self, block: np.ndarray, r0: int) -> list[Any]:
        """The buffers of the object of rows ``[r0, r0 + len(block))`` (a whole object, or the array's last), in
        order: written one after the other, they are the object."""
        if not self.sharded:
            return self._chunk(block)
        n_inner = self.object_rows // self.inner_rows
        index = np.full((n_inner, 2), MISSING, dtype="<u8")
        parts: list[Any] = []
        offset = 0
        for i in range(n_inner):
            lo = i * self.inner_rows
            if r0 + lo >= self.n_rows:  # past the array's end: no chunk
                break
            data = self._chunk(block[lo : lo + self.inner_rows])
            size = sum(len(memoryview(b).cast("B")) for b in data)
            index[i] = (offset, size)
            parts += data
            offset += size
        return parts + _crc(index.tobytes())

    def objects(self, r0: int, values: np.ndarray) -> Iterator[tuple[str, list[Any]]]:
        """``(key, buffers)`` of each object of rows ``[r0, r0 + len(values))``: whole objects, or up to the array's end."""
        r1 = r0 + len(values)
        if (
            r0 % self.object_rows
            or (r1 % self.object_rows and r1 != self.n_rows)
            or values.shape[1:] != (self.d,)
        ):
            raise ValueError(
                f"rows {r0}-{r1} of {self.arr.path} are not whole objects of {self.object_rows} rows"
            )
        for o0 in range(r0, r1, self.object_rows):
            block = values[o0 - r0 : o0 - r0 + self.object_rows]
            key = self.arr.metadata.encode_chunk_key((o0 // self.object_rows, 0))
            yield key, self._object(block, o0)

    def write(self, r0: int, values: np.ndarray) -> None:
        """Write rows ``[r0, r0 + len(values))`` (whole objects) through the array's store."""
        for key, data in self.objects(r0, values):
            if self.put is not None:
                self.put(f"{self.arr.path}/{key}", data)
            else:
                sync((self.arr.store_path / key).set(self.proto.buffer.from_bytes(b"".join(data))))
