"""Crosscoder commands: train one on several models' row-aligned activations, diff its latents, compare two seeds."""

from __future__ import annotations

import click

from actstore.analysis.config import CrosscoderDiffConfig
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
from actstore.sae.archs import CROSSCODER_ARCHS, SAE_ONLY_OPTIONS
from actstore.sae.config import TrainConfig
from actstore.storage.urls import write_access

CROSSCODER_SHOWN = {"arch": "batchtopk", "optimizer": "signum"}
"""Defaults a crosscoder resolves otherwise than an SAE (``TrainConfig`` resolves them; ``--help`` says so)."""


@main.command("train-crosscoder")
@handle_errors
@store_argument
@configured(
    TrainConfig,
    skip=(
        "model",
        "layer",
        "preset",
        "resample",
        "init",
        "b_dec_init",
        "unit_grad",
        "task_samples",
        *SAE_ONLY_OPTIONS,
    ),
    choices={"arch": CROSSCODER_ARCHS},
    required=("models", "layers"),
    fixed={"model": "", "layer": 0},
    shown=CROSSCODER_SHOWN,
)
@writable_option
@quiet_option
def train_crosscoder(
    store: str, storage_options: tuple[str, ...], cfg: TrainConfig, writable: bool, quiet: bool
) -> None:
    """Train a crosscoder on several models' (or layers') activations of the same tokens, streaming (resumable).

    One dictionary, a decoder per model: --models pretrained,finetuned --layer 4 --arch batchtopk --k 32 (Minder et
    al. 2025 recommend batchtopk; relu-l1 uses the decoder-norm-weighted L1 of Lindsey et al. 2024). Then diff its
    latents with actstore diff-crosscoder, encode it with actstore encode --sae NAME.
    """
    from actstore.sae.train import train_sae

    res = train_sae(
        store,
        cfg,
        progress=not quiet,
        storage_options=parse_storage_options(storage_options),
        writable=write_access(store, writable),
    )
    ev, c = res.metrics.get("eval") or {}, res.sae.cfg
    size = f"k {c.k}" if c.k else f"l1 {c.l1:g}"
    per = ", ".join(f"{s['source']} {s['fvu']:.4f}" for s in ev.get("sources", []))
    click.echo(
        f"{res.store}: crosscoder {res.name} ({c.arch}, {c.n_sources}x{c.d_in}->{c.d_sae}, {size}) on "
        f"{', '.join(c.source_labels())}: {res.steps} steps, {res.tokens} tokens"
        + (f", resumed at step {res.resumed_from}" if res.resumed_from else "")
        + f"; held-out FVU {ev.get('fvu', float('nan')):.4f} ({per}), L0 {ev.get('l0', float('nan')):.1f}, "
        f"dead {ev.get('dead_fraction', float('nan')):.3f} (never fired on the held-out tokens)"
    )


@main.command("diff-crosscoder")
@handle_errors
@store_argument
@configured(CrosscoderDiffConfig)
@click.option(
    "--top", default=10, show_default=True, help="B-only latents to list with their top tokens."
)
@writable_option
@output_format_option
def diff_crosscoder_cmd(
    store: str,
    storage_options: tuple[str, ...],
    cfg: CrosscoderDiffConfig,
    top: int,
    writable: bool,
    fmt: str,
    out: str | None,
) -> None:
    """Classify a crosscoder's latents shared / changed / A-only / B-only from its decoder norms, with Latent Scaling
    (Minder et al. 2025) flagging the one-model latents the other model carries after all; list the top B-only ones.

    Saved beside the crosscoder (SQL view crosscoder_latents) when the store is writable.
    """
    from actstore.analysis.crosscoder import diff_crosscoder
    from actstore.analysis.crosscoder_reads import top_latents
    from actstore.store.reader import open_store

    st = open_store(
        store,
        writable=write_access(store, writable),
        storage_options=parse_storage_options(storage_options),
    )
    sae, nu = cfg.sae, cfg.nu
    res = diff_crosscoder(st, cfg, save=st.writable)
    if out or fmt != "table":
        emit(res.table, fmt, out)
        return
    c = res.counts
    click.echo(f"{sae}: A = {res.sources[0]}, B = {res.sources[1]}, {res.n_rows} token rows")
    click.echo(", ".join(f"{k} {v}" for k, v in c.items() if not k.endswith("exclusive")))
    click.echo(
        f"after Latent Scaling: a-only {c['a-only exclusive']} of {c['a-only']}, b-only {c['b-only exclusive']} "
        f"of {c['b-only']} not flagged (nu >= {nu}: the other model carries them)"
    )
    tl = top_latents(st, res, "b-only", n=top)
    if tl.height:
        click.echo(f"top B-only latents ({res.sources[1]} only):")
    elif top:
        tl = top_latents(st, res, None, n=top)
        click.echo(
            f"no latent is B-only; the {tl.height} leaning furthest towards {res.sources[1]} (highest relative norm):"
        )
    if tl.height:
        emit(tl, "table", None)
        from actstore.encoding.table import encoded_saes

        if sae not in encoded_saes(st):
            click.echo(f"(top tokens: encode it first: actstore encode {store} --sae {sae})")
    if st.writable:
        click.echo(
            f"saved: query it with actstore sql {store} \"SELECT * FROM crosscoder_latents WHERE sae = '{sae}'\""
        )
    else:
        click.echo(f"not saved: {store} is opened read-only (pass --writable to save it)", err=True)


@main.command("crosscoder-stability")
@store_argument
@click.option(
    "--sae",
    "saes",
    multiple=True,
    required=True,
    help="Two crosscoders of the same sources: --sae A --sae B.",
)
@click.option(
    "--cos", default=0.7, show_default=True, help="Decoder cosine a partner latent needs."
)
@handle_errors
def crosscoder_stability_cmd(
    store: str, storage_options: tuple[str, ...], saes: tuple[str, ...], cos: float
) -> None:
    """How many one-model latents of one crosscoder have a partner of the same class in another (e.g. another --seed)."""
    from actstore.analysis.crosscoder_reads import crosscoder_stability
    from actstore.store.reader import open_store

    if len(saes) != 2:
        raise click.UsageError(f"give exactly two crosscoders: --sae A --sae B (got {len(saes)})")
    res = crosscoder_stability(
        open_store(store, storage_options=parse_storage_options(storage_options)),
        saes[0],
        saes[1],
        cos,
    )
    for key, (x, y) in res.counts.items():
        click.echo(f"{key}: {x} vs {y}")
    for key, frac in res.matched.items():
        click.echo(
            f"{key} of {saes[0]} with a {key.split()[0]} partner in {saes[1]} (cos >= {cos}): {frac:.1%}"
        )
