"""One read, many SAEs: several SAEs of one layer trained from one pass over the shuffled stream.

Reading, decoding and shuffling the rows is what a sweep repeats once per SAE; an SAE step on a GPU (or a small one on
a CPU) costs less than that read. :func:`train_together` opens the layer's held-out split and shuffled stream once
and hands every batch to each run in turn. Each run keeps its own optimizer, dead-feature tracker, history and
checkpoint, and resumes from it exactly as a single ``actstore train`` does; its weights are bit-identical to a
separate run with the same options (its initialisation is seeded exactly as there, and the batches are the same
batches in the same order).

The runs' steps on a batch go in parallel threads when the cores allow it: ``cores // threads`` at a time (one when
``threads`` is unset, torch then using every core for each step). Each step's kernels then run single-threaded in
its own thread, as in a separate run with the same ``threads``, so the weights stay bit-identical.

Runs can share a stream when they read the same rows in the same order: the same model and layer (or crosscoder
sources), batch size, shuffle buffer, held-out split and length (:data:`STREAM_FIELDS`, and the data seed:
``data_seed``, else ``seed``). Widths, k, architectures, learning rates, optimizers and init seeds (with one
``data_seed``) may differ. :func:`stream_groups` sorts a sweep into such groups.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from actstore.errors import ConfigError
from actstore.format import layout
from actstore.format.layout import check_name
from actstore.models.loading import auto_device
from actstore.sae.config import TrainConfig
from actstore.sae.rows import held_out_rows, open_stream, training_rows, writable_store
from actstore.sae.run import TrainingRun, TrainResult, run_identity
from actstore.sae.train import existing_run
from actstore.storage.locks import StoreLock
from actstore.store.reader import Store

STREAM_FIELDS = (
    "model",
    "layer",
    "models",
    "layers",
    "target",  # a transcoder reads its target beside its source
    "batch_size",
    "buffer_mb",
    "eval_fraction",
    "max_eval_tokens",
    "epochs",
    "tokens",
    "workers",
    "device",
    "threads",
)
"""Options that decide which rows a run reads, in which order and for how long: equal within a group."""


def stream_key(cfg: TrainConfig) -> tuple[Any, ...]:
    """What runs sharing one stream must have in common (:data:`STREAM_FIELDS` and the data seed)."""
    d = cfg.to_dict()
    return (*(repr(d.get(f)) for f in STREAM_FIELDS), cfg.stream_seed())


def stream_groups(configs: list[TrainConfig]) -> list[list[TrainConfig]]:
    """``configs`` sorted into groups that can share one stream, in their first appearance's order."""
    groups: dict[tuple[Any, ...], list[TrainConfig]] = {}
    for cfg in configs:
        groups.setdefault(stream_key(cfg), []).append(cfg)
    return list(groups.values())


def parallel_steps(threads: int | None, n_runs: int) -> int:
    """How many runs step at once: ``cores // threads`` (1 when ``threads`` is unset), at most ``n_runs``."""
    if not threads:
        return 1
    return max(1, min(n_runs, (os.cpu_count() or 1) // threads))


def train_together(
    store: Store | str,
    configs: list[TrainConfig],
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
    writable: bool = False,
    log: Callable[[str], Any] | None = None,
    parallel: int | None = None,
) -> list[TrainResult]:
    """Train every SAE of ``configs`` (one stream group, :func:`stream_groups`) from one pass over the stream, each
    saved under its own name; results in the order of ``configs``. ``parallel``: runs stepping at once (default
    :func:`parallel_steps`). See the module docstring."""
    from actstore.models.loading import torch_threads

    if not configs:
        return []
    keys = {stream_key(c) for c in configs}
    if len(keys) > 1:
        raise ConfigError(
            "SAEs trained in one pass must read the same rows in the same order (same model, layer, batch "
            f"size, buffer, split, length and data seed: {', '.join(STREAM_FIELDS)}, data_seed)"
        )
    n = parallel if parallel is not None else parallel_steps(configs[0].threads, len(configs))
    with torch_threads(configs[0].threads):
        return _together(store, configs, progress, storage_options, writable, log, max(1, n))


def _together(
    store: Store | str,
    configs: list[TrainConfig],
    progress: bool,
    storage_options: dict[str, Any] | None,
    writable: bool,
    log: Callable[[str], Any] | None,
    parallel: int,
) -> list[TrainResult]:
    from tqdm.auto import tqdm

    st = writable_store(store, storage_options, writable)
    base = configs[0]
    acts, d_in = training_rows(st, base)
    identities = [run_identity(c) for c in configs]  # as given: what a checkpoint is continued by
    configs = [c.resolve(d_in) for c in configs]
    names = [c.name or c.default_name(int(c.d_sae or 0)) for c in configs]
    for n in names:
        check_name(n, "SAE")
    if len(set(names)) < len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(
            f"SAEs trained together need distinct names; {', '.join(dup)} would be trained twice"
        )
    device = torch.device(auto_device(base.device))
    tok = st.model_tokenization(base.model)
    locks: list[StoreLock] = []
    try:
        for n in names:  # one trainer of an SAE name at a time, here as in a single run
            locks.append(
                StoreLock(
                    st.loc, layout.sae_dir(n), f"train {n} (with {len(names) - 1} others)"
                ).acquire()
            )
        resume = [existing_run(st, c, n) for c, n in zip(configs, names, strict=True)]
        split, stream = open_stream(acts, tok, base, device)
        eval_x = held_out_rows(acts, split)  # read once for every run
        runs: list[TrainingRun] = []
        for c, ident, n, again in zip(configs, identities, names, resume, strict=True):
            torch.manual_seed(c.seed)  # as a single run seeds it, after opening its stream
            if again:
                runs.append(
                    TrainingRun.restore(st, c, ident, n, acts, split, stream, device, eval_x)
                )
            else:
                runs.append(
                    TrainingRun.start(st, c, ident, n, acts, split, stream, device, tok.key, eval_x)
                )
        total, per_epoch = runs[0].total_steps, runs[0].per_epoch
        step = min(r.step for r in runs)
        bar = tqdm(
            total=total * len(runs),
            initial=sum(r.step for r in runs),
            disable=not progress,
            unit="step",
            desc=f"train {len(runs)} SAEs of {base.model} layer {base.layer}",
            leave=False,
        )
        pool = (
            ThreadPoolExecutor(parallel, thread_name_prefix="actstore-sae")
            if parallel > 1
            else None
        )
        t0 = time.perf_counter()
        try:
            while step < total:
                epoch, skip = divmod(step, per_epoch)
                for batch in stream.batches(epoch, skip):
                    x = batch.to(device, non_blocking=True)  # (b, d_in): one read, every run's step
                    step += 1
                    # a run resumed from a later checkpoint waits
                    due = [r for r in runs if r.step < step]
                    if pool is None:
                        for r in due:
                            r.train_on(x, epoch, bar)
                    else:
                        list(pool.map(lambda r, e=epoch: r.train_on(x, e, bar), due))  # noqa: B023 (used at once)
                    if step >= total:
                        break
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown()
        seconds = time.perf_counter() - t0
        out = []
        for r in runs:
            r.loop_eval_seconds = r.eval_seconds
            out.append(r.finish(seconds))
            if log is not None:
                log(f"{r.name}: trained with {len(runs) - 1} other SAEs in one pass")
        return out
    finally:
        for lock in locks:
            lock.release()
