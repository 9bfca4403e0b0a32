"""Store format 2: sharded layer arrays, checked inner chunk by inner chunk; format-1 stores still read (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.data.corpora import DataConfig
from actstore.errors import ConfigError, IntegrityError
from actstore.format import layout
from actstore.storage.config import CopyConfig
from actstore.storage.copy import copy_store
from actstore.storage.verify import verify
from actstore.store.config import ExtractConfig
from actstore.store.extract import extract


def _extract(
    path: str, model: str, corpus: str, codec: str = "fp16", inner_rows: int = 16, **kw
) -> None:
    cfg = ExtractConfig(
        model,
        DataConfig(corpus),
        [1, 3],
        name="m",
        codec=codec,
        chunk_rows=64,
        unit_rows=128,
        inner_rows=inner_rows,
        batch_size=8,
        device="cpu",
        **kw,
    )
    extract(path, cfg, progress=False)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_bert_dir, corpus_file) -> str:
    path = str(tmp_path_factory.mktemp("shards") / "s.zarr")
    _extract(path, tiny_bert_dir, corpus_file, codec="int8")
    return path


def _meta(store: str, array: str) -> dict:
    return json.loads((Path(store) / array / "zarr.json").read_text())


def test_new_stores_have_sharded_layers(sharded):
    assert (
        json.loads((Path(sharded) / "zarr.json").read_text())["attributes"]["actstore"]["format"]
        >= 2
    )
    meta = _meta(sharded, "models/m/layer_3")
    shard = meta["codecs"][0]
    assert (
        shard["name"] == "sharding_indexed"
        and meta["chunk_grid"]["configuration"]["chunk_shape"][0] == 64
    )
    assert shard["configuration"]["chunk_shape"][0] == 16
    assert [c["name"] for c in shard["configuration"]["codecs"]][
        -1
    ] == "crc32c"  # every inner chunk checksummed
    assert meta["attributes"]["actstore"]["inner_rows"] == 16


def test_int8_scales_are_one_shard_per_unit(sharded):
    st = actstore.open_store(sharded)
    n = st.tokenization().n_tokens
    objects = [p for p in (Path(sharded) / "models/m/layer_3_scale/c").rglob("*") if p.is_file()]
    assert len(objects) == -(-n // 128)  # one object per 128-row unit, not one per 64-row chunk
    assert _meta(sharded, "models/m/layer_3_scale")["chunk_grid"]["configuration"][
        "chunk_shape"
    ] == [128]


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_sharded_rows_equal_unsharded_rows(tmp_path, tiny_bert_dir, corpus_file, codec):
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    _extract(a, tiny_bert_dir, corpus_file, codec=codec, inner_rows=16)
    _extract(b, tiny_bert_dir, corpus_file, codec=codec, inner_rows=0)
    sa, sb = actstore.open_store(a), actstore.open_store(b)
    assert "sharding_indexed" not in json.dumps(_meta(b, "models/m/layer_1")["codecs"])
    for layer in (1, 3):
        np.testing.assert_array_equal(sa.activations("m", layer)[:], sb.activations("m", layer)[:])
        rows = np.array([3, 70, 71, 200])
        np.testing.assert_array_equal(
            sa.activations("m", layer).take(rows), sb.activations("m", layer).take(rows)
        )


def _corrupt_inner_chunk(store: str, array: str, shard: int, inner: int) -> None:
    """Flip one byte inside inner chunk ``inner`` of shard ``shard`` (index at the end: 16 bytes per inner chunk + crc)."""
    obj = Path(store) / array / "c" / str(shard) / "0"
    raw = bytearray(obj.read_bytes())
    n = 64 // 16
    index = np.frombuffer(bytes(raw[-(16 * n + 4) : -4]), dtype="<u8").reshape(n, 2)
    off = int(index[inner][0])
    raw[off + 2] ^= 0xFF
    obj.write_bytes(bytes(raw))


@pytest.fixture()
def damaged(tmp_path, tiny_bert_dir, corpus_file) -> str:
    path = str(tmp_path / "d.zarr")
    _extract(path, tiny_bert_dir, corpus_file, codec="fp16")
    _corrupt_inner_chunk(path, "models/m/layer_3", shard=1, inner=2)  # rows 64 + 32 .. 64 + 47
    return path


def test_a_corrupted_inner_chunk_is_named_on_read(damaged):
    acts = actstore.open_store(damaged).activations("m", 3)
    np.testing.assert_array_equal(
        acts[0:64], actstore.open_store(damaged).activations("m", 3)[0:64]
    )  # shard 0 fine
    with pytest.raises(
        IntegrityError,
        match=r"shard \(1, 0\) of array models/m/layer_3 .*rows 64-127.*inner chunk \(2, 0\) "
        r"\(rows 96-111\): crc32c checksum mismatch",
    ):
        acts[64:128]


def test_verify_and_copy_check_inner_chunks(damaged, tmp_path):
    st = actstore.open_store(damaged)
    report = verify(st.loc)
    bad = [p for p in report.problems if p.key == f"{layout.layer_array('m', 3)}/c/1/0"]
    assert len(bad) == 1 and "inner chunk (2, 0) (rows 96-111)" in bad[0].detail
    res = copy_store(CopyConfig(damaged, str(tmp_path / "copy.zarr")))
    assert not res.ok and any("inner chunk (2, 0)" in p.detail for p in res.problems)
    r = CliRunner().invoke(main, ["verify", damaged])
    assert r.exit_code != 0 and "inner chunk (2, 0) (rows 96-111)" in r.output


def test_a_format_1_store_reads_and_stays_unsharded(tmp_path, tiny_bert_dir, corpus_file):
    """A store written before sharding: unsharded arrays, root format 1. It reads, and new layers match it."""
    path = str(tmp_path / "v1.zarr")
    _extract(path, tiny_bert_dir, corpus_file, inner_rows=0)
    root = Path(path) / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["actstore"]["format"] = 1
    root.write_text(json.dumps(meta))
    st = actstore.open_store(path)
    assert len(st.activations("m", 3)) == st.tokenization().n_tokens
    cfg = ExtractConfig(
        tiny_bert_dir,
        DataConfig(corpus_file),
        [2],
        name="m",
        codec="fp16",
        inner_rows=16,
        batch_size=8,
        device="cpu",
    )
    # a format-1 store keeps one object per chunk, whatever inner_rows says
    extract(path, cfg, progress=False)
    assert "sharding_indexed" not in json.dumps(_meta(path, "models/m/layer_2")["codecs"])
    assert verify(actstore.open_store(path).loc).ok


def test_a_store_of_a_newer_format_is_refused(tmp_path, tiny_store_ro):
    import shutil

    path = tmp_path / "future.zarr"
    shutil.copytree(tiny_store_ro, path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["actstore"]["format"] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(actstore.ActstoreError, match="format 99.*upgrade actstore"):
        actstore.open_store(str(path))


def test_inner_rows_that_do_not_divide_a_chunk_are_refused_before_anything_is_written(
    sharded, tiny_bert_dir, corpus_file
):
    before = sorted(p.relative_to(sharded) for p in Path(sharded).rglob("*"))
    cfg = ExtractConfig(
        tiny_bert_dir,
        DataConfig(corpus_file),
        [2],
        name="other",
        codec="fp16",
        inner_rows=24,
        batch_size=8,
        device="cpu",
    )
    with pytest.raises(
        actstore.ActstoreError,
        match="--inner-rows 24 does not divide the store's 64 rows per chunk",
    ):
        extract(sharded, cfg, progress=False)
    assert not (Path(sharded) / "models" / "other").exists()
    assert sorted(p.relative_to(sharded) for p in Path(sharded).rglob("*")) == before


def test_hostile_shard_metadata_is_reported_not_crashed_on(tmp_path, sharded):
    """A teammate's store whose shard metadata claims 0-row inner chunks: verify names the metadata as damaged."""
    import shutil

    path = tmp_path / "hostile.zarr"
    shutil.copytree(sharded, path)
    meta_path = path / "models/m/layer_1/zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"][0]["configuration"]["chunk_shape"] = [0, 8]
    meta_path.write_text(json.dumps(meta))
    r = CliRunner().invoke(main, ["verify", str(path)])
    assert (
        r.exit_code != 0
        and "models/m/layer_1/zarr.json" in r.output
        and "Traceback" not in r.output
    )


