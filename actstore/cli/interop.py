"""Commands that bring other tools' SAEs in and send SAEs and features out (SAELens, sparsify, delphi, Neuronpedia)."""

from __future__ import annotations

import click

from actstore.cli.command import configured
from actstore.cli.group import main
from actstore.cli.options import (
    handle_errors,
    parse_storage_options,
    store_argument,
    terminal_safe,
    writable_option,
)
from actstore.query.config import FeatureExportConfig
from actstore.sae.config import EXPORT_FORMATS, ImportConfig


@main.command("import-sae")
@handle_errors
@store_argument
@configured(ImportConfig, arguments=("path",))
@writable_option
def import_sae_cmd(
    store: str, storage_options: tuple[str, ...], cfg: ImportConfig, writable: bool
) -> None:
    """Import the SAELens or sparsify SAE in folder PATH into STORE, checked on the layer's rows.

    The hook point (SAELens blocks.N.hook_resid_pre / _post, sparsify layers.N) picks the layer unless --layer is
    given; an SAE that does not fit (another width, a layer the model lacks, FVU >= 1) is refused. Then encode,
    top-tokens, sql, show and report work on it as on a trained one.
    """
    from actstore.sae.imports import import_sae

    res = import_sae(
        store, cfg, storage_options=parse_storage_options(storage_options), writable=writable
    )
    c, ev = res.cfg, res.eval
    click.echo(  # the hook name comes from the folder's cfg.json: its control characters are shown, not obeyed
        f"{res.store}: imported {cfg.format} SAE as {res.name} ({c.arch}, {c.d_in}->{c.d_sae}"
        + (f", k {c.k}" if c.k else "")
        + f") on {c.model} layer {c.layer} (hook {terminal_safe(str(res.hook))}); "
        f"fit on {ev.get('n_tokens', 0)} rows: FVU {ev.get('fvu', float('nan')):.4f}, L0 {ev.get('l0', float('nan')):.1f}, "
        f"dead {ev.get('dead_fraction', float('nan')):.3f}"
    )
    for note in res.notes:
        click.echo(f"note: {terminal_safe(note)}")


@main.command("export-sae")
@store_argument
@click.argument("name")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(EXPORT_FORMATS),
    default=EXPORT_FORMATS[0],
    show_default=True,
    help="saelens: cfg.json + sae_weights.safetensors; sparsify: cfg.json + sae.safetensors (topk only); "
    "both in the raw activation space. actstore: the stored files.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@handle_errors
def export_sae_cmd(
    store: str, storage_options: tuple[str, ...], name: str, fmt: str, out: str
) -> None:
    """Export SAE NAME of STORE for other tools (SAELens format by default)."""
    from actstore.sae.export import export_sae
    from actstore.store.reader import open_store

    files = export_sae(
        open_store(store, storage_options=parse_storage_options(storage_options)), name, out, fmt
    )
    click.echo(f"wrote {', '.join(str(f) for f in files)}")


@main.command("export-features")
@handle_errors
@store_argument
@configured(FeatureExportConfig)
def export_features_cmd(
    store: str, storage_options: tuple[str, ...], cfg: FeatureExportConfig
) -> None:
    """Export the feature table of SAE --sae in STORE for delphi (auto-interpretation) or Neuronpedia (dashboards).

    Built from the stored feature Parquet and token index: no model runs.
    """
    from actstore.query.exports import export_features
    from actstore.store.reader import open_store

    res = export_features(
        open_store(store, storage_options=parse_storage_options(storage_options)), cfg
    )
    what = "non-zero values" if cfg.format == "delphi" else "contexts"
    click.echo(
        f"wrote {len(res.files)} files, {res.n_bytes:,} bytes ({res.n_entries:,} {what}) to {res.out} "
        f"(the feature table: {res.table_bytes:,} bytes)"
    )
