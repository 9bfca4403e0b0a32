"""The ``actstore`` command line: thin wrappers over the library.

Each command parses options, calls one library function, and turns actstore's
errors into one-line ``click.ClickException`` s.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from .errors import ActstoreError
from .location import write_access
from .version import __version__


def handle_errors(fn: Callable) -> Callable:
    """Turn ActstoreError (and a few user-facing built-ins) into a clean CLI error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ActstoreError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # the disk or the network, not a bug: one line that says what to do
            raise click.ClickException(os_error_message(exc)) from None

    return wrapper


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system error (disk full, permission denied, ...) and what to do about it."""
    import errno

    where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full{where} ({what}): free some space and rerun the same command; it resumes where it stopped"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not allowed{where} ({what}): choose a path you can write, or fix its permissions"
    return f"{what}{where.replace(' writing', ' at')}: check the path or connection and rerun"


def key_values(values: tuple[str, ...], param_hint: str, form: str = "key=value") -> list[tuple[str, str]]:
    """``("a=1", "b=x")`` -> ``[("a", "1"), ("b", "x")]``; anything without ``=`` or a key is refused."""
    out = []
    for item in values:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not {form}", param_hint=param_hint)
        out.append((key, val))
    return out


def parse_storage_options(values: tuple[str, ...]) -> dict[str, Any]:
    return {k: {"true": True, "false": False}.get(v.lower(), v) for k, v in key_values(values, "--storage-option")}


# ---- shared option decorators ------------------------------------------------
def store_argument(fn: Callable) -> Callable:
    fn = click.argument("store", metavar="STORE")(fn)
    return click.option(
        "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
        help="Option for a remote store's filesystem (fsspec), e.g. endpoint_url=http://127.0.0.1:9000.",
    )(fn)  # fmt: skip


def data_options(fn: Callable) -> Callable:
    for opt in reversed(
        [
            click.option(
                "--data", "data", required=True, help="Corpus: .jsonl[.gz], .csv[.gz], .parquet, bundled:bbc, or hf:NAME."
            ),
            click.option("--text-field", default="text", show_default=True, help="Field holding the text."),
            click.option("--label-field", default="label", show_default=True, help="Field holding the label."),
            click.option("--id-field", default="id", show_default=True, help="Field holding the row id."),
            click.option("--limit", type=int, default=None, help="Use only the first N usable rows."),
        ]
    ):
        fn = opt(fn)
    return fn


def output_format_option(fn: Callable) -> Callable:
    fn = click.option(
        "--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table", show_default=True,
        help="Output format.",
    )(fn)  # fmt: skip
    return click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the result to this file.")(fn)


def device_option(fn: Callable) -> Callable:
    return click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")(fn)


def writable_option(fn: Callable) -> Callable:
    """``--writable``: open a URL store for writing (URLs are read-only otherwise)."""
    return click.option("--writable", is_flag=True, help="Allow writing to a store given by URL (read-only otherwise).")(fn)


def break_lock_option(fn: Callable) -> Callable:
    return click.option(
        "--break-lock", is_flag=True,
        help="Take over write locks left by a writer that died on another host (same-host dead writers are detected).",
    )(fn)  # fmt: skip


def emit(df: Any, fmt: str, out: str | None) -> None:
    """Print or save a polars DataFrame in the chosen format."""
    import polars as pl

    if fmt == "parquet":
        if not out:
            raise click.UsageError("--format parquet needs --out FILE")
        df.write_parquet(out)
        click.echo(f"wrote {df.height} rows to {out}", err=True)
        return
    if fmt == "csv":
        text = df.write_csv()
    elif fmt == "json":
        text = json.dumps(df.to_dicts(), indent=2, default=str) + "\n"
    else:
        with pl.Config(tbl_rows=max(df.height, 1), tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
            text = str(df) + "\n"
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
        click.echo(f"wrote {df.height} rows to {out}", err=True)
    else:
        click.echo(text, nl=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="actstore")
def main() -> None:
    """actstore: store transformer activations in Zarr, train SAEs on them, query features with SQL."""


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
    from .data import data_config
    from .extract import ExtractConfig
    from .extract import extract as run

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


@main.command()
@store_argument
@click.option("--json", "as_json", is_flag=True, help="Print the full description as JSON.")
@handle_errors
def info(store: str, storage_options: tuple[str, ...], as_json: bool) -> None:
    """Describe STORE: corpus, tokenizations, models, layers, codecs, SAEs."""
    from .share import store_info
    from .store import dumps, open_store

    st = open_store(store, storage_options=parse_storage_options(storage_options))
    d = store_info(st)
    if as_json:
        click.echo(dumps(d))
        return
    click.echo(f"store {d['url']} (format {d['store'].get('format')}, created {d['store'].get('created')})")
    for key, t in d["tokenizations"].items():
        data = t.get("data", {})
        click.echo(
            f"  tokenization {key}: {t.get('n_samples')} samples, {t.get('n_tokens')} tokens, max length {t.get('max_length')}, "
            f"{t.get('n_truncated')} truncated; data {data.get('source')}" + ("" if t.get("complete") else " [INCOMPLETE]")
        )
    for m, info_ in d["models"].items():
        click.echo(f"  model {m}: {info_.get('source')} ({info_.get('architecture')}, d_model {info_.get('d_model')}, "
                   f"{info_.get('n_layers')} layers, weights {str(info_.get('weights_sha256'))[:12]})")  # fmt: skip
        for layer, la in info_["layers"].items():
            state = "complete" if la.get("complete") else f"{la.get('committed_rows')}/{la.get('n_rows')} rows committed"
            click.echo(f"    layer {layer}: {la.get('codec')}, {state}")
    for extra, lines in d.get("extra", {}).items():
        click.echo(f"  {extra}:")
        for line in lines:
            click.echo(f"    {line}")


@main.command()
@store_argument
@click.argument("query")
@output_format_option
@handle_errors
def sql(store: str, storage_options: tuple[str, ...], query: str, fmt: str, out: str | None) -> None:
    """Run SQL QUERY over STORE's views (tokens, samples, features, ...)."""
    import duckdb

    from .query import sql as run_sql
    from .store import open_store

    st = open_store(store, storage_options=parse_storage_options(storage_options))
    try:
        df = run_sql(st, query)
    except duckdb.Error as exc:
        raise click.ClickException(f"SQL error: {str(exc).splitlines()[0]}") from None
    emit(df, fmt, out)


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
    from .data import data_config
    from .finetune import FinetuneConfig, report_text
    from .finetune import finetune as run

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
@click.argument("stores", nargs=-1, required=True, metavar="STORE...")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE", help="fsspec option for remote stores.")
@click.option("--models", default=None, help="Two model keys A,B (default: the store's two models).")
@click.option("--layers", default=None, help="Layers: 2,4,6 or 0-6 (default: all shared).")
@click.option("--metric", "metrics", default="mean-cosine,token-cosine,cka", show_default=True,
              help="Comma-separated: mean-cosine, token-cosine, cka.")  # fmt: skip
