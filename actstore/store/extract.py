"""Extract stage: stream a corpus through a model into the store's layer arrays.

Two phases, both streaming and resumable:

1. **Tokenize** the corpus once per tokenizer into the token index
   (``tokenizations/<tk>``): Zarr int arrays plus Parquet tables. A second model
   with the same tokenizer reuses these rows exactly.
2. **Forward** the token rows unit by unit. A *unit* is a run of whole Zarr
   chunks (``unit_rows`` rows); the samples overlapping it are bucketed by
   length, run through one truncated forward pass for all requested layers, and
   the unit's rows are handed to a writer thread that compresses and writes
   whole chunks, then records the unit: in a format-3 store by the unit's own
   marker (units complete in any order, each claimed by one worker of any
   number, :mod:`actstore.store.worker`; with Ray, :mod:`actstore.store.distributed`),
   in a format-1/2 store by advancing the array's ``committed_rows``. Units are
   deterministic, so a killed run restarted with the same command recomputes
   the same batches and ends byte-identical.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

import zarr
import zarr.codecs as zc

from actstore.clock import now
from actstore.data.corpora import load_corpus
from actstore.errors import ConfigError, StoreError
from actstore.format import codecs, layout
from actstore.format.layout import FORMAT_VERSION, check_name
from actstore.format.metadata import LayerAttrs, ModelAttrs, StoreAttrs, has_attrs
from actstore.models.loading import auto_device, load_model, resolve_dtype, torch_threads
from actstore.models.names import default_model_key, site_key
from actstore.models.sites import check_site_layers
from actstore.storage.integrity import update_manifest
from actstore.storage.location import Location, open_location
from actstore.storage.locks import LockSet
from actstore.store.config import ExtractConfig
from actstore.store.tokenize import choose_tokenization
from actstore.store.units import commit_prefix, committed_from_markers
from actstore.store.worker import ExtractJob, UnitWorker, prefix_rows, run_here
from actstore.version import __version__

SETUP_WAIT_S = (
    3600.0  # how long an extraction waits for another one creating the store's token index
)


@dataclass
class ExtractResult:
    """What an extraction did."""

    store: str
    model_key: str
    layers: list[int]
    tokenization: str
    n_samples: int
    n_tokens: int
    n_truncated: int
    rows_written: int
    resumed_from: int
    seconds: float
    tokens_per_s: float
    data_report: dict[str, Any] = field(default_factory=dict)


def open_root(loc: Location) -> zarr.Group:
    try:
        root = zarr.open_group(loc.zarr_store, mode="a")
    except (OSError, PermissionError) as exc:
        raise StoreError(
            f"cannot write to store {loc.url}: {exc}; choose a writable path"
        ) from None
    if not has_attrs(root):
        if list(root.group_keys()) or list(root.array_keys()):
            raise StoreError(
                f"{loc.url} is a Zarr group made by another tool: choose an empty folder for the store"
            )
        StoreAttrs(format=FORMAT_VERSION, created=now(), actstore_version=__version__).write(root)
    fmt = StoreAttrs.read(root, f"store {loc.url}").format
    if fmt not in layout.READABLE_FORMATS:
        raise StoreError(
            f"{loc.url} is store format {fmt}; this actstore writes formats {layout.READABLE_FORMATS}: upgrade it"
        )
    return root


def inner_rows_for(root: zarr.Group, cfg: ExtractConfig, chunk_rows: int) -> int:
    """Rows per inner chunk of new layer arrays: 0 (unsharded) in a format-1 store or with ``inner_rows=0``;
    otherwise ``cfg.inner_rows``, which must divide the store's chunk rows (a shard is ``chunk_rows`` rows)."""
    if (
        StoreAttrs.read(root, "store").format < layout.SHARDED_SINCE
        or not cfg.inner_rows
        or cfg.inner_rows >= chunk_rows
    ):
        return 0
    if chunk_rows % cfg.inner_rows:
        raise ConfigError(
            f"--inner-rows {cfg.inner_rows} does not divide the store's {chunk_rows} rows per chunk: use a divisor "
            f"such as {max(d for d in range(1, cfg.inner_rows + 1) if chunk_rows % d == 0)}, or 0 for unsharded arrays"
        )
    return cfg.inner_rows


