"""What a feature does: ``actstore effects`` (attribution and ablation over the corpus) and ``actstore steer``."""

from __future__ import annotations

from typing import Any

import click

from actstore.cli.command import configured
from actstore.cli.group import main
from actstore.cli.options import (
    emit,
    handle_errors,
    output_format_option,
    parse_storage_options,
    quiet_option,
    store_argument,
    writable_option,
)
from actstore.effects.config import EffectsConfig, SteerConfig
from actstore.storage.urls import write_access


@main.command("effects")
@handle_errors
@store_argument
@configured(EffectsConfig)
@writable_option
@output_format_option
@quiet_option
def effects_cmd(store: str, storage_options: tuple[str, ...], cfg: EffectsConfig, writable: bool, fmt: str,
                out: str | None, quiet: bool) -> None:  # fmt: skip
    """Each feature's effect on the model's output, over the store's samples: SAE --sae spliced into the model at
    its layer (its reconstruction error added back, so the output is unchanged), attribution = activation x gradient
    of the target, per sample and active feature; then the top features ablated exactly.

    Saved in STORE/saes/SAE/effects/MODEL/ (the feature_effects, feature_ablations and feature_ablation_samples
    views); resumes a killed run.
    Prints one row per ablated feature (the class it moves most); the views hold every class.
    """
    import polars as pl

    from actstore.effects.run import effects
    from actstore.store.reader import open_store

    st = open_store(
        store,
        writable=write_access(store, writable),
        storage_options=parse_storage_options(storage_options),
    )
    rep = effects(st, cfg, progress=not quiet)
    r = rep.result
    err = bool(out) or fmt != "table"
    if rep.ablation:
        from actstore.effects.ablate import read_ablations

        emit(
            summary_table(read_ablations(st, r.sae, r.model)).with_columns(
                pl.col(pl.Float64).round(5)
            ),
            fmt,
            out,
        )
    rate = f", {r.samples_per_s:.1f} samples/s" if r.seconds else " (already computed)"
    click.echo(f"{r.sae} on {r.model} layer {r.layer}: attribution to {r.target} over {r.n_samples} samples, "
               f"{r.n_rows} rows{rate}", err=err)  # fmt: skip
    if rep.ablation:
        rho = rep.ablation.get("rank_correlation")
        click.echo(f"ablated {len(rep.ablation['features'])} features ({rep.ablation['mode']}) over "
                   f"{rep.ablation['n_samples']} samples; rank correlation of attribution and ablation: "
                   f"{'n/a' if rho is None else f'{rho:.3f}'}", err=err)  # fmt: skip


def summary_table(ablations: Any) -> Any:
    """One row per ablated feature, largest |effect| first: a classifier's row of the class whose probability moved
    most (``class``, ``delta_prob``), its accuracy change, and the summed attribution beside the exact effect."""
    import polars as pl

    moved = pl.col("delta_prob").abs().fill_null(0)
    return (
        ablations.sort(moved, descending=True)
        .group_by("feature", maintain_order=True)
        .first()
        .select(
            "feature",
            "class",
            "attribution",
            "effect",
            "delta_prob",
            "delta_acc",
            "delta_loss",
            "n",
        )
        .sort(pl.col("effect").abs(), descending=True)
    )


@main.command("steer")
@handle_errors
@store_argument
@configured(SteerConfig)
@output_format_option
def steer_cmd(
    store: str, storage_options: tuple[str, ...], cfg: SteerConfig, fmt: str, out: str | None
) -> None:
    """Run the model on --text with SAE --sae's --feature clamped to --value at every token, beside the unsteered
    run: a classifier's class probabilities, or a decoder LM's top next tokens and greedy continuation."""
    from actstore.effects.steer import steer
    from actstore.store.reader import open_store

    st = open_store(store, storage_options=parse_storage_options(storage_options))
    res = steer(st, cfg)
    emit(res.table, fmt, out)
    for line in res.lines:
        click.echo(line, err=bool(out) or fmt != "table")
