"""Synthetic stores: known data in the store layout, to check SAE training end to end.

:func:`planted_dictionary` makes rows that are sparse non-negative combinations
of known unit atoms; :func:`write_synthetic_store` writes any row blocks as a
store with one (model, layer), cut into fake samples of fixed length, that
``actstore train`` reads like any other. Used by the tests and ``bench/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import zarr
import zarr.codecs as zc

from actstore.format import layout
from actstore.format.layout import FORMAT_VERSION
from actstore.format.metadata import LayerAttrs, ModelAttrs, StoreAttrs, TokenizationAttrs
from actstore.store.reader import Store, open_store
from actstore.version import __version__


@dataclass
class PlantedDictionary:
    """Unit atoms and how rows are drawn from them."""

    atoms: np.ndarray
    """float32 ``(n_atoms, d)``, unit rows."""
    k_active: int
    """Atoms per row (with ``zipf``: on average)."""
    seed: int
    zipf: float = 0.0
    """0: every row has ``k_active`` atoms drawn uniformly. > 0: atom ``i`` fires on its own with probability
    proportional to ``(i + 1) ** -zipf`` (a long tail of rare features, as in real activations), scaled to
    ``k_active`` atoms per row on average."""
    noise: float = 0.0
    """Standard deviation of Gaussian noise added to each coordinate."""

    def rows(self, n: int, block: int = 65536) -> Iterator[np.ndarray]:
        """``n`` rows in blocks ``(<= block, d)``: ``x = sum_j c_j atom_j (+ noise)``, ``c ~ U(0.5, 1.5)``."""
        if self.zipf > 0:
            codes = zipf_codes(
                firing_probabilities(len(self.atoms), self.k_active, self.zipf),
                self.seed,
                n,
                min(block, 8192),
            )
        else:
            codes = sparse_codes(len(self.atoms), self.k_active, self.seed, n, block)
        rng = np.random.default_rng([self.seed, 2])
        for c in codes:
            x = c @ self.atoms  # (m, d)
            if self.noise > 0:
                x += rng.normal(0.0, self.noise, size=x.shape).astype(np.float32)
            yield x


def firing_probabilities(n_atoms: int, k_mean: float, zipf: float) -> np.ndarray:
    """float64 ``(n_atoms,)``: ``p_i`` proportional to ``(i + 1) ** -zipf``, summing to ``k_mean`` (each at most 1)."""
    p = np.arange(1, n_atoms + 1, dtype=np.float64) ** -zipf
    for _ in range(50):  # rescale to the mean, capping at 1 (a few rounds settle it)
        p = np.minimum(1.0, p * k_mean / p.sum())
    return p


def zipf_codes(p: np.ndarray, seed: int, n: int, block: int = 8192) -> Iterator[np.ndarray]:
    """``n`` seeded sparse codes in blocks ``(<= block, n_atoms)``: atom ``i`` active with probability ``p[i]`` on its own,
    ``c ~ U(0.5, 1.5)``."""
    rng = np.random.default_rng([seed, 3])
    p32 = p.astype(np.float32)
    for a in range(0, n, block):
        m = min(block, n - a)
        # the active (row, atom) pairs
        on = np.nonzero(rng.random((m, len(p)), dtype=np.float32) < p32)
        codes = np.zeros((m, len(p)), dtype=np.float32)
        codes[on] = rng.uniform(0.5, 1.5, size=len(on[0])).astype(np.float32)
        yield codes  # (m, n_atoms)


def sparse_codes(
    n_atoms: int, k_active: int, seed: int, n: int, block: int = 65536
) -> Iterator[np.ndarray]:
    """``n`` seeded sparse codes in blocks ``(<= block, n_atoms)``: ``k_active`` random atoms per row, ``c ~ U(0.5, 1.5)``."""
    rng = np.random.default_rng([seed, 1])
    for a in range(0, n, block):
        m = min(block, n - a)
        idx = np.argsort(rng.random((m, n_atoms)), axis=1)[:, :k_active]  # (m, k_active)
        coef = rng.uniform(0.5, 1.5, size=(m, k_active)).astype(np.float32)
        codes = np.zeros((m, n_atoms), dtype=np.float32)
        np.put_along_axis(codes, idx, coef, axis=1)
        yield codes  # (m, n_atoms)


def planted_dictionary(
    d: int, n_atoms: int, k_active: int, seed: int = 0, zipf: float = 0.0, noise: float = 0.0
) -> PlantedDictionary:
    """Random unit atoms ``(n_atoms, d)`` (see :class:`PlantedDictionary` for ``zipf`` and ``noise``)."""
    rng = np.random.default_rng([seed, 0])
    atoms = rng.standard_normal((n_atoms, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    return PlantedDictionary(atoms, k_active, seed, zipf, noise)


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
    StoreAttrs(
        format=FORMAT_VERSION,
        created="synthetic",
        actstore_version=__version__,
        default_tokenization=key,
    ).write(root)
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
        a = tk.create_array(
            name,
            shape=arr.shape,
            chunks=(max(1, min(len(arr), 1 << 16)),),
            dtype=arr.dtype,
            compressors=comp,
        )
        a[:] = arr
    TokenizationAttrs(
        n_tokens=n_rows,
        n_samples=len(first),
        chunk_rows=chunk_rows,
        complete=True,
        max_length=sample_len,
        tokenizer_source="synthetic",
    ).write(tk)
    _write_model(root, blocks, n_rows, d, model, layer, chunk_rows, key)
    return open_store(path, writable=True)


def add_synthetic_model(
    path: str,
    blocks: Iterable[np.ndarray],
    n_rows: int,
    d: int,
    model: str,
    layer: int = 0,
    chunk_rows: int = 1024,
) -> Store:
    """Add ``models/MODEL/layer_LAYER`` to a store made by :func:`write_synthetic_store`, on its token index (row
    ``i`` is the same fake token): a second "model" of the same tokens, as a crosscoder reads."""
    root = zarr.open_group(zarr.storage.LocalStore(path), mode="r+")
    key = StoreAttrs.read(root, f"store {path}").default_tokenization or ""
    if model in root.get(layout.MODELS, {}):
        group = root[layout.model_dir(model)]
        info = ModelAttrs.read(group, f"model {model} of store {path}")
        dataclasses.replace(info, n_layers=max(layer, info.n_layers or 0)).write(group)
        _write_layer(root, blocks, n_rows, d, model, layer, chunk_rows, key)
    else:
        _write_model(root, blocks, n_rows, d, model, layer, chunk_rows, key)
    return open_store(path, writable=True)


def _write_model(
    root: zarr.Group,
    blocks: Iterable[np.ndarray],
    n_rows: int,
    d: int,
    model: str,
    layer: int,
    chunk_rows: int,
    key: str,
) -> None:
    info = ModelAttrs(source="synthetic", key=model, tokenization=key, d_model=d, n_layers=layer)
    root.create_group(layout.model_dir(model), attributes=info.as_zarr())
    _write_layer(root, blocks, n_rows, d, model, layer, chunk_rows, key)


def _write_layer(
    root: zarr.Group,
    blocks: Iterable[np.ndarray],
    n_rows: int,
    d: int,
    model: str,
    layer: int,
    chunk_rows: int,
    key: str,
) -> None:
    arr = root.create_array(
        layout.layer_array(model, layer),
        shape=(n_rows, d),
        chunks=(chunk_rows, d),
        dtype="float32",
        fill_value=0,
        compressors=[zc.ZstdCodec(level=1)],
    )
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
    LayerAttrs(
        layer=layer,
        d_model=d,
        codec="fp32",
        stored_dtype="float32",
        model_key=model,
        tokenization=key,
        n_rows=n_rows,
        committed_rows=n_rows,
        complete=True,
    ).write(arr)


ATOM_KINDS = ("shared", "a_only", "b_only", "weak_a")
"""Kinds of atoms of a planted crosscoder: in both models alike; in A only; in B only; in both, weaker in A."""


@dataclass
class PlantedCrosscoder:
    """Two "models" over the same tokens: each row's code (``k_active`` atoms, ``c ~ U(0.5, 1.5)``) is shared, and
    each atom has a direction per model (zero where it is absent, ``weak_scale`` times a unit row where weak)."""

    atoms_a: np.ndarray
    """float32 ``(n_atoms, d)``: each atom's contribution to model A (a unit row, a weak row, or zeros)."""
    atoms_b: np.ndarray
    """float32 ``(n_atoms, d)``: the same for model B."""
    kinds: list[str]
    """Each atom's kind, one of :data:`ATOM_KINDS`."""
    k_active: int
    seed: int

    def codes(self, n: int, block: int = 65536) -> Iterator[np.ndarray]:
        # (m, n_atoms) blocks
        return sparse_codes(len(self.kinds), self.k_active, self.seed, n, block)

    def rows_a(self, n: int) -> Iterator[np.ndarray]:
        return (c @ self.atoms_a for c in self.codes(n))  # (m, d)

    def rows_b(self, n: int) -> Iterator[np.ndarray]:
        return (c @ self.atoms_b for c in self.codes(n))  # (m, d)


