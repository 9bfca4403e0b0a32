"""The ``actstore`` command line: thin wrappers over the library.

Each command parses options, calls one library function, and turns actstore's
errors into one-line ``click.ClickException`` s.
"""

from __future__ import annotations

import click

from actstore.cli.group import main
from actstore.cli.options import (
    break_lock_option,
    data_options,
    device_option,
    emit,
    handle_errors,
    output_format_option,
    parse_storage_options,
    store_argument,
    writable_option,
)
from actstore.storage.location import write_access


@main.command()
@store_argument
@click.option("--model", required=True, help="HF model id, local directory, bundled:minilm or bundled:minilm-sre.")
@data_options
@click.option("--labels", default=None, help="Keep only rows with these labels (comma-separated).")
@click.option("--layers", required=True, help="hidden_states indices: 2,4,6 or 0-6 or 'all' (0 = embeddings).")
@click.option("--name", default=None, help="Store key for the model (default: derived from the model name).")
@click.option("--max-length", type=int, default=None, help="Truncate samples to N tokens (default: min(512, model limit)).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Samples per forward pass.")
@click.option(
    "--codec", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default="fp16", show_default=True, help="Stored precision."
)
@click.option("--chunk-rows", type=int, default=4096, show_default=True, help="Token rows per Zarr chunk (new stores only).")
@click.option("--new-tokenization", is_flag=True, help="Allow a model with a different tokenizer: add a separate token index.")
@device_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
@break_lock_option
@handle_errors
def extract(store: str, storage_options: tuple[str, ...], model: str, data: str, text_field: str, label_field: str,
            id_field: str, limit: int | None, labels: str | None, layers: str, name: str | None, max_length: int | None,
            batch_size: int, codec: str, chunk_rows: int, new_tokenization: bool, device: str, quiet: bool,
            break_lock: bool) -> None:  # fmt: skip
    """Extract hidden states of MODEL at LAYERS over a corpus into STORE (resumable)."""
    from actstore.data.corpora import data_config
    from actstore.store.extract import ExtractConfig
    from actstore.store.extract import extract as run

    cfg = ExtractConfig(
        model=model, data=data_config(data, text_field, label_field, id_field, limit, labels),
        layers="all" if layers == "all" else layers, name=name, max_length=max_length, batch_size=batch_size,
        codec=codec, device=device, chunk_rows=chunk_rows, new_tokenization=new_tokenization,
    )  # fmt: skip
    res = run(store, cfg, progress=not quiet, storage_options=parse_storage_options(storage_options), break_lock=break_lock)
    rep = res.data_report
    skipped = rep.get("n_skipped_empty", 0) + rep.get("n_skipped_not_text", 0)
    click.echo(
        f"{res.store}: model {res.model_key} layers {','.join(map(str, res.layers))} — {res.n_samples} samples, "
        f"{res.n_tokens} tokens ({res.n_truncated} samples truncated, {skipped} rows skipped); "
        f"wrote {res.rows_written} rows in {res.seconds:.1f}s ({res.tokens_per_s:,.0f} tok/s)"
        + (f", resumed at row {res.resumed_from}" if res.rows_written and res.resumed_from else "")
    )


