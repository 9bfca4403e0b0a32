"""What a training run reads: the store opened to save into, the layer's rows (or a crosscoder's sources side by
side), the held-out split and the shuffled stream, and the input statistics a new run starts from. Runs trained
together (:mod:`actstore.sae.group`) share all of it."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import numpy as np
import torch

from actstore.errors import NotFoundError, StoreError
from actstore.models.names import key_site
from actstore.sae.config import TrainConfig
from actstore.sae.stream import RowSplit, ShuffledStream, split_rows
from actstore.storage.urls import write_access
from actstore.store.aligned import stacked_activations
from actstore.store.reader import Store, open_store


class PartialLayerWarning(UserWarning):
    """Training on a layer whose extraction is not finished (only its committed rows are used)."""


class InputStats(NamedTuple):
    """What a new run learns from a few random chunks of its training rows."""

    mean_sq: np.ndarray
    """(n_sources,) mean squared norm of each source (a crosscoder's row holds its sources side by side)."""
    mean: np.ndarray
    """(d_model,) float64 mean row."""
    sample: np.ndarray
    """(<= n_sample, d_model) float32 random training rows (none twice), in random order (``--init data``)."""


def estimate_stats(
    stream: ShuffledStream, seed: int, n_sources: int = 1, max_chunks: int = 16, n_sample: int = 0
) -> InputStats:
    """:class:`InputStats` of the training rows of up to ``max_chunks`` random chunks (more chunks are read, up to
    every chunk, while fewer than ``n_sample`` rows have been seen)."""
    rng = np.random.default_rng([seed, 3])
    order = rng.permutation(len(stream.chunks))
    sq, tot, n = np.zeros(n_sources), np.zeros(stream.acts.d_model, dtype=np.float64), 0
    parts: list[np.ndarray] = []
    for j, i in enumerate(order):
        if j >= max_chunks and n >= n_sample:
            break
        v32 = stream.read_chunk(*stream.chunks[i])  # (m, d_model) float32
        v = v32.astype(np.float64)
        sq += (v**2).reshape(len(v), n_sources, -1).sum(axis=(0, 2))
        tot += v.sum(0)
        n += len(v)
        if n_sample:
            parts.append(v32)
    rows = np.concatenate(parts) if parts else np.zeros((0, stream.acts.d_model), np.float32)
    sample = rows[np.random.default_rng([seed, 5]).permutation(len(rows))[:n_sample]]
    return InputStats(sq / max(n, 1), tot / max(n, 1), sample)


# ---------------------------------------------------------------- checkpoints
def writable_store(
    store: Store | str, storage_options: dict[str, Any] | None, writable: bool
) -> Store:
    """``store`` opened to save SAEs into; StoreError when it is read-only (a URL without ``writable``)."""
    # a path: local stores are writable by a writing command, URLs with writable only
    if isinstance(store, str):
        st = open_store(
            store, storage_options=storage_options, writable=write_access(store, writable)
        )
    else:
        st = store
    if st.loc.read_only:
        raise StoreError(
            f"store {st.url} is open read-only: pass --writable (open_store(url, writable=True)) to save an SAE"
        )
    return st


def training_rows(st: Store, cfg: TrainConfig) -> tuple[Any, int]:
    """The rows a run reads (a layer, or a crosscoder's sources side by side) and the SAE's input width per source;
    NotFoundError for a layer with no committed rows, a warning for a partly extracted one."""
    sources = cfg.sources()
    pair = cfg.transcoder_pair()
    if pair is not None:  # a transcoder: its source and target rows side by side (the same tokens)
        missing = [s for s in pair if s.model not in st.models]
        if missing:
            site = key_site(missing[0].model)
            raise NotFoundError(
                f"{missing[0].model} is not in store {st.url}: extract it with --site {site} "
                f"--layers {missing[0].layer} (its models: {', '.join(st.models)})"
            )
        acts = stacked_activations(st, list(pair))
        d_in = acts.d_source
    elif sources is None:
        acts = st.activations(cfg.model, cfg.layer)  # NotFoundError names the model / layer
        d_in = acts.d_model
    else:  # a crosscoder: the sources' rows side by side (refused unless they are the same tokens)
        acts = stacked_activations(st, sources)
        d_in = acts.d_source
    if len(acts) == 0:
        raise NotFoundError(
            f"layer {cfg.layer} of model {cfg.model!r} in {st.url} has no committed rows yet: finish extract"
        )
    if not acts.complete:
        warnings.warn(
            f"{cfg.model} layer {cfg.layer} in {st.url} is only partly extracted ({len(acts)} of "
            f"{acts.n_total} rows committed): training on the committed rows; finish the extract for the rest",
            PartialLayerWarning,
            stacklevel=4,
        )
    return acts, d_in


def held_out_rows(acts: Any, split: RowSplit) -> torch.Tensor:
    """The held-out rows ``(n_eval, d_model)`` float32 (read once; runs trained together share them)."""
    return (
        torch.from_numpy(acts.take(split.eval_rows))
        if len(split.eval_rows)
        else torch.zeros(0, acts.d_model)
    )


def open_stream(
    acts: Any, tok: Any, cfg: TrainConfig, device: torch.device
) -> tuple[RowSplit, ShuffledStream]:
    """The held-out split and the shuffled stream of training rows a run (or runs trained together) reads."""
    split = split_rows(tok, len(acts), cfg.eval_fraction, cfg.max_eval_tokens, cfg.stream_seed())
    buffer_rows = max(1, cfg.buffer_mb * 2**20 // (4 * acts.d_model))
    stream = ShuffledStream(
        acts,
        split.train_mask,
        cfg.batch_size,
        buffer_rows,
        seed=cfg.stream_seed(),
        workers=cfg.workers,
        pin_memory=device.type == "cuda",
    )
    return split, stream
