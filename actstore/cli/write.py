"""The ``actstore`` command line: thin wrappers over the library.

Each command parses options, calls one library function, and turns actstore's
errors into one-line ``click.ClickException`` s.
"""

from __future__ import annotations

import click

from actstore.analysis.config import DemoConfig, DiffConfig, ReportConfig
from actstore.cli.command import config_options, configured
from actstore.cli.group import main
from actstore.cli.options import (
    break_lock_option,
    emit,
    handle_errors,
    output_format_option,
    parse_storage_options,
    quiet_option,
    ray_option,
    store_argument,
    writable_option,
)
from actstore.encoding.config import EncodeConfig
from actstore.models.config import FinetuneConfig
from actstore.sae.combos import expand
from actstore.sae.config import TrainConfig
from actstore.storage.config import CopyConfig
from actstore.storage.urls import write_access
from actstore.store.config import ExtractConfig

_copy, _diff = config_options(CopyConfig), config_options(DiffConfig)


@main.command()
@handle_errors
@store_argument
@configured(ExtractConfig)
@ray_option("Units computed by Ray actors")
@quiet_option
@break_lock_option
def extract(
    store: str,
    storage_options: tuple[str, ...],
    cfg: ExtractConfig,
    ray_address: str | None,
    quiet: bool,
    break_lock: bool,
) -> None:
    """Extract hidden states of MODEL at LAYERS over a corpus into STORE (resumable).

    Units complete in any order: two runs on one store share the work, and --ray fans the units out over Ray
    actors (the store must be on storage every worker reaches: a shared folder or an s3/gs/az URL).
    """
    from actstore.store.extract import extract as run

    res = run(
        store,
        cfg,
        progress=not quiet,
        storage_options=parse_storage_options(storage_options),
        break_lock=break_lock,
        ray_address=ray_address,
    )
    rep = res.data_report
    skipped = rep.get("n_skipped_empty", 0) + rep.get("n_skipped_not_text", 0)
    click.echo(
        f"{res.store}: model {res.model_key} layers {','.join(map(str, res.layers))} — {res.n_samples} samples, "
        f"{res.n_tokens} tokens ({res.n_truncated} samples truncated, {skipped} rows skipped); "
        f"wrote {res.rows_written} rows in {res.seconds:.1f}s ({res.tokens_per_s:,.0f} tok/s)"
        + (f", resumed at row {res.resumed_from}" if res.rows_written and res.resumed_from else "")
        + (
            f"; {rep['n_renamed_ids']} repeated ids made unique (ID#2, ID#3, ...)"
            if rep.get("n_renamed_ids")
            else ""
        )
        + (
            f"; {rep['n_repaired_text']} rows had lone surrogates, now U+FFFD"
            if rep.get("n_repaired_text")
            else ""
        )
    )


# ---- the paper end to end: finetune, compare, show, diff-features, report, demo ----
@main.command()
@handle_errors
@configured(FinetuneConfig, skip=("labels",))
@quiet_option
def finetune(cfg: FinetuneConfig, quiet: bool) -> None:
    """Fine-tune MODEL with a classification head on a labelled corpus (resumable per epoch)."""
    from actstore.models.finetune import finetune as run
    from actstore.models.finetune import report_text

    res = run(cfg, progress=not quiet)
    if res.skipped:
        click.echo(
            f"{res.out} already holds a finished fine-tune of these options: nothing trained (another --out to redo)"
        )
    click.echo(report_text(res))
    click.echo(
        f"\nsaved the best checkpoint (epoch {res.best_epoch}) to {res.out}; reports in report.json / report.txt"
    )


@main.command()
@handle_errors
@store_argument
@configured(EncodeConfig)
@ray_option("Segments of rows, then buckets, encoded by Ray actors")
@writable_option
@quiet_option
def encode(
    store: str,
    storage_options: tuple[str, ...],
    cfg: EncodeConfig,
    ray_address: str | None,
    writable: bool,
    quiet: bool,
) -> None:
    """Run SAE over every token row of its layer into STORE/features/SAE/ (Parquet, resumable).

    With --ray, Ray actors (each loading the SAE once) encode segments of rows, then merge buckets; the files equal
    a single process's. The store must be on storage every worker reaches (a shared folder or an s3/gs/az URL).
    """
    from actstore.encoding.encode import encode as run
    from actstore.store.reader import open_store

    st = open_store(
        store,
        writable=write_access(store, writable),
        storage_options=parse_storage_options(storage_options),
    )
    res = run(st, cfg, progress=not quiet, ray_address=ray_address)
    if res.skipped:
        click.echo(
            f"{res.store}: SAE {res.sae} is already encoded ({res.n_feature_rows} feature rows); --overwrite to redo"
        )
        return
    click.echo(
        f"{res.store}: SAE {res.sae} ({res.model} layer {res.layer}) — {res.n_rows} token rows, {res.n_feature_rows} "
        f"feature rows ({res.n_feature_rows / max(res.n_rows, 1):.1f} per token, {res.n_bytes / max(res.n_feature_rows, 1):.2f} "
        f"bytes each) in {res.seconds:.1f}s ({res.rows_per_s:,.0f} tok/s)"
        + (f", resumed at row {res.resumed_from}" if res.resumed_from else "")
        + (
            f"; {res.never_fired_fraction:.3f} of its features never fire on any token of the store"
            if res.never_fired_fraction is not None
            else ""
        )
    )


