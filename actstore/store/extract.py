"""Extract stage: stream a corpus through a model into the store's layer arrays.

Two phases, both streaming and resumable:

1. **Tokenize** the corpus once per tokenizer into the token index
   (``tokenizations/<tk>``): Zarr int arrays plus Parquet tables. A second model
   with the same tokenizer reuses these rows exactly.
2. **Forward** the token rows unit by unit. A *unit* is a run of whole Zarr
   chunks (``unit_rows`` rows); the samples overlapping it are bucketed by
   length, run through one truncated forward pass for all requested layers, and
   the unit's rows are handed to a writer thread that compresses and writes
   whole chunks, then advances each array's ``committed_rows``. Units are
   deterministic, so a killed run restarted with the same command recomputes
   the same batches and ends byte-identical; disjoint units can be written by
   independent workers.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
import zarr.codecs as zc

from actstore.clock import now
from actstore.data.corpora import load_corpus
from actstore.errors import ConfigError, StoreError
from actstore.format import codecs, layout
from actstore.format.layout import ATTR, FORMAT_VERSION, check_name
from actstore.models.loading import auto_device, load_model
from actstore.models.names import default_model_key
from actstore.models.taps import LayerTap, check_layers
from actstore.storage.integrity import update_manifest
from actstore.storage.location import Location, open_location
from actstore.storage.locks import LockSet
from actstore.store.config import ExtractConfig
from actstore.store.tokenize import choose_tokenization
from actstore.version import __version__

SETUP_WAIT_S = 3600.0  # how long an extraction waits for another one creating the store's token index


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
        raise StoreError(f"cannot write to store {loc.url}: {exc}; choose a writable path") from None
    if ATTR not in root.attrs:
        if list(root.group_keys()) or list(root.array_keys()):
            raise StoreError(f"{loc.url} is a Zarr group made by another tool: choose an empty folder for the store")
        root.attrs[ATTR] = {"format": FORMAT_VERSION, "created": now(), "actstore_version": __version__}
    fmt = root.attrs[ATTR].get("format")
    if fmt not in layout.READABLE_FORMATS:
        raise StoreError(f"{loc.url} is store format {fmt}; this actstore writes formats {layout.READABLE_FORMATS}: upgrade it")
    return root


def inner_rows_for(root: zarr.Group, cfg: ExtractConfig, chunk_rows: int) -> int:
    """Rows per inner chunk of new layer arrays: 0 (unsharded) in a format-1 store or with ``inner_rows=0``;
    otherwise ``cfg.inner_rows``, which must divide the store's chunk rows (a shard is ``chunk_rows`` rows)."""
    if root.attrs[ATTR].get("format", 1) < layout.SHARDED_SINCE or not cfg.inner_rows or cfg.inner_rows >= chunk_rows:
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
) -> dict[int, tuple[zarr.Array, zarr.Array | None]]:
    """The layer arrays, opened to resume or created: sharded with ``inner``-row inner chunks (see
    :func:`inner_rows_for`), or unsharded when ``inner`` is 0."""
    out = {}
    for layer in layers:
        name = layout.layer_array(model_key, layer)
        try:
            arr = zarr.open_array(root.store, path=name, mode="r+")
        except FileNotFoundError:
            arr = None
        if arr is not None:
            a = arr.attrs[ATTR]
            if a["codec"] != cfg.codec:
                raise StoreError(
                    f"layer {layer} of model {model_key!r} is already stored with codec {a['codec']}: "
                    f"pass --codec {a['codec']} to resume it, or --name for a new model key"
                )
            scale = None
            if cfg.codec == "int8":
                scale = zarr.open_array(root.store, path=layout.scale_array(model_key, layer), mode="r+")
            out[layer] = (arr, scale)
            continue
        comp = [zc.ZstdCodec(level=1), zc.Crc32cCodec()]
        attrs = {
            ATTR: {
                "layer": layer,
                "d_model": d_model,
                "codec": cfg.codec,
                "stored_dtype": codecs.STORED_DTYPE[cfg.codec],
                "model_key": model_key,
                "tokenization": tk,
                "unit_rows": unit_rows,
                "n_rows": n_rows,
                "committed_rows": 0,
                "complete": False,
                "created": now(),
                "actstore_version": __version__,
                "config": cfg.to_dict(),
            }
        }
        if inner:  # format 2: one shard object per chunk_rows rows, inner chunks of ``inner`` rows, each crc32c'd
            attrs[ATTR]["inner_rows"] = inner
            grid = {"shards": (chunk_rows, d_model), "chunks": (inner, d_model)}
            # the per-token scales: one shard per unit (written whole with it), one inner chunk per chunk_rows
            scale_grid = {"shards": (unit_rows,), "chunks": (chunk_rows,)}
        else:  # format 1 (or --inner-rows 0): one object per chunk
            grid, scale_grid = {"chunks": (chunk_rows, d_model)}, {"chunks": (chunk_rows,)}
        arr = root.create_array(
            name, shape=(n_rows, d_model), dtype=codecs.STORED_DTYPE[cfg.codec], fill_value=0, compressors=comp,
            attributes=attrs, dimension_names=("token", "d_model"), **grid,
        )  # fmt: skip
        scale = None
        if cfg.codec == "int8":
            scale = root.create_array(
                layout.scale_array(model_key, layer), shape=(n_rows,), dtype=codecs.SCALE_DTYPE, fill_value=0,
                compressors=comp, dimension_names=("token",), **scale_grid,
            )  # fmt: skip
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


