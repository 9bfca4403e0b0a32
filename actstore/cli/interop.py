"""Commands that bring other tools' SAEs in and send SAEs and features out (SAELens, sparsify, delphi, Neuronpedia)."""

from __future__ import annotations

import click

from actstore.cli.group import main
from actstore.cli.options import (
    config_options,
    handle_errors,
    parse_storage_options,
    store_argument,
    terminal_safe,
    writable_option,
)
from actstore.query.config import FEATURE_EXPORT_FORMATS, FeatureExportConfig
from actstore.sae.config import EXPORT_FORMATS, IMPORT_FORMATS, ImportConfig

_import, _fexport = config_options(ImportConfig), config_options(FeatureExportConfig)


@main.command("import-sae")
@store_argument
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(IMPORT_FORMATS), required=True,
              help="saelens: cfg.json + sae_weights.safetensors; sparsify: cfg.json + sae.safetensors "
                   "(one hook point).")  # fmt: skip
@_import("model")
@_import("layer")
@_import("name")
@_import("force")
@_import("overwrite")
@_import("max_eval_tokens")
@writable_option
@handle_errors
def import_sae_cmd(store: str, storage_options: tuple[str, ...], path: str, fmt: str, model: str | None, layer: int | None,
                   name: str | None, force: bool, overwrite: bool, max_eval_tokens: int, writable: bool) -> None:  # fmt: skip
    """Import the SAELens or sparsify SAE in folder PATH into STORE, checked on the layer's rows.

    The hook point (SAELens blocks.N.hook_resid_pre / _post, sparsify layers.N) picks the layer unless --layer is
    given; an SAE that does not fit (another width, a layer the model lacks, FVU >= 1) is refused. Then encode,
    top-tokens, sql, show and report work on it as on a trained one.
    """
    from actstore.sae.imports import import_sae

    cfg = ImportConfig(path=path, format=fmt, model=model, layer=layer, name=name, force=force, overwrite=overwrite,
                       max_eval_tokens=max_eval_tokens)  # fmt: skip
    res = import_sae(store, cfg, storage_options=parse_storage_options(storage_options), writable=writable)
    c, ev = res.cfg, res.eval
    click.echo(  # the hook name comes from the folder's cfg.json: its control characters are shown, not obeyed
        f"{res.store}: imported {fmt} SAE as {res.name} ({c.arch}, {c.d_in}->{c.d_sae}"
        + (f", k {c.k}" if c.k else "") + f") on {c.model} layer {c.layer} (hook {terminal_safe(str(res.hook))}); "
        f"fit on {ev.get('n_tokens', 0)} rows: FVU {ev.get('fvu', float('nan')):.4f}, L0 {ev.get('l0', float('nan')):.1f}, "
        f"dead {ev.get('dead_fraction', float('nan')):.3f}"
    )  # fmt: skip
    for note in res.notes:
        click.echo(f"note: {terminal_safe(note)}")


@main.command("export-sae")
@store_argument
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default=EXPORT_FORMATS[0], show_default=True,
              help="saelens: cfg.json + sae_weights.safetensors; sparsify: cfg.json + sae.safetensors (topk only); "
                   "both in the raw activation space. actstore: the stored files.")  # fmt: skip
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@handle_errors
def export_sae_cmd(store: str, storage_options: tuple[str, ...], name: str, fmt: str, out: str) -> None:
    """Export SAE NAME of STORE for other tools (SAELens format by default)."""
    from actstore.sae.export import export_sae
    from actstore.store.reader import open_store

    files = export_sae(open_store(store, storage_options=parse_storage_options(storage_options)), name, out, fmt)
    click.echo(f"wrote {', '.join(str(f) for f in files)}")


@main.command("export-features")
@store_argument
@click.option("--sae", required=True, help="Name of the encoded SAE.")
@click.option("--format", "fmt", type=click.Choice(FEATURE_EXPORT_FORMATS), required=True,
              help="delphi: its latent cache (safetensors per latent range); neuronpedia: batch-N.json dashboards.")  # fmt: skip
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@_fexport("n_splits")
@click.option("--features", default=None, help="neuronpedia: features to export, e.g. 3,17,210 (default: all that fire).")
@_fexport("top_n")
@_fexport("context")
@_fexport("features_per_batch")
@handle_errors
def export_features_cmd(store: str, storage_options: tuple[str, ...], sae: str, fmt: str, out: str, n_splits: int,
                        features: str | None, top_n: int, context: int, features_per_batch: int) -> None:  # fmt: skip
    """Export the feature table of SAE --sae in STORE for delphi (auto-interpretation) or Neuronpedia (dashboards).

    Built from the stored feature Parquet and token index: no model runs.
    """
    from actstore.query.exports import export_features
    from actstore.store.reader import open_store

    try:
        feats = [int(x) for x in features.split(",") if x.strip()] if features else None
    except ValueError:
        raise click.BadParameter(f"{features!r}: give feature numbers, e.g. 3,17,210", param_hint="--features") from None
    cfg = FeatureExportConfig(sae=sae, format=fmt, out=out, n_splits=n_splits, features=feats, top_n=top_n,
                              context=context, features_per_batch=features_per_batch)  # fmt: skip
    res = export_features(open_store(store, storage_options=parse_storage_options(storage_options)), cfg)
    what = "non-zero values" if fmt == "delphi" else "contexts"
    click.echo(f"wrote {len(res.files)} files, {res.n_bytes:,} bytes ({res.n_entries:,} {what}) to {res.out} "
               f"(the feature table: {res.table_bytes:,} bytes)")  # fmt: skip