# ---------------------------------------------------------------- phase 2
def layer_arrays(
    root: zarr.Group,
    model_key: str,
    layers: list[int],
    n_rows: int,
    chunk_rows: int,
    unit_rows: int,
    d_model: int,
    cfg: ExtractConfig,
    tk: str,
    inner: int = 0,
    units: bool = False,
) -> dict[int, tuple[zarr.Array, zarr.Array | None]]:
    """The layer arrays, opened to resume or created: sharded with ``inner``-row inner chunks (see
    :func:`inner_rows_for`), or unsharded when ``inner`` is 0; new ones complete unit by unit by markers
    (format 3, :mod:`actstore.store.units`) when ``units``."""
    out = {}
    for layer in layers:
        name = layout.layer_array(model_key, layer)
        try:
            arr = zarr.open_array(root.store, path=name, mode="r+")
        except FileNotFoundError:
            arr = None
        if arr is not None:
            a = LayerAttrs.read(arr, f"array {name} of store {root.store}")
            if a.codec != cfg.codec:
                raise StoreError(
                    f"layer {layer} of model {model_key!r} is already stored with codec {a.codec}: "
                    f"pass --codec {a.codec} to resume it, or --name for a new model key"
                )
            scale = None
            if cfg.codec == "int8":
                scale = zarr.open_array(
                    root.store, path=layout.scale_array(model_key, layer), mode="r+"
                )
            out[layer] = (arr, scale)
            continue
        comp = [zc.ZstdCodec(level=1), zc.Crc32cCodec()] if cfg.zstd() else [zc.Crc32cCodec()]
        attrs = LayerAttrs(
            layer=layer,
            d_model=d_model,
            codec=cfg.codec,
            n_rows=n_rows,
            unit_rows=unit_rows,
            stored_dtype=codecs.STORED_DTYPE[cfg.codec],
            model_key=model_key,
            tokenization=tk,
            created=now(),
            actstore_version=__version__,
            config=cfg.to_dict(),
            progress=layout.PROGRESS_UNITS if units else None,
            inner_rows=inner or None,
        )
        if inner:  # format 2: one shard object per chunk_rows rows, inner chunks of ``inner`` rows, each crc32c'd
            grid: dict[str, Any] = {"shards": (chunk_rows, d_model), "chunks": (inner, d_model)}
            # the per-token scales: one shard per unit (written whole with it), one inner chunk per chunk_rows
            scale_grid: dict[str, Any] = {"shards": (unit_rows,), "chunks": (chunk_rows,)}
        else:  # format 1 (or --inner-rows 0): one object per chunk
            grid, scale_grid = {"chunks": (chunk_rows, d_model)}, {"chunks": (chunk_rows,)}
        arr = root.create_array(
            name,
            shape=(n_rows, d_model),
            dtype=codecs.STORED_DTYPE[cfg.codec],
            fill_value=0,
            compressors=comp,
            attributes=attrs.as_zarr(),
            dimension_names=("token", "d_model"),
            **grid,
        )
        scale = None
        if cfg.codec == "int8":
            scale = root.create_array(
                layout.scale_array(model_key, layer),
                shape=(n_rows,),
                dtype=codecs.SCALE_DTYPE,
                fill_value=0,
                compressors=comp,
                dimension_names=("token",),
                **scale_grid,
            )
        out[layer] = (arr, scale)
    return out


def _keep_finetune_report(loc: Location, model_key: str, model_dir: str | None) -> None:
    """Copy the ``report.json`` of an ``actstore finetune`` directory into the store (``MODEL/finetune_report.json``).

    ``actstore report`` reads it from there: it never opens a file at a path the store names.
    """
    from actstore.models.finetune import load_report

    rep = load_report(model_dir) if model_dir else None
    key = layout.finetune_report(model_key)
    if rep is not None and not loc.exists(key):
        loc.write_bytes(key, json.dumps(rep, indent=1).encode())


def extract(
    store: str,
    cfg: ExtractConfig,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
    break_lock: bool = False,
    ray_address: str | None = None,
) -> ExtractResult:
    """Extract ``cfg.layers`` of ``cfg.model`` over ``cfg.data`` into ``store`` (created if needed).

    In a format-3 store (new stores) the units of each array complete in any order, each claimed by one worker
    (:mod:`actstore.store.units`): two extractions of the same store share the work, and ``ray_address``
    (``"local"``: a local Ray; else a cluster's address) fans the units out over ``cfg.ray_workers`` Ray actors.
    In a format-1/2 store each array being written is locked (:mod:`actstore.storage.locks`): a second writer of
    the same array is refused with ConcurrencyError. ``break_lock`` takes over locks left by a dead writer on
    another host (a dead writer on this host is detected by its pid, a claim of a unit also by its lease).
    """
    held: list[LockSet] = []
    try:
        with torch_threads(cfg.threads):
            return _extract(store, cfg, progress, storage_options, break_lock, held, ray_address)
    finally:
        for locks in held:
            locks.release_all()