# ---- sharing: copy, verify ------------------------------------------------
@main.command()
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@_copy("include", multiple=True, metavar="WHAT", default=())
@_copy("jobs")
@click.option(
    "--src-option",
    "src_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec storage option for SRC.",
)
@click.option(
    "--dst-option",
    "dst_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec storage option for DST.",
)
@quiet_option
@handle_errors
def copy(
    src: str,
    dst: str,
    include: tuple[str, ...],
    jobs: int,
    src_options: tuple[str, ...],
    dst_options: tuple[str, ...],
    quiet: bool,
) -> None:
    """Copy store SRC to DST (paths or URLs), checking every object; rerun to resume."""
    from actstore.storage.config import CopyConfig
    from actstore.storage.copy import copy_store

    cfg = CopyConfig(
        src,
        dst,
        list(include),
        jobs,
        parse_storage_options(src_options),
        parse_storage_options(dst_options),
    )
    res = copy_store(cfg, progress=not quiet)
    for p in res.problems:
        click.echo(f"{p.kind}: {p.key}: {p.detail}", err=True)
    click.echo(
        f"{res.src} -> {res.dst}: {res.n_objects} objects, {res.n_copied} copied ({res.bytes_copied / 2**20:.1f} MiB), "
        f"{res.n_skipped} already there, in {res.seconds:.1f}s"
        + ("" if res.ok else f"; {len(res.problems)} FAILED")
    )
    if not res.ok:
        raise click.ClickException(
            f"{len(res.problems)} objects failed their checks: fix the source, then rerun the copy"
        )


@main.command("diff-features")
@store_argument
@click.option(
    "--sae",
    "saes",
    multiple=True,
    required=True,
    help="Two SAEs: --sae A --sae B (e.g. pretrained, fine-tuned).",
)
@_diff("rows")
@_diff("retain")
@_diff("match")
@click.option("--no-activation-corr", is_flag=True, help="Match by decoder cosine only.")
@_diff("name")
@writable_option
@output_format_option
@handle_errors
def diff_features(
    store: str,
    storage_options: tuple[str, ...],
    saes: tuple[str, ...],
    rows: int,
    retain: float,
    match: float,
    no_activation_corr: bool,
    name: str | None,
    writable: bool,
    fmt: str,
    out: str | None,
) -> None:
    """Match the features of two SAEs by decoder cosine and activation correlation: retained / modified / lost / new.

    Counts mean something only against a baseline: diff two SAEs trained on the same activations with
    different --seed values too (docs/REPRODUCTION.md shows such a seed control).
    """
    from actstore.analysis.config import DiffConfig
    from actstore.analysis.diff import diff_features as run
    from actstore.store.reader import open_store

    if len(saes) != 2:
        raise click.UsageError(f"give exactly two SAEs: --sae A --sae B (got {len(saes)})")
    st = open_store(
        store,
        writable=write_access(store, writable),
        storage_options=parse_storage_options(storage_options),
    )
    cfg = DiffConfig(
        saes[0],
        saes[1],
        rows=rows,
        retain=retain,
        match=match,
        activation_corr=not no_activation_corr,
        name=name,
    )
    res = run(st, cfg, save=st.writable)
    if out or fmt != "table":
        emit(res.table, fmt, out)
    for side, sae in (("a", saes[0]), ("b", saes[1])):
        click.echo(
            f"{sae}: " + ", ".join(f"{k} {v}" for k, v in res.counts[side].items()),
            err=bool(out) or fmt != "table",
        )
    if not st.writable:
        click.echo(
            f"not saved: {store} is opened read-only (pass --writable to save it as diffs/{res.name})",
            err=True,
        )
        return
    click.echo(
        f"saved as diffs/{res.name} ({res.n_rows} token rows); query it with: actstore sql {store} "
        f"\"SELECT * FROM feature_diff WHERE diff = '{res.name}' AND status <> 'retained'\"",
        err=bool(out) or fmt != "table",
    )


