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

from . import __version__
from .errors import ActstoreError


def handle_errors(fn: Callable) -> Callable:
    """Turn ActstoreError (and a few user-facing built-ins) into a clean CLI error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ActstoreError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def parse_storage_options(values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not key=value", param_hint="--storage-option")
        out[key] = {"true": True, "false": False}.get(val.lower(), val)
    return out


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
@handle_errors
def extract(store: str, storage_options: tuple[str, ...], model: str, data: str, text_field: str, label_field: str, id_field: str,
            limit: int | None, layers: str, name: str | None, max_length: int | None, batch_size: int, codec: str,
            chunk_rows: int, new_tokenization: bool, device: str, quiet: bool) -> None:  # fmt: skip
    """Extract hidden states of MODEL at LAYERS over a corpus into STORE (resumable)."""
    from .data import DataConfig
    from .extract import ExtractConfig
    from .extract import extract as run

    cfg = ExtractConfig(
        model=model, data=DataConfig(data, text_field, label_field, id_field, limit),
        layers="all" if layers == "all" else layers, name=name, max_length=max_length, batch_size=batch_size,
        codec=codec, device=device, chunk_rows=chunk_rows, new_tokenization=new_tokenization,
    )  # fmt: skip
    res = run(store, cfg, progress=not quiet, storage_options=parse_storage_options(storage_options))
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
    from .store import dumps, open_store

    st = open_store(store, storage_options=parse_storage_options(storage_options))
    d = st.info()
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

    from .store import open_store

    st = open_store(store, storage_options=parse_storage_options(storage_options))
    try:
        df = st.sql(query)
    except duckdb.Error as exc:
        raise click.ClickException(f"SQL error: {str(exc).splitlines()[0]}") from None
    emit(df, fmt, out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
