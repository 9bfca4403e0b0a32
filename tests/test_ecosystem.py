"""The array ecosystem reads actstore stores: xarray.open_zarr, Store.to_dask and Store.to_xarray (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import killed_on_call

import actstore
from actstore.data.corpora import DataConfig
from actstore.format.codecs import CODECS
from actstore.store import worker as worker_mod
from actstore.store.config import ExtractConfig
from actstore.store.extract import extract

xr = pytest.importorskip("xarray")
pytest.importorskip("dask")


@pytest.fixture(scope="module")
def codec_store(tmp_path_factory, tiny_bert_dir, corpus_file) -> str:
    """One model key per codec preset, layers 1 and 3."""
    path = str(tmp_path_factory.mktemp("eco") / "codecs.zarr")
    for codec in CODECS:
        cfg = ExtractConfig(
            tiny_bert_dir,
            DataConfig(corpus_file),
            [1, 3],
            name=f"m-{codec}",
            codec=codec,
            chunk_rows=64,
            batch_size=8,
            device="cpu",
        )
        extract(path, cfg, progress=False)
    return path


@pytest.mark.parametrize("codec", CODECS)
def test_to_dask_equals_activations(codec_store, codec):
    st = actstore.open_store(codec_store)
    arr = st.to_dask(f"m-{codec}", 3)
    want = st.activations(f"m-{codec}", 3)[:]
    assert arr.shape == want.shape and arr.dtype == np.float32 and arr.chunks[0][0] == 64
    np.testing.assert_array_equal(arr.compute(), want)
    # a slice across chunks
    np.testing.assert_array_equal(arr[70:75, 5:9].compute(), want[70:75, 5:9])


@pytest.mark.parametrize("codec", CODECS)
def test_to_xarray_has_decoded_layers_and_token_coordinates(codec_store, codec):
    st = actstore.open_store(codec_store)
    ds = st.to_xarray(f"m-{codec}")
    assert set(ds.data_vars) == {"layer_1", "layer_3"} and ds["layer_1"].dims == (
        "token",
        "d_model",
    )
    np.testing.assert_array_equal(ds["layer_1"].values, st.activations(f"m-{codec}", 1)[:])
    tokens = st.tokens()
    np.testing.assert_array_equal(ds["sample"].values, tokens["sample"].to_numpy())
    np.testing.assert_array_equal(ds["position"].values, tokens["position"].to_numpy())
    np.testing.assert_array_equal(ds["token_id"].values, tokens["token_id"].to_numpy())
    assert ds["layer_3"].attrs["codec"] == codec


def test_plain_xarray_open_zarr_reads_a_model_group(codec_store):
    """Without actstore: every array has named dimensions, so xarray opens the group (values as stored)."""
    st = actstore.open_store(codec_store)
    ds = xr.open_zarr(codec_store, group="models/m-fp32", consolidated=False)
    assert ds["layer_3"].dims == ("token", "d_model")
    np.testing.assert_array_equal(ds["layer_3"].values, st.activations("m-fp32", 3)[:])
    ds8 = xr.open_zarr(codec_store, group="models/m-int8", consolidated=False)
    assert ds8["layer_3_scale"].dims == ("token",) and ds8["layer_3"].dtype == np.int8
    tok = xr.open_zarr(
        codec_store,
        group=f"tokenizations/{st.model_info('m-fp32').tokenization}",
        consolidated=False,
    )
    assert tok["token_id"].dims == ("token",)


def test_a_killed_extraction_reads_only_its_committed_rows(
    tmp_path, tiny_bert_dir, corpus_file, monkeypatch
):
    path = str(tmp_path / "killed.zarr")
    real = worker_mod.compute_unit
    monkeypatch.setattr(worker_mod, "compute_unit", killed_on_call(real, 3))
    cfg = ExtractConfig(
        tiny_bert_dir,
        DataConfig(corpus_file),
        [2],
        name="m",
        codec="fp16",
        chunk_rows=32,
        unit_rows=64,
        batch_size=8,
        device="cpu",
    )
    with pytest.raises(KeyboardInterrupt):
        extract(path, cfg, progress=False)
    st = actstore.open_store(path)
    acts = st.activations("m", 2)
    assert len(acts) == 128 < st.tokenization().n_tokens  # two units of 64 rows committed, no more
    arr = st.to_dask("m", 2)
    assert arr.shape == (128, acts.d_model)
    np.testing.assert_array_equal(arr.compute(), acts[:])
    assert st.to_xarray("m").sizes["token"] == 128
