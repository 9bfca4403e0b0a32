"""Train stage: out-of-core SAE training from a store's layer arrays.

:func:`train_sae` streams shuffled batches from the Zarr chunks
(:class:`actstore.sae.stream.ShuffledStream`), so memory is bounded by the shuffle
buffer whatever the store's size; it holds out whole samples for evaluation, and
runs a :class:`actstore.sae.run.TrainingRun`, which logs metrics to a progress bar
and ``metrics.json`` and checkpoints weights, optimizer state and metric trackers
(safetensors) every ``checkpoint_every`` steps under ``STORE/saes/NAME/checkpoint/``.
A killed run started again with the same config continues from its last checkpoint
and ends with the same weights as an uninterrupted run.

The loss and the optimizer step of one batch are :mod:`actstore.sae.loss`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from actstore.errors import ConfigError, NotFoundError
from actstore.format import layout
from actstore.format.layout import check_name
from actstore.models.loading import auto_device
from actstore.sae.config import TrainConfig
from actstore.sae.files import delete_sae
from actstore.sae.rows import (
    open_stream,
    training_rows,
    writable_store,
)
from actstore.sae.run import CKPT, TrainingRun, TrainResult, run_identity
from actstore.storage.locks import StoreLock
from actstore.store.reader import Store


# ---------------------------------------------------------------- training
def train_sae(
    store: Store | str,
    cfg: TrainConfig,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    storage_options: dict[str, Any] | None = None,
    writable: bool = False,
) -> TrainResult:
    """Train an SAE on (cfg.model, cfg.layer) of ``store`` and save it under ``saes/NAME/``.

    A store given by URL must be opened writable (``writable=True``, ``--writable``) to save into it;
    this is checked before any training.

    ``on_step(step, info)`` is called after every optimizer step (after any
    checkpoint of that step is written).
    """
    from actstore.models.loading import torch_threads

    with torch_threads(cfg.threads):
        return _train_sae(store, cfg, progress, on_step, storage_options, writable)


def _train_sae(
    store: Store | str,
    cfg: TrainConfig,
    progress: bool,
    on_step: Callable[[int, dict[str, Any]], None] | None,
    storage_options: dict[str, Any] | None,
    writable: bool,
) -> TrainResult:
    st = writable_store(store, storage_options, writable)
    acts, d_in = training_rows(st, cfg)
    identity = run_identity(cfg)  # as given: what a checkpoint is continued by
    cfg = cfg.resolve(d_in)
    name = cfg.name or cfg.default_name(int(cfg.d_sae or 0))
    check_name(name, "SAE")  # one folder under saes/: 'a/b' would make an SAE nothing can find
    device = torch.device(auto_device(cfg.device))
    tok = st.model_tokenization(cfg.model)
    # one trainer of an SAE name at a time
    lock = StoreLock(st.loc, layout.sae_dir(name), f"train {name}").acquire()
    try:
        return _train_locked(st, cfg, identity, progress, on_step, acts, name, device, tok)
    finally:
        lock.release()


def _train_locked(
    st: Store,
    cfg: TrainConfig,
    identity: dict[str, Any],
    progress: bool,
    on_step: Callable[[int, dict[str, Any]], None] | None,
    acts: Any,
    name: str,
    device: torch.device,
    tok: Any,
) -> TrainResult:
    resume = existing_run(st, cfg, name)
    split, stream = open_stream(acts, tok, cfg, device)
    torch.manual_seed(cfg.seed)
    if resume:
        run = TrainingRun.restore(st, cfg, identity, name, acts, split, stream, device)
    else:
        run = TrainingRun.start(st, cfg, identity, name, acts, split, stream, device, tok.key)
    seconds = run.loop(progress, on_step)
    return run.finish(seconds)


def existing_run(st: Store, cfg: TrainConfig, name: str) -> bool:
    """Whether an unfinished run of ``name`` is to be continued; refuses a finished SAE unless ``overwrite``."""
    finished = st.loc.exists(layout.sae_file(name, layout.SAE_CONFIG))
    ckpt = st.loc.exists(layout.sae_file(name, CKPT))
    if cfg.overwrite:
        delete_sae(st, name)
        return False
    if finished:
        raise ConfigError(
            f"SAE {name!r} already exists in {st.url}: pass --overwrite to replace it, or choose another --name"
        )
    if cfg.resume and not ckpt:
        raise NotFoundError(
            f"no unfinished run named {name!r} in {st.url} to resume: drop --resume to start one"
        )
    return ckpt
