"""Evaluations of SAEs beyond reconstruction: ``actstore eval`` (sparse probing on the store's labels, first-letter
absorption)."""

from __future__ import annotations

from typing import Any

import click

from actstore.analysis.config import EvalConfig
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
from actstore.storage.urls import write_access


@main.command("eval")
@handle_errors
@store_argument
@configured(EvalConfig)
@writable_option
@output_format_option
@quiet_option
def eval_cmd(store: str, storage_options: tuple[str, ...], cfg: EvalConfig, writable: bool, fmt: str,
             out: str | None, quiet: bool) -> None:  # fmt: skip
    """Evaluate SAE --sae. sparse_probing (default): k-sparse probes on its features beside a dense probe on its
    layer's raw activations, on the store's labels (per-sample mean pooling, one label against the rest, held-out
    accuracy). absorption: SAEBench's first-letter feature absorption, prompting the model with its own vocabulary
    (needs a model that can spell).

    Saved as evals.json beside the SAE when the store is writable (local stores: always).
    """
    from actstore.store.reader import open_store

    st = open_store(
        store,
        writable=write_access(store, writable),
        storage_options=parse_storage_options(storage_options),
    )
    err = bool(out) or fmt != "table"
    for name in cfg.evals:
        res = (_probing if name == "sparse_probing" else _absorption)(st, cfg, fmt, out, quiet)
        if st.writable:
            from actstore.analysis.probing import save_evals

            click.echo(f"saved {save_evals(st, res, name)}", err=err)
        else:
            click.echo(
                f"not saved: {store} is opened read-only (pass --writable to save evals.json)",
                err=True,
            )


def _probing(st: Any, cfg: EvalConfig, fmt: str, out: str | None, quiet: bool) -> Any:
    import polars as pl

    from actstore.analysis.probing import sparse_probing

    res = sparse_probing(st, cfg, progress=not quiet)
    rows = [{"task": f"{t.label} vs rest", "n_train": t.n_train, "n_test": t.n_test, "dense": t.dense,
             **{f"k{k}": t.sparse[k] for k in cfg.k}} for t in res.tasks]  # fmt: skip
    rows.append({"task": "mean", "n_train": None, "n_test": None, "dense": res.dense,
                 **{f"k{k}": res.sparse[k] for k in cfg.k}})  # fmt: skip
    emit(pl.DataFrame(rows).with_columns(pl.col(pl.Float64).round(4)), fmt, out)
    err = bool(out) or fmt != "table"
    best = max(cfg.k, key=lambda k: res.sparse[k])
    click.echo(
        f"{res.sae} ({res.model} layer {res.layer}): {res.n_samples} samples, {len(res.tasks)} tasks; mean held-out "
        f"accuracy dense {res.dense:.3f}, k={cfg.k[0]} {res.sparse[cfg.k[0]]:.3f}, best k={best} {res.sparse[best]:.3f} "
        f"({res.seconds:.1f}s)",
        err=err,
    )
    return res


def _absorption(st: Any, cfg: EvalConfig, fmt: str, out: str | None, quiet: bool) -> Any:
    import polars as pl

    from actstore.analysis.absorption import absorption

    res = absorption(st, cfg, progress=not quiet)
    rows = [{"letter": r.letter, "probe_f1": r.probe_f1, "scored": r.scored, "true_positives": r.n_true_positives,
             "main_latents": ",".join(map(str, r.main_latents)), "sparse_f1": r.sparse_f1,
             "absorption_fraction": r.absorption_fraction, "full_absorption": r.full_absorption}
            for r in res.letters]  # fmt: skip
    emit(pl.DataFrame(rows).with_columns(pl.col(pl.Float64).round(4)), fmt, out)
    n = sum(r.scored for r in res.letters)
    click.echo(
        f"{res.sae} ({res.model} layer {res.layer}): {res.n_words} words, {n} letters scored (mean probe F1 "
        f"{res.probe_f1:.3f}); mean absorption fraction {res.absorption_fraction:.3f}, full absorption "
        f"{res.full_absorption:.3f}, {res.split_latents:.2f} main latents per letter ({res.seconds:.1f}s)",
        err=bool(out) or fmt != "table",
    )
    return res