@click.option("--label", "labels", multiple=True, help="Legend label per STORE (default: the store's folder name).")
@click.option("--cka-rows", type=int, default=100_000, show_default=True, help="CKA on a sample of about N rows (0: all).")
@click.option("--plot", default=None, type=click.Path(dir_okay=False), help="Write a similarity-vs-layer PNG here.")
@output_format_option
@handle_errors
def compare(stores: tuple[str, ...], storage_options: tuple[str, ...], models: str | None, layers: str | None, metrics: str,
            labels: tuple[str, ...], cka_rows: int, plot: str | None, fmt: str, out: str | None) -> None:  # fmt: skip
    """Layer-wise similarity of two row-aligned models (the paper's Fig 1); several STOREs give several lines."""
    from .compare import CompareConfig, compare_stores, plot_similarity
    from .extract import parse_layers

    if labels and len(labels) != len(stores):
        raise click.UsageError(f"give one --label per store ({len(stores)}), or none")
    cfg = CompareConfig(
        models=tuple(x.strip() for x in models.split(",")) if models else None,  # type: ignore[arg-type]
        layers=parse_layers(layers) if layers else None, metrics=[m.strip() for m in metrics.split(",") if m.strip()],
        cka_rows=cka_rows,
    )  # fmt: skip
    from .compare import wide

    table = compare_stores(list(stores), cfg, list(labels) or None, parse_storage_options(storage_options))
    emit(wide(table), fmt, out)
    if plot:
        click.echo(f"wrote {plot_similarity(table, plot)}", err=True)


# ---- encode / query (issue 4) --------------------------------------------------
def _parse_params(values: tuple[str, ...]) -> dict[str, str]:
    return {k.strip(): v for k, v in key_values(values, "--param", "name=value")}


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
    from .encode import EncodeConfig
    from .encode import encode as run
    from .store import open_store

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


