"""SAE sweeps: every combination of models, layers, widths, k, architectures, learning rates and seeds of one
training config, each its own resumable run.

The runs that read the same rows in the same order (one model and layer: :func:`actstore.sae.group.stream_groups`)
are trained together from one pass over the shuffled stream (:mod:`actstore.sae.group`), each with its own optimizer
and checkpoint, bit-identical to separate runs; a sweep over seeds shares the first seed's data order
(``data_seed``). In this process the groups go one after another; with Ray (``ray_address``: ``"local"`` starts a
local Ray, an address joins an existing cluster) each group is a Ray task that opens the store by its path or URL,
so the store must be on storage every worker reaches (a shared folder or a bucket). A task asks for one GPU when
the cluster has GPUs, else ``threads`` CPUs. A run killed anywhere resumes from its own checkpoint when the sweep is
started again, exactly as a single ``actstore train`` does; finished SAEs trained with the same options are skipped,
ones trained with others refused (or replaced with ``overwrite``).
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
    one_pass: int = 1
    """SAEs trained in the same pass over the rows as this one (itself included)."""


SWEPT = {"k": "k", "lr": "lr", "seed": "s"}
"""Options a sweep may vary besides model, layer, arch and d_sae (which the default name holds) -> the prefix of
their value in the names of runs that would otherwise share one (``MODEL-lLAYER-ARCH-D_SAE-k16-lr0.001-s1``)."""


def name_runs(st: Any, configs: list[TrainConfig]) -> list[TrainConfig]:
    """Each unnamed config named ``MODEL-lLAYER-ARCH-D_SAE``, plus the options of :data:`SWEPT` that tell apart runs
    which would otherwise share that name; ConfigError when two runs would still share one."""
    base_names = []
    for c in configs:
        d_in = st.activations(c.model, c.layer).d_model if c.sources() is None else None
        base_names.append(
            c.default_name(int(c.resolve(d_in).d_sae or 0)) if d_in is not None else None
        )
    out = []
    for c, base in zip(configs, base_names, strict=True):
        if c.name or base is None:
            out.append(c)
            continue
        same = [o for o, b in zip(configs, base_names, strict=True) if b == base and not o.name]
        varying = [f for f in SWEPT if len({repr(getattr(o, f)) for o in same}) > 1]
        extra = "".join(
            f"-{SWEPT[f]}{_short(getattr(c, f))}" for f in varying if getattr(c, f) is not None
        )
        out.append(dataclasses.replace(c, name=base + extra))
    names = [c.name for c in out if c.name]
    if len(set(names)) < len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(
            f"this sweep would train {', '.join(dup)} more than once: vary what the names tell apart"
        )
    return out


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _summary(
    name: str, tc: TrainConfig, d_sae: int, metrics: dict[str, Any], skipped: bool
) -> dict[str, Any]:
    """A :class:`SweepRun`'s fields from an SAE's metrics (those ``train_sae`` returns, as saved in metrics.json)."""
    from actstore.sae.files import number, whole

    ev = metrics.get("eval") if isinstance(metrics.get("eval"), dict) else {}

    def num(v: Any, default: float = float("nan")) -> float:
        x = number(v)
        return default if x is None else x

    steps = whole(metrics.get("steps"))
    return {
        "name": name,
        "model": tc.model,
        "layer": tc.layer,
        "d_sae": d_sae,
        "fvu": num(ev.get("fvu")),
        "l0": num(ev.get("l0")),
        "dead_fraction": num(ev.get("dead_fraction")),
        "steps": 0 if steps is None else steps,
        "seconds": 0.0 if skipped else num(metrics.get("seconds"), 0.0),
        "skipped": skipped,
    }


def train_group(
    store: str, cfgs: list[dict[str, Any]], storage_options: dict[str, Any] | None, writable: bool
) -> list[dict[str, Any]]:
    """One stream group of a sweep (in this process or in a Ray worker): the runs not yet finished trained together
    from one pass (:mod:`actstore.sae.group`), finished ones skipped; a summary per config, in order."""
    from actstore.sae.files import read_metrics, sae_names
    from actstore.sae.group import train_together
    from actstore.sae.train import train_sae
    from actstore.storage.urls import write_access
    from actstore.store.reader import open_store

    tcs = [TrainConfig(**c) for c in cfgs]
    st = open_store(store, storage_options=storage_options, writable=write_access(store, writable))
    have = set(sae_names(st))
    out: list[dict[str, Any] | None] = [None] * len(tcs)
    todo = []
    for i, tc in enumerate(tcs):
        name, d_sae, finished = _finished(st, tc, have)
        if finished:
            out[i] = _summary(name, tc, d_sae, read_metrics(st, name), skipped=True)
        else:
            todo.append(i)
    if len(todo) == 1:
        res = train_sae(st, tcs[todo[0]], progress=False)
        out[todo[0]] = _summary(
            res.name, tcs[todo[0]], res.sae.cfg.d_sae, res.metrics, skipped=False
        )
    elif todo:
        for i, res in zip(
            todo, train_together(st, [tcs[i] for i in todo], progress=False), strict=True
        ):
            out[i] = {
                **_summary(res.name, tcs[i], res.sae.cfg.d_sae, res.metrics, skipped=False),
                "one_pass": len(todo),
            }
    return [o for o in out if o is not None]


def check_same_training(st: Any, tc: TrainConfig, name: str) -> None:
    """ConfigError unless the finished SAE ``name`` was trained with ``tc``'s options (then it is skipped)."""
    from actstore.sae.config import training_differences
    from actstore.sae.files import read_config

    saved = read_config(st, name)
    d_in = st.activations(tc.model, tc.layer).d_model
    diff = training_differences(saved.training, tc, saved.d_sae, saved.k, d_in)
    if diff:
        raise ConfigError(
            f"SAE {name!r} in {st.url} was trained with other options (differs in: {', '.join(diff)}): pass "
            "--overwrite to retrain it with these, or sweep with its options to keep it"
        )


