"""SAE sweeps: every (model, layer, d_sae) combination of one training config, each its own resumable run.

In this process the runs go one after another; with Ray (``ray_address``: ``"local"`` starts a local Ray, an
address joins an existing cluster) each run is a Ray task that opens the store by its path or URL, so the store
must be on storage every worker reaches (a shared folder or a bucket). A task asks for one GPU when the cluster
has GPUs, else ``threads`` CPUs. A run killed anywhere resumes from its own checkpoint when the sweep is started
again, exactly as a single ``actstore train`` does; finished SAEs are skipped.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actstore.cluster import actor_resources, ray_session
from actstore.errors import ActstoreError, ConfigError
from actstore.sae.config import TrainConfig
from actstore.storage.urls import is_remote


@dataclass
class SweepRun:
    """One finished run of a sweep."""

    name: str
    model: str
    layer: int
    d_sae: int
    fvu: float
    l0: float
    dead_fraction: float
    steps: int
    seconds: float
    skipped: bool = False
    """The SAE already existed, finished, so nothing was trained."""


def sweep_configs(base: TrainConfig, models: list[str], layers: list[int], d_saes: list[int | None]) -> list[TrainConfig]:
    """One config per (model, layer, d_sae), each named ``MODEL-lLAYER-ARCH-D_SAE`` (``base.name`` only for one)."""
    combos = [(m, layer, d) for m in models for layer in layers for d in (d_saes or [base.d_sae])]
    if not combos:
        raise ConfigError("a sweep needs at least one model, one layer and one d_sae")
    if base.name and len(combos) > 1:
        raise ConfigError(f"--name names one SAE, but this sweep trains {len(combos)}: drop --name (each run is named "
                          "MODEL-lLAYER-ARCH-D_SAE)")  # fmt: skip
    return [dataclasses.replace(base, model=m, layer=layer, d_sae=d) for m, layer, d in combos]


def _summary(name: str, tc: TrainConfig, d_sae: int, metrics: dict[str, Any], skipped: bool) -> dict[str, Any]:
    """A :class:`SweepRun`'s fields from an SAE's metrics (those ``train_sae`` returns, as saved in metrics.json)."""
    from actstore.sae.files import number, whole

    ev = metrics.get("eval") if isinstance(metrics.get("eval"), dict) else {}

    def num(v: Any, default: float = float("nan")) -> float:
        x = number(v)
        return default if x is None else x

    steps = whole(metrics.get("steps"))
    return {"name": name, "model": tc.model, "layer": tc.layer, "d_sae": d_sae, "fvu": num(ev.get("fvu")),
            "l0": num(ev.get("l0")), "dead_fraction": num(ev.get("dead_fraction")), "steps": 0 if steps is None else steps,
            "seconds": 0.0 if skipped else num(metrics.get("seconds"), 0.0), "skipped": skipped}  # fmt: skip


def train_one(store: str, cfg: dict[str, Any], storage_options: dict[str, Any] | None, writable: bool) -> dict[str, Any]:
    """One run of a sweep (in this process or in a Ray worker): its summary; a finished SAE is skipped."""
    from actstore.sae.files import read_metrics, sae_names
    from actstore.sae.train import train_sae
    from actstore.storage.urls import write_access
    from actstore.store.reader import open_store

    tc = TrainConfig(**cfg)
    st = open_store(store, storage_options=storage_options, writable=write_access(store, writable))
    d_sae = tc.resolve(st.activations(tc.model, tc.layer).d_model)[0]
    name = tc.name or tc.default_name(d_sae)
    if not tc.overwrite and name in sae_names(st):
        check_same_training(st, tc, name)
        return _summary(name, tc, d_sae, read_metrics(st, name), skipped=True)
    res = train_sae(st, tc, progress=False)
    return _summary(res.name, tc, res.sae.cfg.d_sae, res.metrics, skipped=False)


def check_same_training(st: Any, tc: TrainConfig, name: str) -> None:
    """ConfigError unless the finished SAE ``name`` was trained with ``tc``'s options (then it is skipped)."""
    from actstore.sae.config import training_differences
    from actstore.sae.files import read_config

    saved = read_config(st, name)
    d_in = st.activations(tc.model, tc.layer).d_model
    diff = training_differences(saved.training, tc, saved.d_sae, saved.k, d_in)
    if diff:
        raise ConfigError(f"SAE {name!r} in {st.url} was trained with other options (differs in: {', '.join(diff)}): pass "
                          "--overwrite to retrain it with these, or sweep with its options to keep it")  # fmt: skip


