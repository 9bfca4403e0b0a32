"""The ``actstore`` command line: thin wrappers over the library.

Each command parses options, calls one library function, and turns actstore's
errors into one-line ``click.ClickException`` s.
"""

from __future__ import annotations

from typing import Any

import click

from actstore.analysis.config import DemoConfig, DiffConfig, ReportConfig
from actstore.cli.group import main
from actstore.cli.options import (
    break_lock_option,
    config_options,
    data_options,
    emit,
    field_docs,
    handle_errors,
    labels_option,
    output_format_option,
    parse_storage_options,
    quiet_option,
    ray_option,
    store_argument,
    writable_option,
)
from actstore.encoding.config import EncodeConfig
from actstore.format.codecs import CODECS
from actstore.models.config import FinetuneConfig
from actstore.models.names import MODEL_DTYPES
from actstore.sae.config import B_DEC_INITS, DECODER_INITS, OPTIMIZERS, PRESETS, TRAIN_ARCHS, TrainConfig
from actstore.storage.config import CopyConfig
from actstore.storage.urls import write_access
from actstore.store.config import CODEC_PLACES, COMPRESSIONS, ExtractConfig

_extract, _finetune, _encode, _copy = (config_options(c) for c in (ExtractConfig, FinetuneConfig, EncodeConfig, CopyConfig))
_diff, _report, _demo, _train = (config_options(c) for c in (DiffConfig, ReportConfig, DemoConfig, TrainConfig))


@main.command()
@store_argument
@_extract("model", required=True)
@data_options
@labels_option
@_extract("layers", required=True, type=str, help="hidden_states indices: 2,4,6 or 0-6 or 'all' (0 = embeddings).")
@_extract("name")
@_extract("max_length")
@_extract("window")
@_extract("stride")
@_extract("dtype", type=click.Choice(MODEL_DTYPES))
@_extract("batch_size")
@_extract("codec", type=click.Choice(CODECS))
@_extract("codec_on", type=click.Choice(CODEC_PLACES))
@_extract("compression", type=click.Choice(COMPRESSIONS))
@_extract("chunk_rows")
@_extract("inner_rows")
@_extract("unit_rows")
@_extract("new_tokenization")
@_extract("device")
@_extract("threads")
@_extract("writer_threads")
@ray_option("Units computed by Ray actors")
@_extract("ray_workers")
@quiet_option
@break_lock_option
@handle_errors
def extract(store: str, storage_options: tuple[str, ...], model: str, data: str, text_field: str | None, label_field: str | None,
            id_field: str | None, limit: int | None, labels: str | None, layers: str, name: str | None, max_length: int | None,
            window: int | None, stride: int | None, dtype: str, batch_size: int, codec: str, codec_on: str, compression: str,
            chunk_rows: int, inner_rows: int, unit_rows: int | None, new_tokenization: bool, device: str,
            threads: int | None, writer_threads: int | None, ray_address: str | None, ray_workers: int | None,
            quiet: bool, break_lock: bool) -> None:  # fmt: skip
    """Extract hidden states of MODEL at LAYERS over a corpus into STORE (resumable).

    Units complete in any order: two runs on one store share the work, and --ray fans the units out over Ray
    actors (the store must be on storage every worker reaches: a shared folder or an s3/gs/az URL).
    """
    from actstore.data.corpora import data_config
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract as run

    cfg = ExtractConfig(
        model=model, data=data_config(data, text_field, label_field, id_field, limit, labels),
        layers="all" if layers == "all" else layers, name=name, max_length=max_length, batch_size=batch_size,
        codec=codec, device=device, chunk_rows=chunk_rows, inner_rows=inner_rows, new_tokenization=new_tokenization,
        unit_rows=unit_rows, threads=threads, ray_workers=ray_workers, window=window, stride=stride, dtype=dtype,
        codec_on=codec_on, compression=compression, writer_threads=writer_threads,
    )  # fmt: skip
    res = run(store, cfg, progress=not quiet, storage_options=parse_storage_options(storage_options), break_lock=break_lock,
              ray_address=ray_address)  # fmt: skip
    rep = res.data_report
    skipped = rep.get("n_skipped_empty", 0) + rep.get("n_skipped_not_text", 0)
    click.echo(
        f"{res.store}: model {res.model_key} layers {','.join(map(str, res.layers))} — {res.n_samples} samples, "
        f"{res.n_tokens} tokens ({res.n_truncated} samples truncated, {skipped} rows skipped); "
        f"wrote {res.rows_written} rows in {res.seconds:.1f}s ({res.tokens_per_s:,.0f} tok/s)"
        + (f", resumed at row {res.resumed_from}" if res.rows_written and res.resumed_from else "")
        + (f"; {rep['n_renamed_ids']} repeated ids made unique (ID#2, ID#3, ...)" if rep.get("n_renamed_ids") else "")
        + (f"; {rep['n_repaired_text']} rows had lone surrogates, now U+FFFD" if rep.get("n_repaired_text") else "")
    )