def _model_group(loc: Location, root: Any, model_key: str, info: ModelAttrs, tk: str) -> str:
    """The model's group ``models/<key>``, created with the model's identity, or checked to hold the same weights
    and tokenization; returns its key."""
    mpath = layout.model_dir(model_key)
    try:
        group = zarr.open_group(loc.zarr_store, path=mpath, mode="r")
    except FileNotFoundError:
        new = dataclasses.replace(info, key=model_key, tokenization=tk, created=now())
        root.create_group(mpath, attributes=new.as_zarr())
        return mpath
    old = ModelAttrs.read(group, f"model {model_key} of store {loc.url}")
    if old.weights_sha256 != info.weights_sha256:
        was = old.dtype or "fp32"
        why = (
            f" (it was extracted with --dtype {was}, this run loads {info.dtype})"
            if was != info.dtype
            else ""
        )
        raise StoreError(
            f"model key {model_key!r} in {loc.url} holds other weights ({old.source}){why}: pass --name for a new key"
        )
    if old.tokenization != tk:
        raise StoreError(
            f"model key {model_key!r} in {loc.url} uses tokenization {old.tokenization}, not {tk}"
        )
    return mpath


def _unit_rows(
    loc: Location,
    cfg: ExtractConfig,
    model_key: str,
    layers: list[int],
    chunk_rows: int,
    d_model: int,
) -> int:
    """Rows per unit of work: whole chunks, bounded by the memory budget; an unfinished array keeps its own."""
    for layer in layers:
        try:
            arr = zarr.open_array(
                loc.zarr_store, path=layout.layer_array(model_key, layer), mode="r"
            )
        except FileNotFoundError:
            continue
        a = LayerAttrs.read(arr, f"array {arr.path} of store {loc.url}")
        if not a.complete and a.unit_rows:
            return a.unit_rows
    if cfg.unit_rows:
        return -(-cfg.unit_rows // chunk_rows) * chunk_rows
    per_row = d_model * 4 * len(layers)
    return max(chunk_rows, (cfg.unit_mb * 2**20 // per_row) // chunk_rows * chunk_rows)


def _extract(
    store: str,
    cfg: ExtractConfig,
    progress: bool,
    storage_options: dict[str, Any] | None,
    break_lock: bool,
    held: list[LockSet],
    ray_address: str | None,
) -> ExtractResult:

    t_start = time.perf_counter()
    corpus = load_corpus(cfg.data)
    # with Ray the driver only sets up
    device = auto_device(cfg.device if ray_address is None else "cpu")
    # with Ray the driver runs on the CPU: "auto" means bf16 only where --device says CUDA (see docs/SCALING.md)
    dtype = resolve_dtype(
        cfg.dtype,
        device if ray_address is None else (cfg.device if cfg.device != "auto" else "cpu"),
    )
    loaded = load_model(cfg.model, device, dtype)
    top = loaded.n_layers + (
        1 if cfg.site == "resid" else 0
    )  # a sublayer site: blocks 0 .. n_layers - 1
    layers: list[int] = list(range(top)) if cfg.layers == "all" else [int(v) for v in cfg.layers]
    check_site_layers(loaded, layers, cfg.site)
    if cfg.window is None and cfg.max_length is not None and cfg.max_length > loaded.position_limit:
        raise ConfigError(
            f"--max-length {cfg.max_length} exceeds what {cfg.model} accepts ({loaded.position_limit})"
        )
    model_key = site_key(
        check_name(cfg.name, "model key (--name)") if cfg.name else default_model_key(cfg.model),
        cfg.site,
    )

    loc = open_location(store, storage_options=storage_options, create=True)
    locks = LockSet(loc, f"extract {model_key}", break_lock)
    held.append(locks)
    # root, token index, model group and arrays: one creator at a time
    locks.acquire("setup", wait_s=SETUP_WAIT_S)
    root = open_root(loc)
    store_format = StoreAttrs.read(root, f"store {loc.url}").format
    if ray_address is not None and store_format < layout.UNIT_MARKERS_SINCE:
        raise StoreError(
            f"{loc.url} is store format {store_format}: its arrays have one writer each, so --ray "
            f"needs a store of format {layout.UNIT_MARKERS_SINCE} or later (extract into a new store, or drop --ray)"
        )
    tk, tattrs = choose_tokenization(
        loc,
        root,
        corpus,
        loaded,
        cfg.max_length,
        cfg.chunk_rows,
        cfg.new_tokenization,
        progress,
        cfg.window,
        cfg.stride,
    )
    n_rows, chunk_rows = tattrs.n_tokens, tattrs.chunk_rows

    # checked before anything of this model is written
    inner = inner_rows_for(root, cfg, chunk_rows)
    units_mode = store_format >= layout.UNIT_MARKERS_SINCE
    info = loaded.info()
    if cfg.site != "resid":
        info = dataclasses.replace(info, site=cfg.site)
    mpath = _model_group(loc, root, model_key, info, tk)
    _keep_finetune_report(loc, model_key, loaded.path)
    unit_rows = _unit_rows(loc, cfg, model_key, layers, chunk_rows, loaded.d_model)
    arrays = layer_arrays(
        root,
        model_key,
        layers,
        n_rows,
        chunk_rows,
        unit_rows,
        loaded.d_model,
        cfg,
        tk,
        inner,
        units_mode,
    )
    attrs = {
        layer: LayerAttrs.read(arr, f"array {arr.path} of store {loc.url}")
        for layer, (arr, _) in arrays.items()
    }
    marked = {layer: a.marks_units for layer, a in attrs.items()}
    committed = {
        layer: committed_from_markers(loc, arr.path, attrs[layer])
        if marked[layer]
        else prefix_rows(arr, unit_rows, loc.url)
        for layer, (arr, _) in arrays.items()
    }
    todo = [layer for layer in layers if committed[layer] < n_rows]
    desc = f"extract {model_key}"
    markers = any(marked[layer] for layer in todo)
    if markers and (
        not all(marked[layer] for layer in todo) or len({attrs[la].unit_rows for la in todo}) > 1
    ):
        raise StoreError(
            f"layers {','.join(map(str, todo))} of model {model_key!r} in {loc.url} were started by different runs "
            "(other units or formats): extract them one run each, with the layers each was started with"
        )
    if ray_address is not None and todo and not markers:
        raise StoreError(
            f"layers {','.join(map(str, todo))} of model {model_key!r} in {loc.url} were started "
            "without unit markers (one writer per array): resume them without --ray"
        )
    if not markers:  # formats 1-2: one writer per array
        locks.acquire_all([layout.layer_array(model_key, layer) for layer in todo])
        for layer in todo:  # temp files of writes cut short by a kill; their chunks get rewritten
            loc.remove_partial_writes(layout.layer_array(model_key, layer))
            loc.remove_partial_writes(layout.scale_array(model_key, layer))
    locks.release("setup")
    start = min((committed[layer] for layer in todo), default=n_rows)
    written = 0
    if todo:
        job = ExtractJob(
            store=loc.url if not loc.local else loc.root,
            storage_options=storage_options,
            model=cfg.model,
            model_key=model_key,
            layers=todo,
            tokenization=tk,
            n_rows=n_rows,
            unit_rows=unit_rows,
            codec=cfg.codec,
            batch_size=cfg.batch_size,
            device=cfg.device,
            threads=cfg.threads,
            dtype=dtype,
            break_lock=break_lock,
            writer_threads=cfg.writer_threads,
            markers=markers,
            codec_on_device=None if cfg.codec_on == "auto" else cfg.codec_on == "device",
            site=cfg.site,
        )
        written = _run_units(job, loc, loaded, device, ray_address, cfg.ray_workers, progress, desc)
    # the final prefix (a concurrent writer's attribute update may have lost one)
    for layer in todo if markers else []:
        if commit_prefix(layout.layer_array(model_key, layer), loc) >= n_rows:
            loc.remove_partial_writes(layout.layer_array(model_key, layer))
            loc.remove_partial_writes(layout.scale_array(model_key, layer))
    update_manifest(
        loc,
        prefixes=[
            layout.ROOT_META,
            f"{layout.MODELS}/{layout.ROOT_META}",
            layout.TOKENIZATIONS,
            mpath,
        ],
    )
    secs = time.perf_counter() - t_start
    return ExtractResult(
        store=loc.url,
        model_key=model_key,
        layers=layers,
        tokenization=tk,
        n_samples=tattrs.n_samples,
        n_tokens=n_rows,
        n_truncated=tattrs.n_truncated,
        rows_written=written,
        resumed_from=start if written else n_rows,
        seconds=secs,
        tokens_per_s=written / secs if secs else 0.0,
        data_report=tattrs.data_report,
    )


def _run_units(
    job: ExtractJob,
    loc: Location,
    loaded: Any,
    device: str,
    ray_address: str | None,
    workers: int | None,
    progress: bool,
    desc: str,
) -> int:
    """A format-3 job's pending units: here (this process's model), or fanned out over Ray actors."""
    if ray_address is not None:
        from actstore.store.distributed import extract_on_ray

        del loaded  # each actor loads its own
        return extract_on_ray(job, loc, ray_address, workers, progress, desc)
    worker = UnitWorker(job, loaded=loaded, loc=loc)
    try:
        return run_here(worker, progress, desc)
    finally:
        worker.close()
