"""Crosscoder commands: train one on several models' row-aligned activations, diff its latents, compare two seeds."""

from __future__ import annotations

import click

from actstore.analysis.config import CrosscoderDiffConfig
from actstore.cli.group import main
from actstore.cli.options import (
    config_options,
    emit,
    handle_errors,
    output_format_option,
    parse_storage_options,
    quiet_option,
    store_argument,
    writable_option,
)
from actstore.sae.config import OPTIMIZERS, TRAIN_ARCHS, TrainConfig
from actstore.storage.urls import write_access

_train, _ccdiff = config_options(TrainConfig), config_options(CrosscoderDiffConfig)


@main.command("train-crosscoder")
@store_argument
@click.option("--models", required=True, help="Models read together, comma separated (row-aligned: one tokenization).")
@click.option("--layer", "--layers", "layers", required=True,
              help="One layer for every model, or one per model (2,4), or several of one model (cross-layer).")  # fmt: skip
@_train("arch", type=click.Choice(TRAIN_ARCHS), help="batchtopk (default), topk, or relu-l1 (the decoder-norm-weighted L1).")
@_train("d_sae")
@_train("expansion")
@_train("k")
@_train("l1")
@_train("l1_warmup")
@_train("lr")
@_train("optimizer", type=click.Choice(OPTIMIZERS))
@_train("epochs")
@_train("tokens")
@_train("batch_size")
@_train("name")
@_train("seed")
@_train("buffer_mb")
@_train("threads")
@_train("eval_fraction")
@_train("checkpoint_every")
@_train("eval_points")
@_train("resume")
@_train("overwrite")
@_train("device")
@writable_option
@quiet_option
@handle_errors
def train_crosscoder(store: str, storage_options: tuple[str, ...], writable: bool, models: str, layers: str,
                     arch: str | None, d_sae: int | None, expansion: float | None, k: int | None, l1: float | None,
                     l1_warmup: float | None, lr: float | None, optimizer: str | None, epochs: int | None,
                     tokens: int | None, batch_size: int, name: str | None, seed: int, buffer_mb: int, threads: int | None,
                     eval_fraction: float, checkpoint_every: int, eval_points: int, resume: bool, overwrite: bool,
                     device: str, quiet: bool) -> None:  # fmt: skip
    """Train a crosscoder on several models' (or layers') activations of the same tokens, streaming (resumable).

    One dictionary, a decoder per model: --models pretrained,finetuned --layer 4 --arch batchtopk --k 32 (Minder et
    al. 2025 recommend batchtopk; relu-l1 uses the decoder-norm-weighted L1 of Lindsey et al. 2024). Then diff its
    latents with actstore diff-crosscoder, encode it with actstore encode --sae NAME.
    """
    from actstore.sae.train import train_sae

    first = models.split(",")[0].strip()
    cfg = TrainConfig(
        model=first, layer=0, models=models, layers=layers, arch=arch or "batchtopk", d_sae=d_sae, expansion=expansion,
        k=k, l1=l1, l1_warmup=l1_warmup, lr=lr, optimizer=optimizer, epochs=epochs, tokens=tokens, batch_size=batch_size,
        name=name, device=device, seed=seed, buffer_mb=buffer_mb, threads=threads, eval_fraction=eval_fraction,
        checkpoint_every=checkpoint_every, resume=resume, overwrite=overwrite, eval_points=eval_points, task_samples=0,
    )  # fmt: skip
    res = train_sae(store, cfg, progress=not quiet, storage_options=parse_storage_options(storage_options),
                    writable=write_access(store, writable))  # fmt: skip
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
@store_argument
@_ccdiff("sae", required=True)
@_ccdiff("a")
@_ccdiff("b")
@_ccdiff("only")
@_ccdiff("shared_band")
@_ccdiff("shared_cos")
@_ccdiff("nu")
@_ccdiff("rows")
@_ccdiff("batch_rows")
@_ccdiff("device")
@click.option("--top", default=10, show_default=True, help="B-only latents to list with their top tokens.")
@writable_option
@output_format_option
@handle_errors
def diff_crosscoder_cmd(store: str, storage_options: tuple[str, ...], sae: str, a: str | None, b: str | None, only: float,
                        shared_band: float, shared_cos: float, nu: float, rows: int, batch_rows: int, device: str, top: int,
                        writable: bool, fmt: str, out: str | None) -> None:  # fmt: skip
    """Classify a crosscoder's latents shared / changed / A-only / B-only from its decoder norms, with Latent Scaling
    (Minder et al. 2025) flagging the one-model latents the other model carries after all; list the top B-only ones.

    Saved beside the crosscoder (SQL view crosscoder_latents) when the store is writable.
    """
    from actstore.analysis.crosscoder import diff_crosscoder, top_latents
    from actstore.store.reader import open_store

    st = open_store(store, writable=write_access(store, writable), storage_options=parse_storage_options(storage_options))
    cfg = CrosscoderDiffConfig(sae=sae, a=a, b=b, only=only, shared_band=shared_band, shared_cos=shared_cos, nu=nu, rows=rows,
                               batch_rows=batch_rows, device=device)  # fmt: skip
    res = diff_crosscoder(st, cfg, save=st.writable)
    if out or fmt != "table":
        emit(res.table, fmt, out)
        return
    c = res.counts
    click.echo(f"{sae}: A = {res.sources[0]}, B = {res.sources[1]}, {res.n_rows} token rows")
    click.echo(", ".join(f"{k} {v}" for k, v in c.items() if not k.endswith("exclusive")))
    click.echo(f"after Latent Scaling: a-only {c['a-only exclusive']} of {c['a-only']}, b-only {c['b-only exclusive']} "
               f"of {c['b-only']} not flagged (nu >= {nu}: the other model carries them)")  # fmt: skip
    tl = top_latents(st, res, "b-only", n=top)
    if tl.height:
        click.echo(f"top B-only latents ({res.sources[1]} only):")
    elif top:
        tl = top_latents(st, res, None, n=top)
        click.echo(f"no latent is B-only; the {tl.height} leaning furthest towards {res.sources[1]} (highest relative norm):")
    if tl.height:
        emit(tl, "table", None)
        from actstore.encoding.table import encoded_saes

        if sae not in encoded_saes(st):
            click.echo(f"(top tokens: encode it first: actstore encode {store} --sae {sae})")
    if st.writable:
        click.echo(f"saved: query it with actstore sql {store} \"SELECT * FROM crosscoder_latents WHERE sae = '{sae}'\"")
    else:
        click.echo(f"not saved: {store} is opened read-only (pass --writable to save it)", err=True)


@main.command("crosscoder-stability")
@store_argument
@click.option("--sae", "saes", multiple=True, required=True, help="Two crosscoders of the same sources: --sae A --sae B.")
@click.option("--cos", default=0.7, show_default=True, help="Decoder cosine a partner latent needs.")
@handle_errors
def crosscoder_stability_cmd(store: str, storage_options: tuple[str, ...], saes: tuple[str, ...], cos: float) -> None:
    """How many one-model latents of one crosscoder have a partner of the same class in another (e.g. another --seed)."""
    from actstore.analysis.crosscoder import crosscoder_stability
    from actstore.store.reader import open_store

    if len(saes) != 2:
        raise click.UsageError(f"give exactly two crosscoders: --sae A --sae B (got {len(saes)})")
    res = crosscoder_stability(open_store(store, storage_options=parse_storage_options(storage_options)), saes[0], saes[1], cos)
    for key, (x, y) in res.counts.items():
        click.echo(f"{key}: {x} vs {y}")
    for key, frac in res.matched.items():
        click.echo(f"{key} of {saes[0]} with a {key.split()[0]} partner in {saes[1]} (cos >= {cos}): {frac:.1%}")
