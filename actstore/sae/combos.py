"""Sweeps as configs: every combination of a command line's comma-separated values (models, layers, widths, k,
architectures, learning rates, seeds), one :class:`TrainConfig` each. Torch-free (the CLI builds them); the runs
are trained by :mod:`actstore.sae.sweep`."""

from __future__ import annotations

import dataclasses
from typing import Any

from actstore.errors import ConfigError
from actstore.sae.archs import get_arch
from actstore.sae.config import TrainConfig
from actstore.sae.recipe import PRESETS

SWEEPABLE = ("model", "layer", "arch", "d_sae", "k", "lr", "seed")
"""The TrainConfig fields ``actstore train`` takes comma-separated values of."""


def expand(values: dict[str, Any], sweeps: dict[str, list[Any]]) -> list[TrainConfig]:
    """Every combination of ``sweeps`` (field -> values; a field given once is a one-value list) over the other
    ``values``; a field in neither takes its default. Each architecture resolves its own defaults, and a relu-l1 run
    of a sweep that mixes architectures takes no ``k`` (k is topk's and batchtopk's)."""
    lists = {
        f: list(sweeps[f]) if sweeps.get(f) else [values[f]]
        for f in SWEEPABLE
        if sweeps.get(f) or f in values
    }
    out: list[TrainConfig] = []
    for arch in lists.get("arch", [None]):
        name = (
            arch or PRESETS.get(values.get("preset") or "", {}).get("arch") or "relu-l1"
        )  # TrainConfig's default
        mixed = not get_arch(name).uses_k and len(lists.get("arch", [])) > 1
        first = {f: v[0] for f, v in lists.items() if f != "arch"}
        if mixed:
            first["k"] = None
        base = TrainConfig(**{**values, **first, "arch": arch})
        out += sweep_configs(base, lists.get("model", [base.model]), lists.get("layer", [base.layer]),
                             lists.get("d_sae", [base.d_sae]), None if mixed else lists.get("k"), lists.get("lr"),
                             lists.get("seed"))  # fmt: skip
    return out


def sweep_configs(
    base: TrainConfig,
    models: list[str],
    layers: list[int],
    d_saes: list[int | None],
    ks: list[int | None] | None = None,
    lrs: list[float | None] | None = None,
    seeds: list[int] | None = None,
) -> list[TrainConfig]:
    """One config per combination (``base.name`` only for one); a sweep over seeds reads the first seed's data order
    (``data_seed``), so its runs share one stream. Names are given by :func:`name_runs`. Architectures are swept by
    calling this once per architecture's ``base`` (each resolves its own defaults) and joining the lists."""
    combos = [
        (m, layer, d, k, lr, sd)
        for m in models
        for layer in layers
        for d in (d_saes or [base.d_sae])
        for k in (ks or [base.k])
        for lr in (lrs or [base.lr])
        for sd in (seeds or [base.seed])
    ]
    if not combos:
        raise ConfigError("a sweep needs at least one model, one layer and one d_sae")
    if base.name and len(combos) > 1:
        raise ConfigError(
            f"--name names one SAE, but this sweep trains {len(combos)}: drop --name (each run is named "
            "MODEL-lLAYER-ARCH-D_SAE, with -kK, -lrLR, -sSEED where those vary)"
        )
    data_seed = (
        base.data_seed if base.data_seed is not None or len(seeds or []) < 2 else (seeds or [0])[0]
    )
    return [
        dataclasses.replace(
            base, model=m, layer=layer, d_sae=d, k=k, lr=lr, seed=sd, data_seed=data_seed
        )
        for m, layer, d, k, lr, sd in combos
    ]