# ---- the paper end to end: finetune, compare, show, diff-features, report, demo ----
@main.command()
@_finetune("model", required=True)
@data_options
@_finetune("out", required=True, type=click.Path(file_okay=False))
@_finetune("epochs")
@_finetune("lr")
@_finetune("batch_size")
@_finetune("max_length")
@labels_option
@_finetune("seed")
@_finetune("keep_checkpoint")
@_finetune("ignore_split")
@_finetune("device")
@quiet_option
@handle_errors
def finetune(model: str, data: str, text_field: str | None, label_field: str | None, id_field: str | None,
             limit: int | None, out: str, epochs: int, lr: float, batch_size: int, max_length: int, labels: str | None, seed: int,
             keep_checkpoint: bool, ignore_split: bool, device: str, quiet: bool) -> None:  # fmt: skip
    """Fine-tune MODEL with a classification head on a labelled corpus (resumable per epoch)."""
    from actstore.data.corpora import data_config
    from actstore.models.config import FinetuneConfig
    from actstore.models.finetune import finetune as run
    from actstore.models.finetune import report_text

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
@_encode("sae", required=True)
@_encode("batch_rows")
@_encode("n_buckets", "--buckets", "n_buckets")
@_encode("row_group_rows")
@_encode("spill_entries")
@_encode("workers")
@_encode("overwrite")
@_encode("device")
@ray_option("Segments of rows, then buckets, encoded by Ray actors")
@_encode("ray_workers")
@_encode("threads")
@writable_option
@quiet_option
@handle_errors
def encode(store: str, storage_options: tuple[str, ...], writable: bool, sae: str, batch_rows: int, n_buckets: int,
           row_group_rows: int, spill_entries: int, workers: int, overwrite: bool, device: str, ray_address: str | None,
           ray_workers: int | None, threads: int | None, quiet: bool) -> None:  # fmt: skip
    """Run SAE over every token row of its layer into STORE/features/SAE/ (Parquet, resumable).

    With --ray, Ray actors (each loading the SAE once) encode segments of rows, then merge buckets; the files equal
    a single process's. The store must be on storage every worker reaches (a shared folder or an s3/gs/az URL).
    """
    from actstore.encoding.config import EncodeConfig
    from actstore.encoding.encode import encode as run
    from actstore.store.reader import open_store

    st = open_store(store, writable=write_access(store, writable), storage_options=parse_storage_options(storage_options))
    cfg = EncodeConfig(sae=sae, batch_rows=batch_rows, n_buckets=n_buckets, row_group_rows=row_group_rows,
                       spill_entries=spill_entries, workers=workers, device=device, overwrite=overwrite,
                       ray_workers=ray_workers, threads=threads)  # fmt: skip
    res = run(st, cfg, progress=not quiet, ray_address=ray_address)
    if res.skipped:
        click.echo(f"{res.store}: SAE {res.sae} is already encoded ({res.n_feature_rows} feature rows); --overwrite to redo")
        return
    click.echo(
        f"{res.store}: SAE {res.sae} ({res.model} layer {res.layer}) — {res.n_rows} token rows, {res.n_feature_rows} "
        f"feature rows ({res.n_feature_rows / max(res.n_rows, 1):.1f} per token, {res.n_bytes / max(res.n_feature_rows, 1):.2f} "
        f"bytes each) in {res.seconds:.1f}s ({res.rows_per_s:,.0f} tok/s)"
        + (f", resumed at row {res.resumed_from}" if res.resumed_from else "")
        + (f"; {res.never_fired_fraction:.3f} of its features never fire on any token of the store"
           if res.never_fired_fraction is not None else "")
    )  # fmt: skip


