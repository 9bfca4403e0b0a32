"""Store stage: the reader of an activation store (``open_store``, ``Store``, ``Activations``, ``Tokenization``).

The layout is spelled in :mod:`actstore.format.layout` and described for users in docs/FORMAT.md; what each group
and array says about itself is typed in :mod:`actstore.format.metadata`. A layer array's ``committed_rows`` is the
prefix that is complete (in a format-3 array, whose units complete in any order, the contiguous prefix of units with
markers); readers never look past it, so a store being written reads consistently. ``Activations.iter_completed``
streams every completed unit.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple, TypeVar

import numpy as np
import polars as pl
import zarr

from actstore.errors import ActstoreError, ConfigError, IntegrityError, NotFoundError, StoreError
from actstore.format import codecs, layout
from actstore.format.metadata import (
    LayerAttrs,
    ModelAttrs,
    StoreAttrs,
    TokenizationAttrs,
    damaged,
    has_attrs,
)
from actstore.storage.guards import MissingChunk, check_key
from actstore.storage.location import Location, open_location
from actstore.store.units import committed_from_markers, completed_ranges, completed_units

FORMAT_VERSION = layout.FORMAT_VERSION
T = TypeVar("T")
REMOTE_FETCHERS = 4
"""Blocks a stream from a bucket fetches at once (each one a request's round trip)."""


layer_name = layout.layer_name


class Chunk(NamedTuple):
    """A block of consecutive token rows of one (model, layer)."""

    start: int
    """First token row of the block."""
    stop: int
    """One past the last token row."""
    values: np.ndarray
    """float32 activations ``(stop - start, d_model)``."""


@dataclass
class Tokenization:
    """A token index over the store's corpus, made with one tokenizer."""

    key: str
    group: zarr.Group
    store: Store

    @cached_property
    def attrs(self) -> TokenizationAttrs:
        return TokenizationAttrs.read(self.group, self._where)

    @property
    def complete(self) -> bool:
        return self.attrs.complete

    @property
    def _where(self) -> str:
        return f"tokenization {self.key} of store {self.store.url}"

    @property
    def n_tokens(self) -> int:
        return self.attrs.n_tokens

    @property
    def n_samples(self) -> int:
        return self.attrs.n_samples

    @property
    def chunk_rows(self) -> int:
        return self.attrs.chunk_rows

    def array(self, name: str) -> zarr.Array:
        return zarr.open_array(
            self.store.loc.reader_store, path=layout.token_array(self.key, name), mode="r"
        )

    def token_ids(self, start: int, stop: int) -> np.ndarray:
        """Token ids of rows ``[start, stop)`` as int64 ``(stop - start,)``."""
        return np.asarray(self.array("token_id")[start:stop], dtype=np.int64)

    def sample_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """``(first_row (n_samples,), n_tokens (n_samples,))`` of every sample."""
        return (
            np.asarray(self.array("sample_first_row")[:], dtype=np.int64),
            np.asarray(self.array("sample_n_tokens")[:], dtype=np.int64),
        )

    def parquet_keys(self, table: str) -> list[str]:
        """Store keys of the Parquet parts of ``table`` (tokens or samples)."""
        return [
            check_key(layout.token_table_part(self.key, table, p["file"])) for p in self.attrs.parts
        ]

    def parquet_files(self, table: str) -> list[str]:
        return [self.store.loc.join(k) for k in self.parquet_keys(table)]

    def table(self, table: str) -> pl.DataFrame:
        keys = self.parquet_keys(table)
        if not keys:
            raise NotFoundError(
                f"tokenization {self.key} of {self.store.url} has no {table} table yet: run actstore extract"
            )
        return self.read_parquet(keys)

    def read_parquet(self, keys: list[str], columns: list[str] | None = None) -> pl.DataFrame:
        """Parquet files of this token index as one frame: checked against the manifest first, and a file that does
        not parse is an IntegrityError naming it (never a traceback)."""
        from actstore.storage.integrity import check_files

        check_files(self.store.loc, keys)
        try:
            return self.store.loc.read_parquet(keys, columns)
        except (OSError, pl.exceptions.ComputeError, ValueError) as exc:
            if isinstance(exc, IntegrityError):
                raise
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise damaged(self._where, f"{', '.join(keys)} does not read ({why})") from None


class Activations:
    """Array-like view of one (model, layer): ``acts[a:b]`` is float32 ``(b - a, d_model)``.

    Only the committed prefix is visible: ``len(acts)`` is the number of rows
    whose chunks are completely written.
    """

    def __init__(
        self,
        values: zarr.Array,
        scale: zarr.Array | None,
        attrs: LayerAttrs,
        loc: Location | None = None,
    ) -> None:
        self._loc = loc  # to name a corrupted chunk (actstore.integrity.chunk_error)
        self._values = values
        self._scale = scale
        attrs.check_arrays(
            values.shape,
            None if scale is None else int(scale.shape[0]),
            where=f"array {values.path} of store {loc.url if loc else '?'}",
        )
        self.attrs = attrs
        self.codec: str = attrs.codec
        self.layer: int = attrs.layer
        self.d_model: int = attrs.d_model
        self.n_rows: int = attrs.committed_rows
        if attrs.marks_units and not attrs.complete and loc is not None:
            # units complete in any order: the prefix from their markers (committed_rows may lag behind them)
            self.n_rows = committed_from_markers(loc, values.path, attrs)
        # rows per stored object: a shard (format 2) or a chunk (format 1); streaming reads go by these
        self.chunk_rows: int = int((values.shards or values.chunks)[0])
        chan = attrs.channel_scale
        self._chan = np.asarray(chan, dtype=np.float32) if chan else None

    @property
    def complete(self) -> bool:
        """Whether every row of the layer is written."""
        return self.attrs.complete

    @property
    def n_total(self) -> int:
        """Rows the layer will hold when complete (``len(self)`` is those written so far)."""
        return self.attrs.n_rows

    def __len__(self) -> int:
        return self.n_rows

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.d_model)

    def __getitem__(self, key: slice | int) -> np.ndarray:
        if isinstance(key, int | np.integer):
            idx = int(key) + (self.n_rows if key < 0 else 0)
            if not 0 <= idx < self.n_rows:
                raise IndexError(f"row {key} out of range for {self.n_rows} committed rows")
            return self[idx : idx + 1][0]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("activations support integer rows and contiguous slices [a:b]")
        start, stop, _ = key.indices(self.n_rows)
        return self._read(start, max(start, stop))

    def _read(self, start: int, stop: int) -> np.ndarray:
        try:
            vals = self._values[start:stop]
            scale = self._scale[start:stop] if self._scale is not None else None
        except Exception as exc:
            raise self._read_error(start, stop, exc) from None
        return codecs.decode(
            np.asarray(vals), None if scale is None else np.asarray(scale), self.codec, self._chan
        )

    def completed_ranges(self) -> list[tuple[int, int]]:
        """Every completed row range ``[(start, stop), ...]``, sorted: the committed prefix, and in a format-3 array
        being written by many workers also the units finished past it (from their markers)."""
        if not self.attrs.marks_units or self._loc is None or self.attrs.complete:
            return [(0, self.n_rows)] if self.n_rows else []
        done = completed_units(self._loc, self._values.path)
        return completed_ranges(done, int(self.attrs.unit_rows or 1), self.attrs.n_rows)

    def iter_completed(self, rows: int | None = None, prefetch: int = 2) -> Iterator[Chunk]:
        """Stream every completed unit (:meth:`completed_ranges`), in row order, in blocks of at most ``rows``."""
        step = rows or self.chunk_rows
        bounds = [
            (a, min(a + step, b)) for lo, b in self.completed_ranges() for a in range(lo, b, step)
        ]
        return prefetched(
            lambda _stop: (Chunk(a, b, self._read(a, b)) for a, b in bounds),
            prefetch,
            name="actstore-chunks",
        )

    def _read_error(self, start: int, stop: int, exc: BaseException) -> BaseException:
        from actstore.storage.integrity import chunk_error

        if self._loc is None or (
            isinstance(exc, ActstoreError) and not isinstance(exc, MissingChunk)
        ):
            return exc

        for arr in (self._values, self._scale):
            if (
                arr is not None
                and (err := chunk_error(self._loc, arr, start, stop, exc)) is not exc
            ):
                return err
        return exc

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at arbitrary indices, float32 ``(len(rows), d_model)``."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"rows out of range for {self.n_rows} committed rows")
        try:
            vals = self._values.get_orthogonal_selection((rows, slice(None)))
            scale = self._scale.get_orthogonal_selection(rows) if self._scale is not None else None
        except Exception as exc:
            raise self._read_error(int(rows.min()), int(rows.max()) + 1, exc) from None
        return codecs.decode(
            np.asarray(vals), None if scale is None else np.asarray(scale), self.codec, self._chan
        )

    def iter_chunks(
        self,
        start: int = 0,
        stop: int | None = None,
        rows: int | None = None,
        prefetch: int = 2,
        fetchers: int | None = None,
    ) -> Iterator[Chunk]:
        """Stream ``[start, stop)`` in blocks of ``rows`` (default one stored object), in order, decoding ahead.

        ``fetchers`` blocks are fetched and decoded at once (default: 1 for a local folder, 4 for a bucket, where
        each block is a round trip); memory is bounded by ``fetchers + prefetch`` blocks whatever the store's size.
        """
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        step = rows or self.chunk_rows
        bounds = [(a, min(a + step, stop)) for a in range(start, stop, step)]
        if fetchers is None:
            fetchers = 1 if self._loc is None or self._loc.local else REMOTE_FETCHERS
        if fetchers <= 1:
            return prefetched(
                lambda _stop: (Chunk(a, b, self[a:b]) for a, b in bounds),
                prefetch,
                name="actstore-chunks",
            )
        return prefetched(
            lambda halt: self._fetched(bounds, fetchers, halt), prefetch, name="actstore-chunks"
        )

    def _fetched(
        self, bounds: list[tuple[int, int]], fetchers: int, halt: threading.Event
    ) -> Iterator[Chunk]:
        """Blocks in order, ``fetchers`` of them being read at any time."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(fetchers, thread_name_prefix="actstore-fetch") as pool:
            todo = iter(bounds)
            window: deque = deque()
            for a, b in todo:
                window.append((a, b, pool.submit(self.__getitem__, slice(a, b))))
                if len(window) >= fetchers:
                    break
            while window and not halt.is_set():
                a, b, fut = window.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    window.append((*nxt, pool.submit(self.__getitem__, slice(*nxt))))
                yield Chunk(a, b, fut.result())
            for *_, fut in window:
                fut.cancel()


class _Raised(NamedTuple):
    exc: BaseException


_END = object()


def prefetched(
    produce: Callable[[threading.Event], Iterable[T]],
    depth: int = 2,
    name: str = "actstore-prefetch",
) -> Iterator[T]:
    """Iterate ``produce(stop)`` in a background thread, at most ``depth`` items ahead.

    Errors in the producer are raised in the consumer; when the consumer stops early, ``stop`` is set,
    the producer's iterator is closed and the thread ends, so nothing keeps reading in the background.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            with contextlib.closing(iter(produce(stop))) as items:  # type: ignore[type-var]
                for item in items:
                    if not put(item):
                        return
            put(_END)
        except BaseException as exc:  # handed to the consumer
            put(_Raised(exc))

    th = threading.Thread(target=work, daemon=True, name=name)
    th.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        th.join()