def _finished(st: Any, tc: TrainConfig, have: set[str]) -> tuple[str, int, bool]:
    """``tc``'s SAE name and d_sae, and whether a finished SAE of that name is to be skipped (ConfigError from
    :func:`check_same_training` when it was trained with other options); ``have``: the store's SAE names."""
    d_sae = int(tc.resolve(st.activations(tc.model, tc.layer).d_model).d_sae or 0)
    name = tc.name or tc.default_name(d_sae)
    finished = not tc.overwrite and name in have
    if finished:
        check_same_training(st, tc, name)
    return name, d_sae, finished


def run_sweep(
    store: str,
    configs: list[TrainConfig],
    ray_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    writable: bool = False,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> list[SweepRun]:
    """Train every config; ``ray_address`` None: here, one after another; ``"local"``: a local Ray; else a cluster."""
    from tqdm.auto import tqdm

    from actstore.sae.group import stream_groups
    from actstore.store.reader import open_store

    if not is_remote(store):
        store = os.path.abspath(store)  # Ray workers do not share the driver's working directory
    from actstore.sae.files import sae_names

    st = open_store(store, storage_options=storage_options)
    # every run's model and layer exist (NotFoundError naming the first), before any run trains
    for cfg in configs:
        st.activations(cfg.model, cfg.layer)
    configs = name_runs(st, configs)
    have = set(sae_names(st))
    # every finished SAE the sweep would skip was trained with its options, checked up front
    for cfg in configs:
        _finished(st, cfg, have)
    groups = stream_groups(configs)
    bar = tqdm(total=len(configs), desc="sweep", unit="run", disable=not progress)
    out: list[SweepRun] = []
    try:
        if ray_address is None:
            for group in groups:
                for summary in train_group(
                    store, [c.to_dict() for c in group], storage_options, writable
                ):
                    out.append(SweepRun(**summary))
                    _report(out[-1], log)
                    bar.update()
        else:
            out = _run_on_ray(store, groups, ray_address, storage_options, writable, bar, log)
    finally:
        bar.close()
    return out


def _report(run: SweepRun, log: Callable[[str], Any]) -> None:
    what = "already trained" if run.skipped else f"{run.steps} steps in {run.seconds:.1f}s"
    if run.one_pass > 1:
        n = run.one_pass - 1
        what += f", trained with {n} other SAE{'s' if n > 1 else ''} in one pass"
    log(
        f"{run.name}: held-out FVU {run.fvu:.4f}, L0 {run.l0:.1f}, dead {run.dead_fraction:.3f} ({what})"
    )


def _run_on_ray(
    store: str,
    groups: list[list[TrainConfig]],
    address: str,
    storage_options: dict[str, Any] | None,
    writable: bool,
    bar: Any,
    log: Callable[[str], Any],
) -> list[SweepRun]:
    """Each stream group (one layer's runs) a Ray task; summaries in the order of the groups' configs."""
    with ray_session(address) as ray:
        task = ray.remote(train_group)
        pending = {}
        for i, group in enumerate(groups):
            opts = actor_resources(ray, group[0].threads)
            pending[
                task.options(**opts).remote(
                    store, [c.to_dict() for c in group], storage_options, writable
                )
            ] = (i, group)
        # in the order of the groups, whatever order they finish in
        out: list[list[SweepRun] | None] = [None] * len(groups)
        failed: list[tuple[TrainConfig, BaseException]] = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i, group = pending.pop(ref)
                try:
                    runs = out[i] = [SweepRun(**s) for s in ray.get(ref)]
                    for run in runs:
                        _report(run, log)
                except (
                    ray.exceptions.RayTaskError
                ) as exc:  # the group's own error, raised in its worker
                    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                    failed.append((group[0], cause))
                    log(
                        f"{group[0].model} layer {group[0].layer} ({len(group)} SAEs): FAILED: {cause}"
                    )
                bar.update(len(group))
        if failed:
            cause = failed[0][1]
            n = sum(len(g) for g in groups)
            msg = (
                f"{len(failed)} of {len(groups)} groups of the sweep's {n} runs failed (first: {cause}); the others are "
                "saved, and rerunning the same sweep resumes the failed ones from their checkpoints"
            )
            raise (
                type(cause)(msg) if isinstance(cause, ActstoreError) else ActstoreError(msg)
            ) from cause
        return [r for runs in out if runs is not None for r in runs]