@main.command()
@click.argument("store", metavar="STORE", required=False)
@click.argument("name", metavar="NAME", required=False)
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Query parameter (repeat), e.g. feature=412.")
@click.option("--list", "list_", is_flag=True, help="List the named queries and their parameters.")
@click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE", help="Option for a remote store's filesystem."
)
@output_format_option
@handle_errors
def query(store: str | None, name: str | None, params: tuple[str, ...], list_: bool, storage_options: tuple[str, ...], fmt: str,
          out: str | None) -> None:  # fmt: skip
    """Run the named query NAME over STORE (see --list); parameters are bound, never pasted into SQL."""
    from . import query as q
    from .store import open_store

    if list_:
        for nq in q.list_queries():
            click.echo(f"{nq.name}: {nq.description}")
            for p in nq.params:
                default = "required" if p.required else f"default {p.default}"
                click.echo(f"    {p.name} ({p.type}, {default}): {p.help}")
        click.echo("Every query with a sae parameter also takes layer=L and model=KEY to pick the layer's only SAE.")
        return
    if not store or not name:
        raise click.UsageError("give STORE and NAME (actstore query --list shows the names)")
    st = open_store(store, storage_options=parse_storage_options(storage_options))
    emit(q.run_query(st, name, _parse_params(params)), fmt, out)


def _sae_options(fn: Callable) -> Callable:
    fn = click.option("--sae", default=None, help="SAE name (needed when the layer has several).")(fn)
    fn = click.option("--model", default=None, help="Model key in the store (needed when several models have the layer).")(fn)
    return click.option("--layer", type=int, default=None, help="Layer of the SAE (hidden_states index).")(fn)


@main.command("top-tokens")
@store_argument
@_sae_options
@click.option("--feature", type=int, required=True, help="Feature index.")
@click.option("-n", "n", type=int, default=20, show_default=True, help="Rows to show.")
@click.option("--context", type=int, default=8, show_default=True, help="Tokens shown on each side.")
@output_format_option
@handle_errors
def top_tokens_cmd(store: str, storage_options: tuple[str, ...], layer: int | None, model: str | None, sae: str | None,
                   feature: int, n: int, context: int, fmt: str, out: str | None) -> None:  # fmt: skip
    """The tokens where FEATURE fires most, with sample id, label and context (token in [[ ]])."""
    from .query import top_tokens
    from .store import open_store

    st = open_store(store, storage_options=parse_storage_options(storage_options))
    df = top_tokens(st, feature, layer=layer, model=model, sae=sae, n=n, context=context)
    if fmt == "table":
        df = df.select("rank", "value", "token", "id", "label", "context")
    emit(df, fmt, out)


@main.command("top-features")
@store_argument
@_sae_options
@click.option(
    "--by", type=click.Choice(["variance", "frequency", "label-association"]), default="variance", show_default=True,
    help="Rank by activation variance over all tokens (the paper's choice), firing frequency, or label association.",
)  # fmt: skip
@click.option("--label", default=None, help="With --by label-association: only this label (default: every label).")
@click.option("-n", "n", type=int, default=10, show_default=True, help="Features to show (per label for label-association).")
@output_format_option
@handle_errors
def top_features_cmd(store: str, storage_options: tuple[str, ...], layer: int | None, model: str | None, sae: str | None, by: str,
                     label: str | None, n: int, fmt: str, out: str | None) -> None:  # fmt: skip
    """Features ranked by variance, frequency, or association with a label."""
    from .query import top_features
    from .store import open_store

    st = open_store(store, storage_options=parse_storage_options(storage_options))
    emit(top_features(st, layer=layer, model=model, sae=sae, by=by, n=n, label=label), fmt, out)


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
    from .share import CopyConfig, copy_store

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