def planted_crosscoder(
    d: int,
    n_shared: int,
    n_a_only: int,
    n_b_only: int,
    n_weak_a: int,
    weak_scale: float = 0.3,
    k_active: int = 3,
    drift: float = 0.1,
    seed: int = 0,
) -> PlantedCrosscoder:
    """Random unit atoms of the four kinds; a shared atom's B direction is its A direction plus ``drift`` times a random
    unit vector, renormalised (cosine about ``1 / sqrt(1 + drift^2)``), as a fine-tune moves a feature a little."""
    rng = np.random.default_rng([seed, 0])
    kinds = (
        ["shared"] * n_shared
        + ["a_only"] * n_a_only
        + ["b_only"] * n_b_only
        + ["weak_a"] * n_weak_a
    )
    n = len(kinds)
    base = rng.standard_normal((n, d)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    moved = base + drift * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    kind = np.asarray(kinds)
    a = (
        np.where((kind == "b_only")[:, None], 0.0, base)
        * np.where(kind == "weak_a", weak_scale, 1.0)[:, None]
    )
    b = np.where((kind == "a_only")[:, None], 0.0, moved)
    return PlantedCrosscoder(a.astype(np.float32), b.astype(np.float32), kinds, k_active, seed)


def write_crosscoder_store(
    path: str,
    pc: PlantedCrosscoder,
    n_rows: int,
    models: tuple[str, str] = ("a", "b"),
    layer: int = 0,
    sample_len: int = 32,
    chunk_rows: int = 1024,
) -> Store:
    """A store with the two models of ``pc`` at ``layer`` over the same ``n_rows`` fake tokens."""
    d = pc.atoms_a.shape[1]
    write_synthetic_store(
        path, pc.rows_a(n_rows), n_rows, d, models[0], layer, sample_len, chunk_rows
    )
    return add_synthetic_model(path, pc.rows_b(n_rows), n_rows, d, models[1], layer, chunk_rows)


@dataclass
class PlantedHierarchy:
    """Parent atoms and their children, where a child fires only with its parent: the setting in which an SAE
    *absorbs* a parent into its children (a latent for "parent and child" that stops the parent's own latent firing
    on those tokens), and which Matryoshka SAEs are meant to resist."""

    parents: np.ndarray
    """float32 ``(n_parents, d)``, unit rows."""
    children: np.ndarray
    """float32 ``(n_parents, n_children, d)``, unit rows."""
    parents_per_row: int = 2
    """Parents active in each row."""
    child_rate: float = 0.8
    """Probability that an active parent brings one of its children."""

    def rows(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``(x (n, d) float32, active parents (n, n_parents) bool)``: each row the sum of ``parents_per_row``
        parents and, for each, with probability ``child_rate``, one of its children, each scaled by U(0.5, 1.5)."""
        rng = np.random.default_rng([seed, 3])
        n_par, n_child, d = self.children.shape
        x = np.zeros((n, d), np.float32)
        active = np.zeros((n, n_par), bool)
        for i in range(n):
            for p in rng.choice(n_par, self.parents_per_row, replace=False):
                active[i, p] = True
                x[i] += self.parents[p] * rng.uniform(0.5, 1.5)
                if rng.random() < self.child_rate:
                    x[i] += self.children[p, rng.integers(n_child)] * rng.uniform(0.5, 1.5)
        return x, active


def planted_hierarchy(d: int, n_parents: int, n_children: int, seed: int = 0) -> PlantedHierarchy:
    """Random unit parent and child atoms (``n_parents * (1 + n_children)`` of them, in ``d`` dimensions)."""
    rng = np.random.default_rng([seed, 4])
    atoms = rng.standard_normal((n_parents * (1 + n_children), d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    return PlantedHierarchy(atoms[:n_parents], atoms[n_parents:].reshape(n_parents, n_children, d))


def parent_f1(features: np.ndarray, active: np.ndarray) -> np.ndarray:
    """``(n_parents,)``: for each parent, the best F1 of any one latent firing (``features (n, d_sae) > 0``) as a
    detector of that parent's rows: 1 when some latent fires exactly on them, lower when children absorbed it."""
    fired = features > 0  # (n, d_sae)
    out = np.zeros(active.shape[1])
    for p in range(active.shape[1]):
        y = active[:, p][:, None]  # (n, 1)
        tp, fp, fn = (fired & y).sum(0), (fired & ~y).sum(0), (~fired & y).sum(0)
        out[p] = (2 * tp / np.maximum(2 * tp + fp + fn, 1)).max()
    return out