# ---- sharing: copy, verify ------------------------------------------------
@main.command()
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@_copy("include", multiple=True, metavar="WHAT", default=())
@_copy("jobs")
@click.option("--src-option", "src_options", multiple=True, metavar="KEY=VALUE", help="fsspec storage option for SRC.")
@click.option("--dst-option", "dst_options", multiple=True, metavar="KEY=VALUE", help="fsspec storage option for DST.")
@quiet_option
@handle_errors
def copy(src: str, dst: str, include: tuple[str, ...], jobs: int, src_options: tuple[str, ...], dst_options: tuple[str, ...],
         quiet: bool) -> None:  # fmt: skip
    """Copy store SRC to DST (paths or URLs), checking every object; rerun to resume."""
    from actstore.storage.config import CopyConfig
    from actstore.storage.copy import copy_store

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
@_diff("rows")
@_diff("retain")
@_diff("match")
@click.option("--no-activation-corr", is_flag=True, help="Match by decoder cosine only.")
@_diff("name")
@writable_option
@output_format_option
@handle_errors
def diff_features(store: str, storage_options: tuple[str, ...], saes: tuple[str, ...], rows: int, retain: float, match: float,
                  no_activation_corr: bool, name: str | None, writable: bool, fmt: str, out: str | None) -> None:  # fmt: skip
    """Match the features of two SAEs by decoder cosine and activation correlation: retained / modified / lost / new.

    Counts mean something only against a baseline: diff two SAEs trained on the same activations with
    different --seed values too (docs/REPRODUCTION.md shows such a seed control).
    """
    from actstore.analysis.config import DiffConfig
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
@_report("out", required=True, type=click.Path(file_okay=False))
@_report("models", type=str)
@_report("top_features")
@_report("top_tokens")
@_report("views")
@click.option("--writable", is_flag=True, help="Save computed feature diffs into a store given by URL (local stores: always).")
@handle_errors
def report(store: str, storage_options: tuple[str, ...], out: str, models: str | None, top_features: int, top_tokens: int,
           views: int, writable: bool) -> None:  # fmt: skip
    """Write an HTML report of STORE: fine-tune reports, similarity, SAE metrics, top features, token views, feature diff."""
    from actstore.analysis.config import ReportConfig
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
@_demo("out", type=click.Path(file_okay=False))
@_demo("limit")
@_demo("max_length")
@_demo("epochs")
@_demo("sae_epochs")
@_demo("model")
@_demo("data")
@_demo("device")
@quiet_option
@handle_errors
def demo(out: str, limit: int, max_length: int, epochs: int, sae_epochs: int, model: str, data: str, device: str,
         quiet: bool) -> None:  # fmt: skip
    """Run the paper end to end on bundled MiniLM + BBC News: fine-tune, extract, SAEs, encode, compare, report."""
    from actstore.analysis.config import DemoConfig
    from actstore.analysis.demo import run_demo

    cfg = DemoConfig(out=out, limit=limit, max_length=max_length, epochs=epochs, sae_epochs=sae_epochs, model=model, data=data,
                     device=device)  # fmt: skip
    res = run_demo(cfg, progress=not quiet, log=click.echo)
    times = ", ".join(f"{k} {v:.0f}s" for k, v in res.seconds.items())
    click.echo(f"\ndone ({times}).\nfine-tuned test accuracy {res.accuracy['finetuned']:.3f} "
               f"(pretrained encoder + fresh head {res.accuracy['pretrained']:.3f})")  # fmt: skip
    click.echo(f"report: {res.report_html}\nstore:  {res.store} (try: actstore info {res.store})")