@main.command()
@store_argument
@click.option("--update-manifest", is_flag=True, help="First record SHA-256 of files the manifest does not list yet.")
@click.option("--writable", is_flag=True, help="Needed with --update-manifest on a URL store.")
@click.option("--jobs", type=int, default=8, show_default=True, help="Objects checked in parallel.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def verify(store: str, storage_options: tuple[str, ...], update_manifest: bool, writable: bool, jobs: int, as_json: bool) -> None:
    """Check every chunk (crc32c) and file (manifest SHA-256) of STORE; list each bad object."""
    from .integrity import update_manifest as update
    from .integrity import verify as run
    from .location import open_location
    from .store import dumps

    loc = open_location(store, parse_storage_options(storage_options), writable=update_manifest and write_access(store, writable))
    if update_manifest:
        n = len(update(loc)["files"])
        click.echo(f"manifest.json lists {n} files", err=True)
    rep = run(loc, jobs=jobs)
    if as_json:
        click.echo(dumps(rep.to_dict()))
    else:
        for p in rep.problems:
            click.echo(f"{p.kind}: {p.key}: {p.detail}")
        state = "ok" if rep.ok else "FAILED"
        click.echo(
            f"{rep.store}: {state} — {rep.n_chunks} chunks and {rep.n_files} files checked ({rep.n_bytes / 2**20:.1f} MiB), "
            + ", ".join(f"{sum(p.kind == k for p in rep.problems)} {k}" for k in ("corrupted", "missing", "unlisted"))
            + ("" if rep.manifest else "; no manifest.json")
        )
    if not rep.ok:
        raise SystemExit(1)


@main.command()
@store_argument
@click.option("--sae", "saes", multiple=True, required=True, help="SAE name; repeat to pair one SAE with each model.")
@click.option("--feature", "features", type=int, multiple=True, required=True, help="Feature index; repeat to give one per SAE.")
@click.option("--text", "texts", multiple=True, help="A sentence to run through the models live (repeatable).")
@click.option("--probes", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File of sentences to run live, one per line (# comments), e.g. data/probes.txt.")  # fmt: skip
@click.option("--sample-id", "sample_ids", multiple=True, help="Id of a stored sample (repeatable).")
@click.option("--models", default=None, help="Model keys side by side, e.g. minilm,minilm-ft (default: each SAE's own model).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="FILE.html or FILE.png.")
@click.option("--max-tokens", type=int, default=None, help="Show at most N tokens per sentence.")
@device_option
@handle_errors
def show(store: str, storage_options: tuple[str, ...], saes: tuple[str, ...], features: tuple[int, ...],
         texts: tuple[str, ...], probes: str | None, sample_ids: tuple[str, ...], models: str | None, out: str,
         max_tokens: int | None, device: str) -> None:  # fmt: skip
    """Colour each token by an SAE feature's activation, models side by side (the paper's Figs 3-5)."""
    from .models import auto_device
    from .show import ShowConfig, show_summary
    from .show import show as run
    from .store import open_store

    st = open_store(store, storage_options=parse_storage_options(storage_options))
    if probes:
        with open(probes, encoding="utf-8") as f:
            texts += tuple(line.strip() for line in f if line.strip() and not line.lstrip().startswith("#"))
    cfg = ShowConfig(
        saes=list(saes), features=list(features), texts=list(texts), sample_ids=list(sample_ids),
        models=[m.strip() for m in models.split(",") if m.strip()] if models else None, device=auto_device(device),
        max_tokens=max_tokens,
    )  # fmt: skip
    tv = run(st, cfg, out)
    for r in show_summary(tv):
        label = r["sentence"] if len(r["sentence"]) <= 50 else r["sentence"][:47] + "..."
        click.echo(f"{label!r} · {r['model']} · {r['sae']}[{r['feature']}]: max {r['max']:.4f} at {r['at']!r}")
    click.echo(f"wrote {out}")


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
    from .diff import DiffConfig
    from .diff import diff_features as run
    from .store import open_store

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
    from .report import ReportConfig
    from .report import report as run

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
    from .demo import DemoConfig, run_demo

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
    from .train import TrainConfig, train_sae

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


@main.command()
@store_argument
@output_format_option
@handle_errors
def saes(store: str, storage_options: tuple[str, ...], fmt: str, out: str | None) -> None:
    """List the SAEs in STORE with their held-out metrics (FVU, MSE, L0, dead and dense fractions)."""
    from .sae import dense_notes, list_saes
    from .store import open_store

    df = list_saes(open_store(store, storage_options=parse_storage_options(storage_options)))
    emit(df, fmt, out)
    for note in dense_notes(df):
        click.echo(f"note: {note}", err=True)


@main.command("export-sae")
@store_argument
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["saelens", "actstore"]), default="saelens", show_default=True,
              help="saelens: cfg.json + sae_weights.safetensors (raw-activation space); actstore: the stored files.")  # fmt: skip
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@handle_errors
def export_sae_cmd(store: str, storage_options: tuple[str, ...], name: str, fmt: str, out: str) -> None:
    """Export SAE NAME of STORE for other tools (SAELens format by default)."""
    from .sae import export_sae
    from .store import open_store

    files = export_sae(open_store(store, storage_options=parse_storage_options(storage_options)), name, out, fmt)
    click.echo(f"wrote {', '.join(str(f) for f in files)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