# ---- issue 5: the paper end to end (finetune, compare, show, diff-features, report, demo) ----
@main.command()
@click.option("--model", required=True, help="HF model id, local directory or bundled:minilm.")
@data_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output Hugging Face model directory.")
@click.option("--epochs", type=int, default=10, show_default=True, help="Training epochs (the paper: 10).")
@click.option("--lr", type=float, default=2e-5, show_default=True, help="Adam learning rate (the paper: 2e-5).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Samples per step.")
@click.option("--max-length", type=int, default=128, show_default=True, help="Truncate texts to N tokens.")
@click.option("--labels", default=None, help="Keep only these labels (comma-separated).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for split, shuffles and head.")
@click.option("--keep-checkpoint", is_flag=True, help="Keep checkpoint/ (last epoch + Adam state) after training.")
@click.option("--ignore-split", is_flag=True, help="Ignore the data's own split field: split 80/10/10 at random.")
@device_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
@handle_errors
def finetune(model: str, data: str, text_field: str, label_field: str, id_field: str, limit: int | None, out: str,
             epochs: int, lr: float, batch_size: int, max_length: int, labels: str | None, seed: int,
             keep_checkpoint: bool, ignore_split: bool, device: str, quiet: bool) -> None:  # fmt: skip
    """Fine-tune MODEL with a classification head on a labelled corpus (resumable per epoch)."""
    from actstore.data.corpora import data_config
    from actstore.models.finetune import FinetuneConfig, report_text
    from actstore.models.finetune import finetune as run

    cfg = FinetuneConfig(
        model=model, data=data_config(data, text_field, label_field, id_field, limit), out=out, epochs=epochs, lr=lr,
        batch_size=batch_size, max_length=max_length, seed=seed, device=device, keep_checkpoint=keep_checkpoint,
        ignore_split=ignore_split,
        labels=[x.strip() for x in labels.split(",") if x.strip()] if labels is not None else None,
    )  # fmt: skip
    res = run(cfg, progress=not quiet)
    if res.skipped:
        click.echo(f"{res.out} already holds a finished fine-tune of these options: nothing trained (another --out to redo)")
    click.echo(report_text(res))
    click.echo(f"\nsaved the best checkpoint (epoch {res.best_epoch}) to {res.out}; reports in report.json / report.txt")


@main.command()
@store_argument
@click.option("--sae", required=True, help="Name of the SAE under STORE/saes/ (it names its model and layer).")
@click.option("--batch-rows", type=int, default=8192, show_default=True, help="Token rows per SAE forward pass.")
@click.option("--buckets", "n_buckets", type=int, default=16, show_default=True, help="Feature-range files (more = less memory).")
@click.option("--row-group-rows", type=int, default=16384, show_default=True, help="Rows per Parquet row group.")
@click.option("--spill-entries", type=int, default=16_000_000, show_default=True,
              help="Activations held in memory (16 bytes each) before spilling to disk.")  # fmt: skip
@click.option("--workers", type=int, default=2, show_default=True, help="Threads sorting and writing beside the SAE.")
@click.option("--overwrite", is_flag=True, help="Re-encode from scratch even if an encoding exists.")
@device_option
@writable_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def encode(store: str, storage_options: tuple[str, ...], writable: bool, sae: str, batch_rows: int, n_buckets: int,
           row_group_rows: int, spill_entries: int, workers: int, overwrite: bool, device: str, quiet: bool) -> None:  # fmt: skip
    """Run SAE over every token row of its layer into STORE/features/SAE/ (Parquet, resumable)."""
    from actstore.encoding.encode import EncodeConfig
    from actstore.encoding.encode import encode as run
    from actstore.store.reader import open_store

    st = open_store(store, writable=write_access(store, writable), storage_options=parse_storage_options(storage_options))
    cfg = EncodeConfig(sae=sae, batch_rows=batch_rows, n_buckets=n_buckets, row_group_rows=row_group_rows,
                       spill_entries=spill_entries, workers=workers, device=device, overwrite=overwrite)  # fmt: skip
    res = run(st, cfg, progress=not quiet)
    if res.skipped:
        click.echo(f"{res.store}: SAE {res.sae} is already encoded ({res.n_feature_rows} feature rows); --overwrite to redo")
        return
    click.echo(
        f"{res.store}: SAE {res.sae} ({res.model} layer {res.layer}) — {res.n_rows} token rows, {res.n_feature_rows} "
        f"feature rows ({res.n_feature_rows / max(res.n_rows, 1):.1f} per token, {res.n_bytes / max(res.n_feature_rows, 1):.2f} "
        f"bytes each) in {res.seconds:.1f}s ({res.rows_per_s:,.0f} tok/s)"
        + (f", resumed at row {res.resumed_from}" if res.resumed_from else "")
    )