# ---- SAE training ---------------------------------------------------------------
def _list(raw: str | None, kind: type, hint: str, example: str) -> list[Any]:
    """``"16,32"`` -> ``[16, 32]`` (empty for None); a BadParameter naming the option otherwise."""
    if raw is None:
        return []
    try:
        return [kind(x.strip()) for x in str(raw).split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{raw!r}: give {example}", param_hint=hint) from None


@main.command()
@store_argument
@click.option("--model", "--models", "models", required=True, help="Store key of the model; several (a,b) make a sweep.")
@click.option("--layer", "--layers", "layers", required=True, help="Layer (hidden_states index); 2,4,6 or 2-6 make a sweep.")
@_train("arch", "--arch", "archs", type=str, metavar="ARCH[,ARCH...]",
        help=f"{field_docs(TrainConfig)['arch']} topk,batchtopk make a sweep.")  # fmt: skip
@click.option(
    "--d-sae", "d_saes", default=None, help="Number of features (default: expansion x d_model); 1024,4096 make a sweep."
)
@_train("expansion")
@_train("k", "--k", "ks", type=str, metavar="K[,K...]", help=f"{field_docs(TrainConfig)['k']} 16,32 make a sweep.")
@_train("l1")
@_train("l1_warmup")
@_train("lr", "--lr", "lrs", type=str, metavar="LR[,LR...]",
        help=f"{field_docs(TrainConfig)['lr']} 1e-3,3e-3 make a sweep.")  # fmt: skip
@_train("lr_warmup")
@_train("lr_decay")
@_train("optimizer", type=click.Choice(OPTIMIZERS))
@_train("resample")
@_train("init", type=click.Choice(DECODER_INITS))
@_train("b_dec_init", type=click.Choice(B_DEC_INITS))
@_train("unit_grad", "--unit-grad/--no-unit-grad", default=None)
@_train("epochs")
@_train("tokens")
@_train("batch_size")
@_train("preset", type=click.Choice(sorted(PRESETS)))
@_train("name")
@_train("seed", "--seed", "seeds", type=str, default="0", show_default=True, metavar="SEED[,SEED...]",
        help=f"{field_docs(TrainConfig)['seed']} 0,1,2 make a sweep (sharing seed 0's data order).")  # fmt: skip
@click.option("--no-normalize", is_flag=True, help="Do not scale inputs to mean squared norm d_model.")
@_train("buffer_mb")
@_train("threads")
@_train("eval_fraction")
@_train("checkpoint_every")
@_train("eval_points")
@_train("resume")
@_train("overwrite")
@_train("device")
@ray_option("Each run a Ray task")
@writable_option
@quiet_option
@handle_errors
def train(store: str, storage_options: tuple[str, ...], writable: bool, models: str, layers: str, archs: str | None,
          d_saes: str | None, expansion: float | None, ks: str | None, l1: float | None, l1_warmup: float | None,
          lrs: str | None, lr_warmup: float | None, lr_decay: float | None, optimizer: str | None, resample: int,
          init: str | None, b_dec_init: str | None, unit_grad: bool | None,
          epochs: int | None, tokens: int | None, batch_size: int, preset: str | None, name: str | None, seeds: str,
          no_normalize: bool, buffer_mb: int, threads: int | None, eval_fraction: float, checkpoint_every: int,
          eval_points: int, resume: bool, overwrite: bool, device: str, ray_address: str | None,
          quiet: bool) -> None:  # fmt: skip
    """Train a sparse autoencoder on one layer of STORE, streaming from its chunks (resumable).

    Several models, layers, widths, k, architectures, learning rates or seeds (--layer 2,4 --d-sae 1024,4096 --k 16,32)
    train every combination, each its own resumable run; the runs of one layer are trained together from one pass
    over the shuffled rows (bit-identical to separate runs). With --ray each layer's runs are a Ray task (the store
    must be on storage every worker reaches).
    """
    from actstore.store.config import parse_layers

    model_list = [m.strip() for m in models.split(",") if m.strip()]
    layer_list = parse_layers(layers)
    d_list = _list(d_saes, int, "--d-sae", "1024 or 1024,4096") or [None]
    k_list = _list(ks, int, "--k", "32 or 16,32") or [None]
    lr_list = _list(lrs, float, "--lr", "1e-3 or 1e-3,3e-3") or [None]
    seed_list = _list(seeds, int, "--seed", "0 or 0,1,2") or [0]
    arch_list = _list(archs, str, "--arch", ",".join(TRAIN_ARCHS)) or [None]
    for a in arch_list:
        if a is not None and a not in TRAIN_ARCHS:
            raise click.BadParameter(f"{a!r} is not one of {', '.join(TRAIN_ARCHS)}", param_hint="--arch")
    configs: list[tuple[TrainConfig, bool]] = []  # (config, a relu-l1 run of a mixed sweep: it takes no k)
    for a in arch_list:  # each architecture resolves its own defaults (optimizer, learning rate, init)
        relu = (a or (PRESETS.get(preset or "", {}).get("arch")) or "relu-l1") == "relu-l1"
        mixed = relu and len(arch_list) > 1  # k is topk's and batchtopk's: a relu-l1 run of a mixed sweep has none
        cfg = TrainConfig(
            model=model_list[0] if model_list else "", layer=layer_list[0], arch=a, d_sae=d_list[0], expansion=expansion,
            k=None if mixed else k_list[0], l1=l1, l1_warmup=l1_warmup, lr=lr_list[0], lr_warmup=lr_warmup, lr_decay=lr_decay,
            optimizer=optimizer, resample=resample, init=init,
            b_dec_init=b_dec_init, unit_grad=unit_grad, epochs=epochs, tokens=tokens, batch_size=batch_size,
            preset=preset, name=name, device=device, seed=seed_list[0], normalize=not no_normalize, buffer_mb=buffer_mb,
            threads=threads, eval_fraction=eval_fraction, checkpoint_every=checkpoint_every, resume=resume,
            overwrite=overwrite, eval_points=eval_points,
        )  # fmt: skip
        configs.append((cfg, mixed))
    n_runs = len(model_list) * len(layer_list) * len(d_list) * len(k_list) * len(lr_list) * len(seed_list) * len(arch_list)
    if n_runs > 1 or ray_address is not None:
        from actstore.sae.sweep import run_sweep, sweep_configs

        runs_cfg: list[TrainConfig] = []
        for cfg, mixed in configs:
            runs_cfg += sweep_configs(cfg, model_list, layer_list, d_list, None if mixed else k_list, lr_list, seed_list)
        runs = run_sweep(store, runs_cfg, ray_address=ray_address, storage_options=parse_storage_options(storage_options),
                         writable=write_access(store, writable), progress=not quiet, log=click.echo)  # fmt: skip
        click.echo(f"{store}: sweep of {len(runs)} SAEs done ({sum(r.skipped for r in runs)} already trained)")
        return
    cfg = configs[0][0]
    import warnings

    from actstore.sae.metrics import RisingFVUWarning
    from actstore.sae.train import train_sae

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RisingFVUWarning)  # said below, once, from metrics.json
        res = train_sae(store, cfg, progress=not quiet, storage_options=parse_storage_options(storage_options),
                        writable=write_access(store, writable))  # fmt: skip
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

    note = dense_note(res.name, ev.get("l0"), c.d_sae)  # e.g. the paper preset: relu-l1 at l1 1e-3 is dense
    if note:
        click.echo(f"note: {note}")
    for w in res.metrics.get("warnings") or []:
        click.echo(f"warning: {w}", err=True)
