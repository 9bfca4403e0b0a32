"""Commands that read a store: info, sql, query, top-tokens, top-features, saes, verify, show, compare."""

from __future__ import annotations

import click

from actstore.analysis.config import METRICS, CompareConfig, ShowConfig
from actstore.cli.command import config_option
from actstore.cli.group import main
from actstore.cli.options import (
    device_option,
    emit,
    emit_text,
    handle_errors,
    output_format_option,
    parse_storage_options,
    storage_option,
    store_argument,
)
from actstore.cli.options import parse_params as parse_params
from actstore.cli.options import sae_options as sae_options
from actstore.query.config import CONTEXT_TOKENS, RANK_BY, TOP_FEATURES_N, TOP_TOKENS_N
from actstore.storage.urls import write_access


@main.command()
@store_argument
@click.option("--json", "as_json", is_flag=True, help="Print the full description as JSON.")
@handle_errors
def info(store: str, storage_options: tuple[str, ...], as_json: bool) -> None:
    """Describe STORE: corpus, tokenizations, models, layers, codecs, SAEs."""
    from actstore.query.info import store_info
    from actstore.store.reader import dumps, open_store

    st = open_store(store, storage_options=parse_storage_options(storage_options))
    d = store_info(st)
    if as_json:
        emit_text(dumps(d) + "\n")
        return
    lines: list[str] = []
    lines.append(
        f"store {d['url']} (format {d['store'].get('format')}, created {d['store'].get('created')})"
    )
    for key, t in d["tokenizations"].items():
        data = t.get("data", {})
        lines.append(
            f"  tokenization {key}: {t.get('n_samples')} samples, {t.get('n_tokens')} tokens, max length {t.get('max_length')}, "
            f"{t.get('n_truncated')} truncated; data {data.get('source')}"
            + ("" if t.get("complete") else " [INCOMPLETE]")
        )
    for m, info_ in d["models"].items():
        lines.append(
            f"  model {m}: {info_.get('source')} ({info_.get('architecture')}, d_model {info_.get('d_model')}, "
            f"{info_.get('n_layers')} layers, weights {str(info_.get('weights_sha256'))[:12]})"
            + (f"; site {info_['site']} of each block" if info_.get("site") else "")
        )
        for layer, la in info_["layers"].items():
            lines.append(f"    layer {layer}: {la.get('codec')}, {la.get('state')}")
    for extra, extra_lines in d.get("extra", {}).items():
        lines.append(f"  {extra}:")
        lines.extend(f"    {line}" for line in extra_lines)
    emit_text("\n".join(lines) + "\n")


@main.command()
@store_argument
@click.argument("query")
@output_format_option
@handle_errors
def sql(
    store: str, storage_options: tuple[str, ...], query: str, fmt: str, out: str | None
) -> None:
    """Run SQL QUERY over STORE's views (tokens, samples, features, ...)."""
    from actstore.query.views import sql as run_sql
    from actstore.store.reader import open_store

    st = open_store(store, storage_options=parse_storage_options(storage_options))
    emit(run_sql(st, query), fmt, out)  # a query DuckDB refuses is a QueryError: one line


@main.command()
@click.argument("stores", nargs=-1, required=True, metavar="STORE...")
@storage_option
@click.option(
    "--models", default=None, help="Two model keys A,B (default: the store's two models)."
)
@click.option("--layers", default=None, help="Layers: 2,4,6 or 0-6 (default: all shared).")
@click.option(
    "--metric",
    "metrics",
    default=",".join(METRICS),
    show_default=True,
    help=f"Comma-separated: {', '.join(METRICS)}.",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    help="Legend label per STORE (default: the store's folder name).",
)
@config_option(CompareConfig, "cka_rows")
@click.option(
    "--plot",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write a similarity-vs-layer PNG here.",
)
@output_format_option
@handle_errors
def compare(
    stores: tuple[str, ...],
    storage_options: tuple[str, ...],
    models: str | None,
    layers: str | None,
    metrics: str,
    labels: tuple[str, ...],
    cka_rows: int,
    plot: str | None,
    fmt: str,
    out: str | None,
) -> None:
    """Layer-wise similarity of two row-aligned models (the paper's Fig 1); several STOREs give several lines."""
    from actstore.analysis.compare import compare_stores, plot_similarity
    from actstore.analysis.config import CompareConfig
    from actstore.store.config import parse_layers

    if labels and len(labels) != len(stores):
        raise click.UsageError(f"give one --label per store ({len(stores)}), or none")
    cfg = CompareConfig(
        models=tuple(x.strip() for x in models.split(",")) if models else None,  # type: ignore[arg-type]
        layers=parse_layers(layers) if layers else None,
        metrics=[m.strip() for m in metrics.split(",") if m.strip()],
        cka_rows=cka_rows,
    )
    from actstore.analysis.compare import wide

    table = compare_stores(
        list(stores), cfg, list(labels) or None, parse_storage_options(storage_options)
    )
    emit(wide(table), fmt, out)
    if plot:
        click.echo(f"wrote {plot_similarity(table, plot)}", err=True)


