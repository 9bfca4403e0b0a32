"""Evaluations of SAEs beyond reconstruction: ``actstore eval`` (sparse probing on the store's labels)."""

from __future__ import annotations

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
    """Sparse probing of SAE --sae on the store's labels: k-sparse probes on its features beside a dense probe on
    its layer's raw activations (per-sample mean pooling, one label against the rest, held-out accuracy).

    Saved as evals.json beside the SAE when the store is writable (local stores: always).
    """
    import polars as pl

    from actstore.analysis.probing import save_evals, sparse_probing
    from actstore.store.reader import open_store

    st = open_store(
        store,
        writable=write_access(store, writable),
        storage_options=parse_storage_options(storage_options),
    )
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
    if st.writable:
        click.echo(f"saved {save_evals(st, res)}", err=err)
    else:
        click.echo(
            f"not saved: {store} is opened read-only (pass --writable to save evals.json)", err=True
        )
