"""Whole objects encoded by actstore.format.chunks are the bytes Zarr writes for the same rows, read back by Zarr
unchanged, for every layout a layer array has (sharded or not, zstd or not, each stored dtype, a ragged last object)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.codecs as zc

from actstore.format.chunks import ChunkWriter
from actstore.storage.location import open_location

LAYOUTS = [  # (shards, inner chunk rows) or (None, chunk rows)
    (64, 16),
    (None, 32),
]


def arrays(tmp: Path, dtype: str, layout, compression: str, n: int):
    comp = (
        [zc.ZstdCodec(level=1), zc.Crc32cCodec()] if compression == "zstd" else [zc.Crc32cCodec()]
    )
    shard, chunk = layout
    grid = {"shards": (shard, 24), "chunks": (chunk, 24)} if shard else {"chunks": (chunk, 24)}
    return [
        zarr.create_array(
            zarr.storage.LocalStore(tmp / name),
            name="m/layer_1",
            shape=(n, 24),
            dtype=dtype,
            fill_value=0,
            compressors=comp,
            **grid,
        )
        for name in ("zarr", "ours")
    ]


@pytest.mark.parametrize("dtype", ["int8", "float16", "uint16", "float32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("through", ["location", "zarr store"])
def test_objects_are_the_bytes_zarr_writes(tmp_path, dtype, layout, compression, through):
    """Through a Location (what the extractor's writers use: buffers written one after the other) or Zarr's store."""
    n = 64 * 3 + 37  # a ragged last object (and, sharded, inner chunks past the end)
    rng = np.random.default_rng(0)
    # no all-zero chunk (Zarr would skip writing it)
    values = rng.integers(1, 100, (n, 24)).astype(dtype)
    ref, ours = arrays(tmp_path, dtype, layout, compression, n)
    ref[:] = values
    put = (
        open_location(str(tmp_path / "ours"), create=False, writable=True).write_bytes
        if through == "location"
        else None
    )
    writer = ChunkWriter.for_array(ours, put)
    assert writer is not None
    step = writer.object_rows
    for r0 in range(0, n, step):
        writer.write(r0, values[r0 : r0 + step])
    np.testing.assert_array_equal(ours[:], values)
    files = lambda root: {
        p.relative_to(root): p.read_bytes()
        for p in (root / "m/layer_1/c").rglob("*")
        if p.is_file()
    }  # noqa: E731
    assert files(tmp_path / "ours") == files(tmp_path / "zarr")


def test_rows_that_are_not_whole_objects_are_refused(tmp_path):
    _, ours = arrays(tmp_path, "int8", (64, 16), "none", 200)
    with pytest.raises(ValueError, match="not whole objects of 64 rows"):
        ChunkWriter.for_array(ours).write(16, np.ones((64, 24), np.int8))


def test_an_array_of_another_layout_is_left_to_zarr(tmp_path):
    arr = zarr.create_array(
        str(tmp_path / "a"), shape=(10, 4), dtype="int8", chunks=(5, 2), fill_value=0
    )
    assert ChunkWriter.for_array(arr) is None
    big = zarr.create_array(
        str(tmp_path / "b"),
        shape=(10, 4),
        dtype="float16",
        chunks=(5, 4),
        fill_value=0,
        serializer=zc.BytesCodec(endian="big"),
        compressors=[zc.Crc32cCodec()],
    )
    assert ChunkWriter.for_array(big) is None  # big-endian values: Zarr writes them