# ---- sharing: copy, verify (issue 6) ---------------------------------------
@main.command()
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@click.option(
    "--include",
    multiple=True,
    metavar="WHAT",
    help="Copy only this model (MODEL), layer (MODEL:LAYER), SAE (sae:NAME) or key glob; repeatable.",
)
@click.option("--jobs", type=int, default=8, show_default=True, help="Objects copied in parallel.")
@click.option("--src-option", "src_options", multiple=True, metavar="KEY=VALUE", help="fsspec storage option for SRC.")
@click.option("--dst-option", "dst_options", multiple=True, metavar="KEY=VALUE", help="fsspec storage option for DST.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def copy(src: str, dst: str, include: tuple[str, ...], jobs: int, src_options: tuple[str, ...], dst_options: tuple[str, ...],
         quiet: bool) -> None:  # fmt: skip
    """Copy store SRC to DST (paths or URLs), checking every object; rerun to resume."""
    from actstore.storage.copy import CopyConfig, copy_store

    cfg = CopyConfig(src, dst, list(include), jobs, parse_storage_options(src_options), parse_storage_options(dst_options))
    res = copy_store(cfg, progress=not quiet)
    for p in res.problems:
        click.echo(f"{p.kind}: {p.key}: {p.detail}", err=True)
    click.echo(
        f"{res.src} -> {res.dst}: {res.n_objects} objects, {res.n_copied} copied ({res.bytes_copied / 2**20:.1f} MiB), "
        f"{res.n_skipped} already there, in {res.seconds:.1f}s" + ("" if res.ok else f"; {len(res.problems)} FAILED")
    )
    if not res.ok:
        raise click.ClickException(f"{len(res.problems)} objects failed their checks: fix the source, then rerun the copy")


@main.command("diff-features")
@store_argument
@click.option("--sae", "saes", multiple=True, required=True, help="Two SAEs: --sae A --sae B (e.g. pretrained, fine-tuned).")
@click.option("--rows", type=int, default=50_000, show_default=True, help="Rows sampled for activation correlation (0: all).")
@click.option("--retain", type=float, default=0.7, show_default=True, help="Both scores at least this: retained.")
@click.option("--match", type=float, default=0.4, show_default=True, help="Either score at least this: modified (else lost/new).")
@click.option("--no-activation-corr", is_flag=True, help="Match by decoder cosine only.")
@click.option("--name", default=None, help="Save as STORE/diffs/NAME (default: A__B).")
@writable_option
@output_format_option
@handle_errors
def diff_features(store: str, storage_options: tuple[str, ...], saes: tuple[str, ...], rows: int, retain: float, match: float,
                  no_activation_corr: bool, name: str | None, writable: bool, fmt: str, out: str | None) -> None:  # fmt: skip
    """Match the features of two SAEs by decoder cosine and activation correlation: retained / modified / lost / new.

    Counts mean something only against a baseline: diff two SAEs trained on the same activations with
    different --seed values too (docs/REPRODUCTION.md shows such a seed control).
    """
    from actstore.analysis.diff import DiffConfig
    from actstore.analysis.diff import diff_features as run
    from actstore.store.reader import open_store

    if len(saes) != 2:
        raise click.UsageError(f"give exactly two SAEs: --sae A --sae B (got {len(saes)})")
    st = open_store(store, writable=write_access(store, writable), storage_options=parse_storage_options(storage_options))
    cfg = DiffConfig(saes[0], saes[1], rows=rows, retain=retain, match=match, activation_corr=not no_activation_corr, name=name)
    res = run(st, cfg, save=st.writable)
    if out or fmt != "table":
        emit(res.table, fmt, out)
    for side, sae in (("a", saes[0]), ("b", saes[1])):
        click.echo(f"{sae}: " + ", ".join(f"{k} {v}" for k, v in res.counts[side].items()), err=bool(out) or fmt != "table")
    if not st.writable:
        click.echo(f"not saved: {store} is opened read-only (pass --writable to save it as diffs/{res.name})", err=True)
        return
    click.echo(
        f"saved as diffs/{res.name} ({res.n_rows} token rows); query it with: actstore sql {store} "
        f"\"SELECT * FROM feature_diff WHERE diff = '{res.name}' AND status <> 'retained'\"",
        err=bool(out) or fmt != "table",
    )


