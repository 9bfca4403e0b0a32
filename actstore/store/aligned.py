"""Row-aligned reads of several (model, layer) sources at once: what a crosscoder reads.

Two models of one store that share a tokenization hold the same token in row ``i`` of every layer array; a
crosscoder reads them side by side. :class:`StackedActivations` is the array-like that does it: ``stacked[a:b]``
is float32 ``(b - a, n_sources * d_model)``, each source's ``d_model`` columns in the order given (model A's layer,
then model B's, ...), with the interface of :class:`~actstore.store.reader.Activations` (``len``, slices,
``take``, ``iter_chunks``, ``chunk_rows``, ``attrs``), so the SAE stream, the trainer and the encoder read it
unchanged. One model at several layers (a cross-layer crosscoder) is the same thing with one model.

Only rows committed in every source are visible. Sources whose tokenizations differ, or whose widths differ, are
refused: their rows are not the same tokens, or a shared dictionary cannot read them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from actstore.errors import ConfigError
from actstore.store.config import Source
from actstore.store.reader import Activations, Chunk, prefetched

if TYPE_CHECKING:
    from actstore.store.reader import Store


class StackedActivations:
    """Array-like over several row-aligned sources: ``stacked[a:b]`` is float32 ``(b - a, n_sources * d_model)``."""

    def __init__(
        self, parts: list[Activations], sources: list[Source], tokenization: str | None
    ) -> None:
        self.parts = parts
        self.sources = sources
        self.tokenization = tokenization
        self.d_source: int = parts[0].d_model
        """Width of one source (its d_model)."""
        self.d_model: int = self.d_source * len(parts)
        """Width of a stacked row: ``n_sources * d_source``."""
        self.n_rows: int = min(len(p) for p in parts)
        self.chunk_rows: int = max(p.chunk_rows for p in parts)
        self.complete: bool = all(p.complete for p in parts)
        """Whether every source's layer is written."""
        self.n_total: int = min(p.n_total for p in parts)
        """Rows when every source is complete."""
        self.layer = sources[0].layer

    def __len__(self) -> int:
        return self.n_rows

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.d_model)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("stacked activations support contiguous slices [a:b]")
        start, stop, _ = key.indices(self.n_rows)
        stop = max(start, stop)
        # (stop - start, n_sources * d_source)
        return np.concatenate([p[start:stop] for p in self.parts], axis=1)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at arbitrary indices, float32 ``(len(rows), n_sources * d_source)``."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"rows out of range for {self.n_rows} rows committed in every source")
        return np.concatenate([p.take(rows) for p in self.parts], axis=1)

    def iter_chunks(
        self,
        start: int = 0,
        stop: int | None = None,
        rows: int | None = None,
        prefetch: int = 2,
        fetchers: int | None = None,
    ) -> Iterator[Chunk]:
        """Stream ``[start, stop)`` in blocks of ``rows`` (default one stored object), in order, reading ahead."""
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        step = rows or self.chunk_rows
        bounds = [(a, min(a + step, stop)) for a in range(start, stop, step)]
        return prefetched(
            lambda _stop: (Chunk(a, b, self[a:b]) for a, b in bounds),
            prefetch,
            name="actstore-chunks",
        )

    def source_slice(self, i: int) -> slice:
        """Columns of source ``i`` in a stacked row."""
        return slice(i * self.d_source, (i + 1) * self.d_source)


def stacked_activations(store: Store, sources: list[Source]) -> StackedActivations:
    """The sources' rows side by side, refused (ConfigError) unless they share a tokenization and a width."""
    toks = {
        s.model: store.model_info(s.model).tokenization for s in sources
    }  # NotFoundError names a model
    if len(set(toks.values())) > 1:
        detail = ", ".join(f"{m}: {t}" for m, t in toks.items())
        raise ConfigError(
            f"the models of a crosscoder must share a tokenization so that row i is the same token in each, but in "
            f"{store.url} they differ ({detail}): extract them with the same tokenizer and --max-length/--window"
        )
    parts = [store.activations(s.model, s.layer) for s in sources]
    widths = {s.label(): p.d_model for s, p in zip(sources, parts, strict=True)}
    if len(set(widths.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in widths.items())
        raise ConfigError(
            f"a crosscoder's sources must have one width, but in {store.url} they differ ({detail})"
        )
    return StackedActivations(parts, sources, next(iter(toks.values())))