class Store:
    """An activation store, local or remote. Open with :func:`open_store`."""

    def __init__(self, loc: Location, writable: bool = False) -> None:
        self.loc = loc
        self.url = loc.url
        self.writable = writable
        if not loc.exists("zarr.json"):
            if loc.exists(".zgroup") or loc.exists(".zarray"):
                raise StoreError(
                    f"{loc.url} is a Zarr v2 store; actstore stores are Zarr v3 (zarr.json): re-extract into a new store"
                )
            raise StoreError(
                f"{loc.url} is not an actstore store (no zarr.json): run actstore extract to create one"
            )
        try:
            self.root = zarr.open_group(
                loc.zarr_store, mode="r+" if writable else "r", zarr_format=3
            )
        except (FileNotFoundError, ValueError, TypeError, KeyError) as exc:
            raise StoreError(
                f"{loc.url}/zarr.json is not valid Zarr v3 group metadata ({exc}): the store is damaged"
            ) from None
        if not has_attrs(self.root):
            raise StoreError(
                f"{loc.url} is a Zarr group but not an actstore store (no '{layout.ATTR}' attribute)"
            )
        fmt = StoreAttrs.read(self.root, f"store {loc.url}").format
        if fmt not in layout.READABLE_FORMATS:
            raise StoreError(
                f"{loc.url} is actstore store format {fmt!r}; this version reads formats "
                f"{', '.join(map(str, layout.READABLE_FORMATS))}: upgrade actstore (pip install -U actstore)"
            )

    # ---- discovery -------------------------------------------------------
    @property
    def attrs(self) -> StoreAttrs:
        return StoreAttrs.read(self.root, f"store {self.url}")

    def _children(self, path: str) -> list[str]:
        return sorted(self.loc.list_dirs(path))

    def tokenization_keys(self) -> list[str]:
        return self._children(layout.TOKENIZATIONS)

    def tokenization(self, key: str | None = None) -> Tokenization:
        """A tokenization by key, or the store's default (the first made)."""
        keys = self.tokenization_keys()
        if not keys:
            raise NotFoundError(f"{self.url} holds no tokenization yet: run actstore extract")
        if key is None:
            key = self.attrs.default_tokenization or keys[0]
        if key not in keys:
            raise NotFoundError(
                f"{self.url} has no tokenization {key!r}; it has: {', '.join(keys)}"
            )
        grp = zarr.open_group(self.loc.zarr_store, path=layout.tokenization_dir(key), mode="r")
        return Tokenization(key, grp, self)

    def model_keys(self) -> list[str]:
        """Keys of every model group, with or without layers yet."""
        return self._children(layout.MODELS)

    @property
    def models(self) -> list[str]:
        """Keys of the models with at least one layer in the store."""
        return [m for m in self._children(layout.MODELS) if self.layers(m)]

    def _model_group(self, model: str) -> zarr.Group:
        if model not in self._children(layout.MODELS):
            known = ", ".join(self.models) or "none"
            raise NotFoundError(
                f"model {model!r} is not in store {self.url} (models: {known}): check --model"
            )
        return zarr.open_group(self.loc.zarr_store, path=layout.model_dir(model), mode="r")

    def check_aligned(self, a: str, b: str) -> None:
        """ConfigError unless models ``a`` and ``b`` share a token index, so row ``i`` is the same token in both."""
        if self.model_info(a).tokenization != self.model_info(b).tokenization:
            raise ConfigError(
                f"models {a} and {b} in {self.url} use different tokenizations: their rows are not aligned"
            )

    def model_info(self, model: str) -> ModelAttrs:
        return ModelAttrs.read(self._model_group(model), f"model {model} of store {self.url}")

    def layers(self, model: str) -> list[int]:
        """Layer numbers stored for ``model`` (hidden_states indices), ascending."""
        found = (layout.parse_layer_name(n) for n in self.loc.list_dirs(layout.model_dir(model)))
        return sorted(layer for layer in found if layer is not None)

    def layer_attrs(self, model: str, layer: int) -> LayerAttrs:
        arr = self._layer_array(model, layer)
        return LayerAttrs.read(arr, f"array {arr.path} of store {self.url}")

    def _layer_array(self, model: str, layer: int) -> zarr.Array:
        self._model_group(model)
        if layer not in self.layers(model):
            have = ", ".join(map(str, self.layers(model))) or "none"
            raise NotFoundError(
                f"layer {layer} of model {model!r} is not in store {self.url} (layers: {have}): extract it first"
            )
        return zarr.open_array(
            self.loc.reader_store, path=layout.layer_array(model, layer), mode="r"
        )

    def model_tokenization(self, model: str) -> Tokenization:
        return self.tokenization(self.model_info(model).tokenization)

    # ---- data ------------------------------------------------------------
    def activations(self, model: str, layer: int) -> Activations:
        """The committed rows of (model, layer) as an array-like of float32 slices."""
        values = self._layer_array(model, layer)
        attrs = LayerAttrs.read(values, f"array {values.path} of store {self.url}")
        scale = None
        if attrs.codec == "int8":
            scale = zarr.open_array(
                self.loc.reader_store, path=layout.scale_array(model, layer), mode="r"
            )
        return Activations(values, scale, attrs, loc=self.loc)

    def to_dask(self, model: str, layer: int) -> Any:
        """The committed rows of a layer as a lazy, decoded float32 ``dask.array`` (see :mod:`actstore.store.arrays`)."""
        from actstore.store.arrays import to_dask

        return to_dask(self, model, layer)

    def to_xarray(self, model: str, layers: list[int] | None = None) -> Any:
        """A model's layers as a lazy ``xarray.Dataset`` with token coordinates (see :mod:`actstore.store.arrays`)."""
        from actstore.store.arrays import to_xarray

        return to_xarray(self, model, layers)

    def iter_chunks(self, model: str, layer: int, **kw: Any) -> Iterator[Chunk]:
        """Stream (model, layer) chunk by chunk; see :meth:`Activations.iter_chunks`."""
        return self.activations(model, layer).iter_chunks(**kw)

    def tokens(self, tokenization: str | None = None) -> pl.DataFrame:
        """Token rows: row, sample, position, token_id, token."""
        return self.tokenization(tokenization).table("tokens")

    def samples(self, tokenization: str | None = None) -> pl.DataFrame:
        """Samples: sample, id, label, text, n_tokens, first_row (and truncated)."""
        return self.tokenization(tokenization).table("samples")


def open_store(
    path: str, writable: bool = False, storage_options: dict[str, Any] | None = None
) -> Store:
    """Open an existing store by path or URL (read-only unless ``writable``)."""
    loc = open_location(path, storage_options=storage_options, create=False, writable=writable)
    return Store(loc, writable=writable)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