@main.command()
@click.argument("store", metavar="STORE", required=False)
@click.argument("name", metavar="NAME", required=False)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Query parameter (repeat), e.g. feature=412.",
)
@click.option("--list", "list_", is_flag=True, help="List the named queries and their parameters.")
@click.option(
    "--storage-option",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Option for a remote store's filesystem.",
)
@output_format_option
@handle_errors
def query(
    store: str | None,
    name: str | None,
    params: tuple[str, ...],
    list_: bool,
    storage_options: tuple[str, ...],
    fmt: str,
    out: str | None,
) -> None:
    """Run the named query NAME over STORE (see --list); parameters are bound, never pasted into SQL."""
    from actstore.query import named as q
    from actstore.store.reader import open_store

    if list_:
        for nq in q.list_queries():
            click.echo(f"{nq.name}: {nq.description}")
            for p in nq.params:
                default = "required" if p.required else f"default {p.default}"
                click.echo(f"    {p.name} ({p.type}, {default}): {p.help}")
        click.echo(
            "Every query with a sae parameter also takes layer=L and model=KEY to pick the layer's only SAE."
        )
        return
    if not store or not name:
        raise click.UsageError("give STORE and NAME (actstore query --list shows the names)")
    st = open_store(store, storage_options=parse_storage_options(storage_options))
    emit(q.run_query(st, name, parse_params(params)), fmt, out)


@main.command("top-tokens")
@store_argument
@sae_options
@click.option("--feature", type=int, required=True, help="Feature index.")
@click.option("-n", "n", type=int, default=TOP_TOKENS_N, show_default=True, help="Rows to show.")
@click.option(
    "--context",
    type=int,
    default=CONTEXT_TOKENS,
    show_default=True,
    help="Tokens shown on each side.",
)
@output_format_option
@handle_errors
def top_tokens_cmd(
    store: str,
    storage_options: tuple[str, ...],
    layer: int | None,
    model: str | None,
    sae: str | None,
    feature: int,
    n: int,
    context: int,
    fmt: str,
    out: str | None,
) -> None:
    """The tokens where FEATURE fires most, with sample id, label and context (token in [[ ]])."""
    from actstore.query.lookups import top_tokens
    from actstore.store.reader import open_store

    st = open_store(store, storage_options=parse_storage_options(storage_options))
    df = top_tokens(st, feature, layer=layer, model=model, sae=sae, n=n, context=context)
    if fmt == "table":
        df = df.select("rank", "value", "token", "id", "label", "context")
    emit(df, fmt, out)


@main.command("top-features")
@store_argument
@sae_options
@click.option(
    "--by",
    type=click.Choice(RANK_BY),
    default=RANK_BY[0],
    show_default=True,
    help="Rank by activation variance over all tokens (the paper's choice), firing frequency, label association, or "
    "effect on the model's output (summed attribution per class: actstore effects).",
)
@click.option(
    "--label",
    default=None,
    help="With --by label-association: only this label (default: every label).",
)
@click.option(
    "--class",
    "cls",
    default=None,
    help="With --by effect: only this class (default: every class).",
)
@click.option(
    "-n",
    "n",
    type=int,
    default=TOP_FEATURES_N,
    show_default=True,
    help="Features to show (per label for label-association).",
)
@output_format_option
@handle_errors
def top_features_cmd(
    store: str,
    storage_options: tuple[str, ...],
    layer: int | None,
    model: str | None,
    sae: str | None,
    by: str,
    label: str | None,
    cls: str | None,
    n: int,
    fmt: str,
    out: str | None,
) -> None:
    """Features ranked by variance, frequency, association with a label, or effect on the model's output."""
    from actstore.query.lookups import top_features
    from actstore.store.reader import open_store

    st = open_store(store, storage_options=parse_storage_options(storage_options))
    emit(
        top_features(st, layer=layer, model=model, sae=sae, by=by, n=n, label=label, cls=cls),
        fmt,
        out,
    )