def _commit(arr: zarr.Array, rows: int, extra: dict[str, Any] | None = None) -> None:
    a = {**arr.attrs[ATTR], **(extra or {})}
    a["committed_rows"] = rows
    a["updated"] = now()
    a["complete"] = rows >= a["n_rows"]
    arr.attrs[ATTR] = a


class _Writer(threading.Thread):
    """Encodes and writes finished units in order, then commits them."""

    def __init__(self, arrays: dict[int, tuple[zarr.Array, zarr.Array | None]], codec: str) -> None:
        super().__init__(daemon=True)
        self.arrays, self.codec = arrays, codec
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is not None:
                continue
            u0, u1, bufs = item
            try:
                extra: dict[int, dict[str, Any]] = {}
                for layer, x in bufs.items():
                    arr, scale = self.arrays[layer]
                    chan = None
                    if self.codec == "int8":
                        stored = arr.attrs[ATTR].get("channel_scale")
                        chan = np.asarray(stored, np.float32) if stored else codecs.channel_scale(x)
                        if not stored:
                            extra[layer] = {"channel_scale": [float(v) for v in chan]}
                    enc = codecs.encode(x, self.codec, chan)
                    arr[u0:u1] = enc.values
                    if scale is not None:
                        scale[u0:u1] = enc.scale
                for layer in bufs:
                    _commit(self.arrays[layer][0], u1, extra.get(layer))
            except BaseException as exc:  # reported by the main thread
                self.error = exc

    def put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def finish(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _forward_unit(
    tap: LayerTap, ids: np.ndarray, starts: np.ndarray, lens: np.ndarray, u0: int, u1: int, layers: list[int],
    d_model: int, batch_size: int, device: str,
) -> dict[int, np.ndarray]:  # fmt: skip
    """Rows ``[u0, u1)`` of every layer, float32 ``(u1 - u0, d_model)``; samples given by absolute ``starts``."""
    bufs = {layer: np.empty((u1 - u0, d_model), dtype=np.float32) for layer in layers}
    base = int(starts[0])
    order = np.argsort(-lens, kind="stable")  # bucket by length: longest first
    cuda = device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    for b0 in range(0, len(order), batch_size):
        sel = order[b0 : b0 + batch_size]
        width = int(lens[sel].max())
        inp = np.zeros((len(sel), width), dtype=np.int64)
        mask = np.zeros((len(sel), width), dtype=np.int64)
        for j, s in enumerate(sel):
            a = int(starts[s]) - base
            inp[j, : lens[s]] = ids[a : a + lens[s]]
            mask[j, : lens[s]] = 1
        with amp:
            hs = tap(torch.from_numpy(inp).to(device, non_blocking=True), torch.from_numpy(mask).to(device, non_blocking=True))
        host = {}
        for layer, t in hs.items():
            t = t.float()
            if cuda:
                pinned = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
                pinned.copy_(t, non_blocking=True)
                host[layer] = pinned
            else:
                host[layer] = t
        if cuda:
            torch.cuda.synchronize()
        for layer in layers:
            h = host[layer].numpy()  # (batch, width, d_model)
            for j, s in enumerate(sel):
                r0, r1 = max(int(starts[s]), u0), min(int(starts[s]) + int(lens[s]), u1)
                if r1 > r0:
                    p0 = r0 - int(starts[s])
                    bufs[layer][r0 - u0 : r1 - u0] = h[j, p0 : p0 + (r1 - r0)]
    return bufs


def extract(
    store: str, cfg: ExtractConfig, progress: bool = True, storage_options: dict[str, Any] | None = None,
    break_lock: bool = False,
) -> ExtractResult:  # fmt: skip
    """Extract ``cfg.layers`` of ``cfg.model`` over ``cfg.data`` into ``store`` (created if needed).

    Each layer array being written is locked (:mod:`actstore.locks`): a second writer of the same array is
    refused with ConcurrencyError, writers of other models/layers proceed. ``break_lock`` takes over locks
    left by a dead writer on another host (a dead writer on this host is detected by its pid).
    """
    held: list[LockSet] = []
    try:
        return _extract(store, cfg, progress, storage_options, break_lock, held)
    finally:
        for locks in held:
            locks.release_all()


def _model_group(loc: Location, root: Any, model_key: str, info: dict[str, Any], tk: str) -> str:
    """The model's group ``models/<key>``, created with the model's identity, or checked to hold the same weights
    and tokenization; returns its key."""
    mpath = layout.model_dir(model_key)
    try:
        old = zarr.open_group(loc.zarr_store, path=mpath, mode="r").attrs.get(ATTR, {})
    except FileNotFoundError:
        root.create_group(mpath, attributes={ATTR: {**info, "key": model_key, "tokenization": tk, "created": now()}})
        return mpath
    if old.get("weights_sha256") != info["weights_sha256"]:
        raise StoreError(
            f"model key {model_key!r} in {loc.url} holds other weights ({old.get('source')}): pass --name for a new key"
        )
    if old.get("tokenization") != tk:
        raise StoreError(f"model key {model_key!r} in {loc.url} uses tokenization {old.get('tokenization')}, not {tk}")
    return mpath


def _unit_rows(loc: Location, cfg: ExtractConfig, model_key: str, layers: list[int], chunk_rows: int, d_model: int) -> int:
    """Rows per unit of work: whole chunks, bounded by the memory budget; an unfinished array keeps its own."""
    for layer in layers:
        try:
            a = zarr.open_array(loc.zarr_store, path=layout.layer_array(model_key, layer), mode="r").attrs[ATTR]
        except FileNotFoundError:
            continue
        if not a.get("complete"):
            return int(a["unit_rows"])
    if cfg.unit_rows:
        return -(-cfg.unit_rows // chunk_rows) * chunk_rows
    per_row = d_model * 4 * len(layers)
    return max(chunk_rows, (cfg.unit_mb * 2**20 // per_row) // chunk_rows * chunk_rows)


class _Units:
    """The token index read once, cut into units of ``unit_rows`` rows: each unit's samples and token ids."""

    def __init__(self, loc: Location, tk: str, n_rows: int, unit_rows: int) -> None:
        tok = zarr.open_group(loc.zarr_store, path=layout.tokenization_dir(tk), mode="r")
        self.first_row = np.asarray(tok["sample_first_row"][:], dtype=np.int64)  # (n_samples,)
        self.n_tok = np.asarray(tok["sample_n_tokens"][:], dtype=np.int64)  # (n_samples,)
        self.token_id = tok["token_id"]
        self.n_rows, self.unit_rows = n_rows, unit_rows

    def bounds(self, start: int) -> Iterator[tuple[int, int]]:
        for u0 in range(start, self.n_rows, self.unit_rows):
            yield u0, min(u0 + self.unit_rows, self.n_rows)

    def samples(self, u0: int, u1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(token ids of the samples overlapping [u0, u1), their first rows, their lengths)``."""
        s_lo = int(np.searchsorted(self.first_row, u0, side="right")) - 1
        s_hi = int(np.searchsorted(self.first_row, u1, side="left"))
        starts, lens = self.first_row[s_lo:s_hi], self.n_tok[s_lo:s_hi]
        ids = np.asarray(self.token_id[int(starts[0]) : int(starts[-1] + lens[-1])], dtype=np.int64)
        return ids, starts, lens


def _forward_units(loaded: Any, cfg: ExtractConfig, arrays: dict[int, Any], todo: list[int], committed: dict[int, int],
                   units: _Units, start: int, device: str, desc: str, progress: bool) -> int:  # fmt: skip
    """Run every unit from ``start`` through the model (only the layers not yet committed there) and hand the
    rows to the background writer; returns the rows written."""
    from tqdm.auto import tqdm

    tap = LayerTap(loaded, todo)
    writer = _Writer(arrays, cfg.codec)
    writer.start()
    written = 0
    bar = tqdm(total=units.n_rows, initial=start, desc=desc, unit="tok", unit_scale=True, disable=not progress)
    try:
        for u0, u1 in units.bounds(start):
            need = [layer for layer in todo if committed[layer] <= u0]
            ids, starts, lens = units.samples(u0, u1)
            bufs = _forward_unit(tap, ids, starts, lens, u0, u1, need, loaded.d_model, cfg.batch_size, device)
            writer.put((u0, u1, bufs))
            written += u1 - u0
            bar.update(u1 - u0)
    finally:
        bar.close()
        writer.finish()
    return written


def _extract(
    store: str, cfg: ExtractConfig, progress: bool, storage_options: dict[str, Any] | None, break_lock: bool,
    held: list[LockSet],
) -> ExtractResult:  # fmt: skip

    t_start = time.perf_counter()
    corpus = load_corpus(cfg.data)
    device = auto_device(cfg.device)
    loaded = load_model(cfg.model, device)
    layers = list(range(loaded.n_layers + 1)) if cfg.layers == "all" else list(cfg.layers)
    check_layers(loaded, layers)
    if cfg.max_length is not None and cfg.max_length > loaded.position_limit:
        raise ConfigError(f"--max-length {cfg.max_length} exceeds what {cfg.model} accepts ({loaded.position_limit})")
    model_key = check_name(cfg.name, "model key (--name)") if cfg.name else default_model_key(cfg.model)

    loc = open_location(store, storage_options=storage_options, create=True)
    locks = LockSet(loc, f"extract {model_key}", break_lock)
    held.append(locks)
    locks.acquire("setup", wait_s=SETUP_WAIT_S)  # root, token index, model group and arrays: one creator at a time
    root = open_root(loc)
    tk, tattrs = choose_tokenization(loc, root, corpus, loaded, cfg.max_length, cfg.chunk_rows, cfg.new_tokenization, progress)
    n_rows, chunk_rows = int(tattrs["n_tokens"]), int(tattrs["chunk_rows"])

    inner = inner_rows_for(root, cfg, chunk_rows)  # checked before anything of this model is written
    mpath = _model_group(loc, root, model_key, loaded.info(), tk)
    _keep_finetune_report(loc, model_key, loaded.path)
    unit_rows = _unit_rows(loc, cfg, model_key, layers, chunk_rows, loaded.d_model)
    arrays = layer_arrays(root, model_key, layers, n_rows, chunk_rows, unit_rows, loaded.d_model, cfg, tk, inner)
    committed = {layer: int(arr.attrs[ATTR]["committed_rows"]) for layer, (arr, _) in arrays.items()}
    todo = [layer for layer in layers if committed[layer] < n_rows]
    locks.acquire_all([layout.layer_array(model_key, layer) for layer in todo])
    locks.release("setup")
    for layer in todo:  # temp files of writes cut short by a kill; their chunks get rewritten below
        loc.remove_partial_writes(layout.layer_array(model_key, layer))
        loc.remove_partial_writes(layout.scale_array(model_key, layer))
    start = min((committed[layer] for layer in todo), default=n_rows)
    written = 0
    if todo:
        units = _Units(loc, tk, n_rows, unit_rows)
        written = _forward_units(loaded, cfg, arrays, todo, committed, units, start, device, f"extract {model_key}", progress)
    update_manifest(loc, prefixes=[layout.ROOT_META, f"{layout.MODELS}/{layout.ROOT_META}", layout.TOKENIZATIONS, mpath])
    secs = time.perf_counter() - t_start
    return ExtractResult(
        store=loc.url, model_key=model_key, layers=layers, tokenization=tk, n_samples=int(tattrs["n_samples"]),
        n_tokens=n_rows, n_truncated=int(tattrs.get("n_truncated", 0)), rows_written=written,
        resumed_from=start if written else n_rows,
        seconds=secs, tokens_per_s=written / secs if secs else 0.0, data_report=tattrs.get("data_report", {}),
    )  # fmt: skip