@main.command()
@handle_errors
@store_argument
@configured(ReportConfig)
@click.option(
    "--writable",
    is_flag=True,
    help="Save computed feature diffs into a store given by URL (local stores: always).",
)
def report(store: str, storage_options: tuple[str, ...], cfg: ReportConfig, writable: bool) -> None:
    """Write an HTML report of STORE: fine-tune reports, similarity, SAE metrics, top features, token views, feature diff."""
    from actstore.paper.report import report as run

    res = run(
        store, cfg, parse_storage_options(storage_options), writable=write_access(store, writable)
    )
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {res.html} ({', '.join(res.sections) or 'no sections'}) and {res.markdown}")


@main.command()
@handle_errors
@configured(DemoConfig)
@quiet_option
def demo(cfg: DemoConfig, quiet: bool) -> None:
    """Run the paper end to end on bundled MiniLM + BBC News: fine-tune, extract, SAEs, encode, compare, report."""
    from actstore.paper.demo import run_demo

    res = run_demo(cfg, progress=not quiet, log=click.echo)
    times = ", ".join(f"{k} {v:.0f}s" for k, v in res.seconds.items())
    click.echo(
        f"\ndone ({times}).\nfine-tuned test accuracy {res.accuracy['finetuned']:.3f} "
        f"(pretrained encoder + fresh head {res.accuracy['pretrained']:.3f})"
    )
    click.echo(f"report: {res.report_html}\nstore:  {res.store} (try: actstore info {res.store})")


# ---- SAE training ---------------------------------------------------------------
@main.command()
@handle_errors
@store_argument
@configured(TrainConfig, skip=("models", "layers"), expand=expand)
@ray_option("Each run a Ray task")
@writable_option
@quiet_option
def train(
    store: str,
    storage_options: tuple[str, ...],
    cfgs: list[TrainConfig],
    ray_address: str | None,
    writable: bool,
    quiet: bool,
) -> None:
    """Train a sparse autoencoder on one layer of STORE, streaming from its chunks (resumable).

    Several models, layers, widths, k, architectures, learning rates or seeds (--layer 2,4 --d-sae 1024,4096 --k 16,32)
    train every combination, each its own resumable run; the runs of one layer are trained together from one pass
    over the shuffled rows (bit-identical to separate runs). With --ray each layer's runs are a Ray task (the store
    must be on storage every worker reaches).
    """
    if len(cfgs) > 1 or ray_address is not None:
        from actstore.sae.sweep import run_sweep

        runs = run_sweep(
            store,
            cfgs,
            ray_address=ray_address,
            storage_options=parse_storage_options(storage_options),
            writable=write_access(store, writable),
            progress=not quiet,
            log=click.echo,
        )
        click.echo(
            f"{store}: sweep of {len(runs)} SAEs done ({sum(r.skipped for r in runs)} already trained)"
        )
        return
    cfg = cfgs[0]
    import warnings

    from actstore.sae.metrics import RisingFVUWarning
    from actstore.sae.train import train_sae

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RisingFVUWarning)  # said below, once, from metrics.json
        res = train_sae(
            store,
            cfg,
            progress=not quiet,
            storage_options=parse_storage_options(storage_options),
            writable=write_access(store, writable),
        )
    ev, c = res.metrics.get("eval") or {}, res.sae.cfg
    size = f"k {c.k}" if c.k else f"l1 {c.l1:g}"
    click.echo(
        f"{res.store}: SAE {res.name} ({c.arch}, {c.d_in}->{c.d_sae}, {size}) on {c.model} layer {c.layer}: "
        f"{res.steps} steps, {res.tokens} tokens, {res.steps_per_s:.1f} steps/s, {cfg.optimizer} "
        f"lr {res.metrics['lr']:.2g}"
        + (f", resumed at step {res.resumed_from}" if res.resumed_from else "")
        + f"; held-out ({res.metrics['n_eval_rows']} tokens): FVU {ev.get('fvu', float('nan')):.4f}, "
        f"MSE {ev.get('mse', float('nan')):.4g}, L0 {ev.get('l0', float('nan')):.1f}, "
        f"dead {ev.get('dead_fraction', float('nan')):.3f} (never fired on them)"
    )
    from actstore.sae.files import dense_note

    # e.g. the paper preset: relu-l1 at l1 1e-3 is dense
    note = dense_note(res.name, ev.get("l0"), c.d_sae)
    if note:
        click.echo(f"note: {note}")
    for w in res.metrics.get("warnings") or []:
        click.echo(f"warning: {w}", err=True)