@pytest.mark.parametrize(
    ("codec", "compression", "zstd"),
    [
        ("int8", "auto", False),
        ("fp16", "auto", False),
        ("bf16", "auto", True),
        ("fp16", "zstd", True),
        ("bf16", "none", False),
    ],
)
def test_compression_is_chosen_per_codec_and_written_in_the_array(
    tmp_path, tiny_bert_dir, corpus_file, codec, compression, zstd
):
    path = str(tmp_path / "s.zarr")
    _extract(path, tiny_bert_dir, corpus_file, codec=codec, compression=compression)
    inner = [
        c["name"] for c in _meta(path, "models/m/layer_3")["codecs"][0]["configuration"]["codecs"]
    ]
    assert inner == (["bytes", "zstd", "crc32c"] if zstd else ["bytes", "crc32c"])
    assert verify(actstore.open_store(path).loc).ok


@pytest.mark.parametrize(
    "bad", [dict(writer_threads=0), dict(compression="lz4"), dict(codec_on="gpu")]
)
def test_write_path_options_are_checked(tiny_bert_dir, corpus_file, bad):
    with pytest.raises(ConfigError, match=next(iter(bad)).replace("_", "-")):
        ExtractConfig(tiny_bert_dir, DataConfig(corpus_file), [1], **bad)


def test_writer_threads_are_resolved_by_each_worker_for_its_own_device(
    tmp_path, tiny_bert_dir, corpus_file, monkeypatch
):
    """A Ray actor on a GPU gets the GPU's default even though its driver set up on the CPU: the job carries None."""
    import os

    from actstore.store import worker as worker_mod
    from actstore.store.worker import default_writer_threads

    jobs = []
    real = worker_mod.UnitWorker.__init__

    def spy(self, job, *a, **k):
        jobs.append(job)
        real(self, job, *a, **k)

    monkeypatch.setattr(worker_mod.UnitWorker, "__init__", spy)
    _extract(str(tmp_path / "s.zarr"), tiny_bert_dir, corpus_file)
    assert jobs and jobs[0].writer_threads is None
    assert default_writer_threads("cpu") == 2 and default_writer_threads("cuda:0") == min(
        8, os.cpu_count() or 2
    )