def _check_existing(store: str, configs: list[TrainConfig], storage_options: dict[str, Any] | None) -> None:
    """Every finished SAE a sweep would skip was trained with the sweep's options, checked before any run trains."""
    from actstore.sae.files import sae_names
    from actstore.store.reader import open_store

    st = open_store(store, storage_options=storage_options)
    have = set(sae_names(st))
    for tc in configs:
        if tc.overwrite:
            continue
        d_sae = tc.resolve(st.activations(tc.model, tc.layer).d_model)[0]
        name = tc.name or tc.default_name(d_sae)
        if name in have:
            check_same_training(st, tc, name)


def run_sweep(store: str, configs: list[TrainConfig], ray_address: str | None = None,
              storage_options: dict[str, Any] | None = None, writable: bool = False, progress: bool = True,
              log: Callable[[str], Any] = print) -> list[SweepRun]:  # fmt: skip
    """Train every config; ``ray_address`` None: here, one after another; ``"local"``: a local Ray; else a cluster."""
    from tqdm.auto import tqdm

    if not is_remote(store):
        store = os.path.abspath(store)  # Ray workers do not share the driver's working directory
    _check_layers(store, configs, storage_options)
    _check_existing(store, configs, storage_options)
    bar = tqdm(total=len(configs), desc="sweep", unit="run", disable=not progress)
    out: list[SweepRun] = []
    try:
        if ray_address is None:
            for cfg in configs:
                out.append(SweepRun(**train_one(store, cfg.to_dict(), storage_options, writable)))
                _report(out[-1], log)
                bar.update()
        else:
            out = _run_on_ray(store, configs, ray_address, storage_options, writable, bar, log)
    finally:
        bar.close()
    return out


def _check_layers(store: str, configs: list[TrainConfig], storage_options: dict[str, Any] | None) -> None:
    """Every run's model and layer exist (NotFoundError naming the first that does not), before any run trains."""
    from actstore.store.reader import open_store

    st = open_store(store, storage_options=storage_options)
    for cfg in configs:
        st.activations(cfg.model, cfg.layer)


def _report(run: SweepRun, log: Callable[[str], Any]) -> None:
    what = "already trained" if run.skipped else f"{run.steps} steps in {run.seconds:.1f}s"
    log(f"{run.name}: held-out FVU {run.fvu:.4f}, L0 {run.l0:.1f}, dead {run.dead_fraction:.3f} ({what})")


def _run_on_ray(store: str, configs: list[TrainConfig], address: str, storage_options: dict[str, Any] | None,
                writable: bool, bar: Any, log: Callable[[str], Any]) -> list[SweepRun]:  # fmt: skip
    with ray_session(address) as ray:
        task = ray.remote(train_one)
        pending = {}
        for i, cfg in enumerate(configs):
            opts = actor_resources(ray, cfg.threads)
            pending[task.options(**opts).remote(store, cfg.to_dict(), storage_options, writable)] = (i, cfg)
        out: list[SweepRun | None] = [None] * len(configs)  # in the order of configs, whatever order they finish in
        failed: list[tuple[TrainConfig, BaseException]] = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i, cfg = pending.pop(ref)
                try:
                    run = out[i] = SweepRun(**ray.get(ref))
                    _report(run, log)
                except ray.exceptions.RayTaskError as exc:  # the run's own error, raised in its worker
                    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                    failed.append((cfg, cause))
                    log(f"{cfg.model} layer {cfg.layer} d_sae {cfg.d_sae}: FAILED: {cause}")
                bar.update()
        if failed:
            cause = failed[0][1]
            msg = (f"{len(failed)} of {len(configs)} runs of the sweep failed (first: {cause}); the others are saved, "
                   "and rerunning the same sweep resumes the failed ones from their checkpoints")  # fmt: skip
            raise (type(cause)(msg) if isinstance(cause, ActstoreError) else ActstoreError(msg)) from cause
        return [r for r in out if r is not None]
