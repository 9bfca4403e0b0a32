"""Synthetic stores: known data in the store layout, to check SAE training end to end.

:func:`planted_dictionary` makes rows that are sparse non-negative combinations
of known unit atoms; :func:`write_synthetic_store` writes any row blocks as a
store with one (model, layer), cut into fake samples of fixed length, that
``actstore train`` reads like any other. Used by the tests and ``bench/``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import zarr
import zarr.codecs as zc

from actstore.format import layout
from actstore.format.layout import ATTR, FORMAT_VERSION
from actstore.store.reader import Store, open_store
from actstore.version import __version__


@dataclass
class PlantedDictionary:
    """Unit atoms and how rows are drawn from them."""

    atoms: np.ndarray
    """float32 ``(n_atoms, d)``, unit rows."""
    k_active: int
    """Atoms per row."""
    seed: int

    def rows(self, n: int, block: int = 65536) -> Iterator[np.ndarray]:
        """``n`` rows in blocks ``(<= block, d)``: ``x = sum_j c_j atom_j``, ``k_active`` random atoms, ``c ~ U(0.5, 1.5)``."""
        rng = np.random.default_rng([self.seed, 1])
        n_atoms = len(self.atoms)
        for a in range(0, n, block):
            m = min(block, n - a)
            idx = np.argsort(rng.random((m, n_atoms)), axis=1)[:, : self.k_active]  # (m, k_active)
            coef = rng.uniform(0.5, 1.5, size=(m, self.k_active)).astype(np.float32)
            codes = np.zeros((m, n_atoms), dtype=np.float32)
            np.put_along_axis(codes, idx, coef, axis=1)
            yield codes @ self.atoms  # (m, d)


def planted_dictionary(d: int, n_atoms: int, k_active: int, seed: int = 0) -> PlantedDictionary:
    """Random unit atoms ``(n_atoms, d)``."""
    rng = np.random.default_rng([seed, 0])
    atoms = rng.standard_normal((n_atoms, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    return PlantedDictionary(atoms, k_active, seed)


def write_synthetic_store(
    path: str,
    blocks: Iterable[np.ndarray],
    n_rows: int,
    d: int,
    model: str = "synth",
    layer: int = 0,
    sample_len: int = 32,
    chunk_rows: int = 1024,
) -> Store:
    """Write ``n_rows`` rows (from ``blocks``, each ``(m, d)``) as ``models/MODEL/layer_LAYER`` (fp32) of a new store."""
    zs = zarr.storage.LocalStore(path)
    root = zarr.open_group(zs, mode="w")
    key = "t-synthetic"
    root.attrs[ATTR] = {"format": FORMAT_VERSION, "created": "synthetic", "actstore_version": __version__,
                        "default_tokenization": key}  # fmt: skip
    first = np.arange(0, n_rows, sample_len, dtype=np.int64)  # (n_samples,)
    lens = np.minimum(sample_len, n_rows - first).astype(np.int32)
    tk = root.create_group(layout.tokenization_dir(key))
    comp = [zc.ZstdCodec(level=1)]
    for name, arr in {
        "sample_first_row": first,
        "sample_n_tokens": lens,
        "sample": np.repeat(np.arange(len(first), dtype=np.int32), lens),
        "position": (np.arange(n_rows) - np.repeat(first, lens)).astype(np.int32),
        "token_id": np.zeros(n_rows, dtype=np.int32),
    }.items():
        a = tk.create_array(name, shape=arr.shape, chunks=(max(1, min(len(arr), 1 << 16)),), dtype=arr.dtype, compressors=comp)
        a[:] = arr
    tk.attrs[ATTR] = {"n_tokens": n_rows, "n_samples": len(first), "chunk_rows": chunk_rows, "complete": True,
                      "max_length": sample_len, "parts": [], "tokenizer_source": "synthetic"}  # fmt: skip
    root.create_group(layout.model_dir(model), attributes={ATTR: {"source": "synthetic", "key": model, "tokenization": key,
                                                            "d_model": d, "n_layers": layer}})  # fmt: skip
    arr = root.create_array(
        layout.layer_array(model, layer), shape=(n_rows, d), chunks=(chunk_rows, d), dtype="float32", fill_value=0,
        compressors=[zc.ZstdCodec(level=1)],
    )  # fmt: skip
    row = 0
    pending = np.zeros((0, d), dtype=np.float32)
    for blk in blocks:
        pending = np.concatenate([pending, np.asarray(blk, dtype=np.float32)])
        m = len(pending) // chunk_rows * chunk_rows
        if m:
            arr[row : row + m] = pending[:m]
            row, pending = row + m, pending[m:]
    if len(pending):
        arr[row : row + len(pending)] = pending
        row += len(pending)
    if row != n_rows:
        raise ValueError(f"blocks held {row} rows, expected {n_rows}")
    arr.attrs[ATTR] = {"layer": layer, "d_model": d, "codec": "fp32", "stored_dtype": "float32", "model_key": model,
                       "tokenization": key, "n_rows": n_rows, "committed_rows": n_rows, "complete": True}  # fmt: skip
    return open_store(path, writable=True)