@main.command()
@store_argument
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (index.html, summary.md, PNGs).")
@click.option("--models", default=None, help="The two models A,B to compare (default: the store's two models).")
@click.option("--top-features", type=int, default=5, show_default=True, help="Top features by variance per SAE.")
@click.option("--top-tokens", type=int, default=8, show_default=True, help="Top tokens per feature.")
@click.option("--views", type=int, default=2, show_default=True, help="Token views per SAE (its best feature's top samples).")
@click.option("--writable", is_flag=True, help="Save computed feature diffs into a store given by URL (local stores: always).")
@handle_errors
def report(store: str, storage_options: tuple[str, ...], out: str, models: str | None, top_features: int, top_tokens: int,
           views: int, writable: bool) -> None:  # fmt: skip
    """Write an HTML report of STORE: fine-tune reports, similarity, SAE metrics, top features, token views, feature diff."""
    from actstore.analysis.report import ReportConfig
    from actstore.analysis.report import report as run

    cfg = ReportConfig(
        out=out, models=tuple(m.strip() for m in models.split(",")) if models else None,  # type: ignore[arg-type]
        top_features=top_features, top_tokens=top_tokens, views=views,
    )  # fmt: skip
    res = run(store, cfg, parse_storage_options(storage_options), writable=write_access(store, writable))
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {res.html} ({', '.join(res.sections) or 'no sections'}) and {res.markdown}")


@main.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--limit", type=int, default=400, show_default=True, help="BBC News samples used (80/10/10 split).")
@click.option("--max-length", type=int, default=64, show_default=True, help="Tokens per sample.")
@click.option("--epochs", type=int, default=2, show_default=True, help="Fine-tuning epochs (the paper: 10).")
@click.option("--sae-epochs", type=int, default=3, show_default=True, help="SAE epochs (the paper: 10).")
@click.option("--model", default="bundled:minilm", show_default=True, help="Model to fine-tune.")
@click.option("--data", default="bundled:bbc", show_default=True, help="Labelled corpus.")
@device_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
@handle_errors
def demo(out: str, limit: int, max_length: int, epochs: int, sae_epochs: int, model: str, data: str, device: str,
         quiet: bool) -> None:  # fmt: skip
    """Run the paper end to end on bundled MiniLM + BBC News: fine-tune, extract, SAEs, encode, compare, report."""
    from actstore.analysis.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=out, limit=limit, max_length=max_length, epochs=epochs, sae_epochs=sae_epochs, model=model, data=data,
                     device=device)  # fmt: skip
    res = run_demo(cfg, progress=not quiet, log=click.echo)
    times = ", ".join(f"{k} {v:.0f}s" for k, v in res.seconds.items())
    click.echo(f"\ndone ({times}).\nfine-tuned test accuracy {res.accuracy['finetuned']:.3f} "
               f"(pretrained encoder + fresh head {res.accuracy['pretrained']:.3f})")  # fmt: skip
    click.echo(f"report: {res.report_html}\nstore:  {res.store} (try: actstore info {res.store})")


# ---- issue 3: SAE training ---------------------------------------------------
@main.command()
@store_argument
@click.option("--model", required=True, help="Store key of the model (see actstore info).")
@click.option("--layer", type=int, required=True, help="Layer (hidden_states index) to train on.")
@click.option("--arch", type=click.Choice(["relu-l1", "topk", "batchtopk"]), default=None, help="[default: relu-l1]")
@click.option("--d-sae", type=int, default=None, help="Number of features.")
@click.option("--expansion", type=float, default=None, help="d_sae as a multiple of d_model [default: 4].")
@click.option("--k", type=int, default=None, help="Active features per token (topk, batchtopk) [default: 32].")
@click.option("--l1", type=float, default=None, help="L1 coefficient (relu-l1) [default: 1e-3].")
@click.option("--lr", type=float, default=None, help="Adam learning rate [default: 5e-4; paper preset 2e-5].")
@click.option("--epochs", type=int, default=None, help="Passes over the training rows [default: 3].")
@click.option("--tokens", type=int, default=None, help="Train on N tokens instead of whole epochs.")
@click.option("--batch-size", type=int, default=1024, show_default=True, help="Tokens per step.")
@click.option("--preset", type=click.Choice(["paper"]), default=None,
              help="paper: relu-l1, d_sae 1024, l1 1e-3, lr 2e-5, 10 epochs (explicit options win).")  # fmt: skip