@main.command()
@store_argument
@click.option(
    "--update-manifest",
    is_flag=True,
    help="First record SHA-256 of files the manifest does not list yet.",
)
@click.option("--writable", is_flag=True, help="Needed with --update-manifest on a URL store.")
@click.option("--jobs", type=int, default=8, show_default=True, help="Objects checked in parallel.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def verify(
    store: str,
    storage_options: tuple[str, ...],
    update_manifest: bool,
    writable: bool,
    jobs: int,
    as_json: bool,
) -> None:
    """Check every chunk (crc32c) and file (manifest SHA-256) of STORE; list each bad object."""
    from actstore.storage.integrity import update_manifest as update
    from actstore.storage.location import open_location
    from actstore.storage.verify import verify as run
    from actstore.store.reader import dumps

    loc = open_location(
        store,
        parse_storage_options(storage_options),
        writable=update_manifest and write_access(store, writable),
    )
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
            + ", ".join(
                f"{sum(p.kind == k for p in rep.problems)} {k}"
                for k in ("corrupted", "missing", "unlisted")
            )
            + "".join(
                f", {n} unfinished (rerun the encode)"
                for n in [sum(p.kind == "unfinished" for p in rep.problems)]
                if n
            )
            + ("" if rep.manifest else "; no manifest.json")
        )
    if not rep.ok:
        raise SystemExit(1)


@main.command()
@store_argument
@click.option(
    "--sae",
    "saes",
    multiple=True,
    required=True,
    help="SAE name; repeat to pair one SAE with each model.",
)
@click.option(
    "--feature",
    "features",
    type=int,
    multiple=True,
    required=True,
    help="Feature index; repeat to give one per SAE.",
)
@click.option(
    "--text", "texts", multiple=True, help="A sentence to run through the models live (repeatable)."
)
@click.option(
    "--probes",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="File of sentences to run live, one per line (# comments), e.g. data/probes.txt.",
)
@click.option(
    "--sample-id", "sample_ids", multiple=True, help="Id of a stored sample (repeatable)."
)
@click.option(
    "--models",
    default=None,
    help="Model keys side by side, e.g. minilm,minilm-ft (default: each SAE's own model).",
)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False), help="FILE.html or FILE.png."
)
@click.option(
    "--steer",
    type=float,
    default=None,
    help="Also run each --text with the feature clamped to this value at every token, in each model shown that has "
    "a classification or LM head: its prediction beside the unsteered one (actstore steer).",
)
@config_option(ShowConfig, "max_tokens")
@device_option
@handle_errors
def show(
    store: str,
    storage_options: tuple[str, ...],
    saes: tuple[str, ...],
    features: tuple[int, ...],
    texts: tuple[str, ...],
    probes: str | None,
    sample_ids: tuple[str, ...],
    models: str | None,
    out: str,
    steer: float | None,
    max_tokens: int | None,
    device: str,
) -> None:
    """Colour each token by an SAE feature's activation, models side by side (the paper's Figs 3-5)."""
    from actstore.analysis.config import ShowConfig
    from actstore.analysis.show import show as run
    from actstore.analysis.show import show_summary
    from actstore.models.loading import auto_device
    from actstore.store.reader import open_store

    st = open_store(store, storage_options=parse_storage_options(storage_options))
    if probes:
        with open(probes, encoding="utf-8") as f:
            texts += tuple(
                line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")
            )
    cfg = ShowConfig(
        saes=list(saes),
        features=list(features),
        texts=list(texts),
        sample_ids=list(sample_ids),
        models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
        device=auto_device(device),
        max_tokens=max_tokens,
    )
    tv = run(st, cfg, out)
    for r in show_summary(tv):
        label = r["sentence"] if len(r["sentence"]) <= 50 else r["sentence"][:47] + "..."
        click.echo(
            f"{label!r} · {r['model']} · {r['sae']}[{r['feature']}]: max {r['max']:.4f} at {r['at']!r}"
        )
    if steer is not None:
        from actstore.analysis.show import steer_lines

        for line in steer_lines(st, tv.views, list(texts), steer, cfg.device):
            click.echo(line)
    click.echo(f"wrote {out}")


@main.command()
@store_argument
@output_format_option
@handle_errors
def saes(store: str, storage_options: tuple[str, ...], fmt: str, out: str | None) -> None:
    """List the SAEs in STORE with their held-out metrics (FVU, MSE, L0, dead and dense fractions)."""
    from actstore.sae.files import dense_notes, list_saes
    from actstore.store.reader import open_store

    df = list_saes(open_store(store, storage_options=parse_storage_options(storage_options)))
    emit(df, fmt, out)
    for note in dense_notes(df):
        click.echo(f"note: {note}", err=True)
