"""A store's layers for the array ecosystem: lazy Dask arrays and an xarray Dataset, decoded and committed-only.

``to_dask(store, model, layer)`` reads through :class:`~actstore.store.reader.Activations`, so a chunk is
decoded (fp16/bf16/int8 -> float32) and checked exactly as ``Store.activations`` does, and only the committed
rows are visible: a layer still being extracted (or killed) ends at its ``committed_rows``. ``to_xarray`` puts
a model's layers side by side over the rows every one of them has committed, with token coordinates.
Dask and xarray are optional: ``pip install 'actstore[xarray]'``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actstore.errors import ConfigError
from actstore.format import layout

# (no import of store.reader here, not even for type hints: the reader's Store.to_dask imports this module)


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise ConfigError(
            f"{module} is not installed: pip install 'actstore[xarray]' (xarray and dask)"
        ) from None


class _Decoded:
    """What ``dask.array.from_array`` needs of an array: shape, dtype, and 2-d slicing, decoded by Activations."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, acts: Any, n_rows: int) -> None:
        self.acts, self.shape = acts, (n_rows, acts.d_model)

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        a, b, _ = rows.indices(self.shape[0])
        return self.acts[a:b][:, cols]  # (b - a, d_model) float32, then the asked columns


def to_dask(store: Any, model: str, layer: int, n_rows: int | None = None) -> Any:
    """Layer ``layer`` of ``model`` as a lazy ``dask.array`` ``(committed rows, d_model)`` float32, one dask chunk
    per Zarr chunk (``n_rows`` cuts it shorter)."""
    da = _need("dask.array")
    acts = store.activations(model, layer)
    n = len(acts) if n_rows is None else min(n_rows, len(acts))
    name = f"actstore-{store.url}-{layout.layer_array(model, layer)}-{acts.attrs.created}-{n}"
    return da.from_array(
        _Decoded(acts, n),
        chunks=(acts.chunk_rows, acts.d_model),
        name=name,
        asarray=False,
        fancy=False,
    )


def to_xarray(store: Any, model: str, layers: list[int] | None = None) -> Any:
    """``model``'s layers as a lazy ``xarray.Dataset``: one variable ``layer_<L>`` ``(token, d_model)`` per layer,
    over the rows all of them have committed, with coordinates ``token`` (row), ``sample`` (its sample index),
    ``position`` (its place in the sample) and ``token_id``."""
    xr = _need("xarray")
    da = _need("dask.array")
    layers = store.layers(model) if layers is None else list(layers)
    if not layers:
        raise ConfigError(f"model {model!r} of {store.url} has no layers yet: run actstore extract")
    n = min(len(store.activations(model, layer)) for layer in layers)
    tok = store.model_tokenization(model)
    first_row, _ = tok.sample_rows()  # (n_samples,) each
    chunk = tok.chunk_rows
    rows = da.arange(n, chunks=chunk, dtype=np.int64)
    sample = rows.map_blocks(
        lambda r: np.searchsorted(first_row, r, side="right") - 1, dtype=np.int64
    )
    position = rows - sample.map_blocks(lambda s: first_row[s], dtype=np.int64)
    token_id = da.from_array(tok.array("token_id"), chunks=chunk)[:n]
    data = {
        layout.layer_name(layer): (("token", "d_model"), to_dask(store, model, layer, n))
        for layer in layers
    }
    coords = {
        "token": np.arange(n),
        "sample": ("token", sample),
        "position": ("token", position),
        "token_id": ("token", token_id),
    }
    ds = xr.Dataset(
        data, coords=coords, attrs={"model": model, "store": store.url, "tokenization": tok.key}
    )
    for layer in layers:
        attrs = store.layer_attrs(model, layer)
        plain = {
            k: v for k, v in attrs.to_dict().items() if isinstance(v, str | int | float | bool)
        }
        ds[layout.layer_name(layer)].attrs.update(plain)
    return ds