@click.option("--name", default=None, help="Name under STORE/saes/ [default: MODEL-lLAYER-ARCH-D_SAE].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for init, held-out split and shuffling.")
@click.option("--no-normalize", is_flag=True, help="Do not scale inputs to mean squared norm d_model.")
@click.option("--buffer-mb", type=int, default=256, show_default=True, help="Shuffle buffer size (MiB).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 beside other jobs).")
@click.option("--eval-fraction", type=float, default=0.05, show_default=True, help="Tokens held out, as whole samples.")
@click.option("--checkpoint-every", type=int, default=500, show_default=True, help="Steps between checkpoints.")
@click.option("--resume", is_flag=True, help="Require an unfinished run of NAME to continue (it is continued anyway).")
@click.option("--overwrite", is_flag=True, help="Replace an existing SAE (or unfinished run) of the same name.")
@device_option
@writable_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@handle_errors
def train(store: str, storage_options: tuple[str, ...], writable: bool, model: str, layer: int, arch: str | None,
          d_sae: int | None, expansion: float | None, k: int | None, l1: float | None, lr: float | None,
          epochs: int | None, tokens: int | None, batch_size: int, preset: str | None, name: str | None, seed: int,
          no_normalize: bool, buffer_mb: int, threads: int | None, eval_fraction: float, checkpoint_every: int, resume: bool,
          overwrite: bool, device: str, quiet: bool) -> None:  # fmt: skip
    """Train a sparse autoencoder on one layer of STORE, streaming from its chunks (resumable)."""
    from actstore.sae.train import TrainConfig, train_sae

    cfg = TrainConfig(
        model=model, layer=layer, arch=arch, d_sae=d_sae, expansion=expansion, k=k, l1=l1, lr=lr, epochs=epochs, tokens=tokens,
        batch_size=batch_size, preset=preset, name=name, device=device, seed=seed, normalize=not no_normalize,
        buffer_mb=buffer_mb, threads=threads, eval_fraction=eval_fraction, checkpoint_every=checkpoint_every, resume=resume,
        overwrite=overwrite,
    )  # fmt: skip
    res = train_sae(store, cfg, progress=not quiet, storage_options=parse_storage_options(storage_options),
                    writable=write_access(store, writable))  # fmt: skip
    ev, c = res.metrics.get("eval") or {}, res.sae.cfg
    size = f"k {c.k}" if c.k else f"l1 {c.l1:g}"
    click.echo(
        f"{res.store}: SAE {res.name} ({c.arch}, {c.d_in}->{c.d_sae}, {size}) on {c.model} layer {c.layer}: "
        f"{res.steps} steps, {res.tokens} tokens, {res.steps_per_s:.1f} steps/s"
        + (f", resumed at step {res.resumed_from}" if res.resumed_from else "")
        + f"; held-out ({res.metrics['n_eval_rows']} tokens): FVU {ev.get('fvu', float('nan')):.4f}, "
        f"MSE {ev.get('mse', float('nan')):.4g}, L0 {ev.get('l0', float('nan')):.1f}, "
        f"dead {res.metrics['train'].get('dead_fraction', float('nan')):.3f}"
    )


@main.command("export-sae")
@store_argument
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["saelens", "actstore"]), default="saelens", show_default=True,
              help="saelens: cfg.json + sae_weights.safetensors (raw-activation space); actstore: the stored files.")  # fmt: skip
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@handle_errors
def export_sae_cmd(store: str, storage_options: tuple[str, ...], name: str, fmt: str, out: str) -> None:
    """Export SAE NAME of STORE for other tools (SAELens format by default)."""
    from actstore.sae.export import export_sae
    from actstore.store.reader import open_store

    files = export_sae(open_store(store, storage_options=parse_storage_options(storage_options)), name, out, fmt)
    click.echo(f"wrote {', '.join(str(f) for f in files)}")
