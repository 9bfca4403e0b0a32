"""Attribution over a corpus (``actstore effects``): each active feature's first-order effect on the model's output,
per sample, out of core.

For each sample ``s``, feature ``j`` and target ``m`` (:func:`actstore.effects.splice.targets`) the attribution is
``sum_t a[s, t, j] * dm/da[s, t, j]``: the activation times the gradient, summed over the sample's tokens, with the
SAE spliced in and its error added back (:class:`~actstore.effects.splice.Splice`) — the first-order estimate of
how much ``m`` drops when the feature is zeroed (ablation measures it exactly: :mod:`actstore.effects.ablate`).
The forward pass below the splice builds no graph; the backward pass runs through the layers above it.

Samples are read from the store's token index in store order, ``part_samples`` at a time; each finished block is a
Parquet part under ``saes/<sae>/effects/<model>/parts/``, so a killed run resumes from its last part. When every
block is done the parts become one table sorted by feature (``effects.parquet``: ``sample, feature, class,
attribution, activation``, a feature's rows in a few row groups) and ``effects.json`` records the run. One writer at
a time (a store lock on the folder).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.clock import now
from actstore.effects.config import EffectsConfig
from actstore.errors import ConfigError
from actstore.format import layout

if TYPE_CHECKING:
    import polars as pl

    from actstore.effects.splice import Batch, HeadModel, Splice
    from actstore.store.reader import Store

BUCKET_ROWS = 4_000_000
"""Rows sorted in memory at once when the parts become one table (a feature-range bucket; ~120 MB)."""
ROW_GROUP_ROWS = 65_536
"""Rows per row group of ``effects.parquet`` (it is sorted by feature: a lookup of one feature reads a few)."""


@dataclass
class Corpus:
    """The samples attributed, in store order, with what each needs."""

    samples: np.ndarray
    """``(n,)`` sample ids."""
    labels: np.ndarray | None
    """``(n,)`` class index of each sample's label in a classifier's classes; None unless every sample has one
    (``--target label`` requires it)."""
    first: np.ndarray
    """``(n,)`` first token row of each sample."""
    n_tokens: np.ndarray
    """``(n,)`` tokens of each sample."""


@dataclass
class EffectsResult:
    """What a run did (also ``effects.json``)."""

    sae: str
    model: str
    layer: int
    target: str
    n_samples: int
    n_rows: int
    """Rows of ``effects.parquet`` (sample, active feature, class)."""
    seconds: float
    """Attribution time of this run (0 when the table was already complete)."""
    samples_per_s: float
    feature_mean: dict[int, float] = field(default_factory=dict)
    """Mean activation over the attributed tokens, of the features ablation may set to their mean."""
    config: dict[str, Any] = field(default_factory=dict)


def corpus(store: Store, tokenization: str | None, cfg: EffectsConfig, head: HeadModel) -> Corpus:
    """The samples to attribute (the first ``max_samples`` in store order; for ``--target label`` those with a
    label), and their labels as class indices where the classifier knows every one."""
    smp = store.samples(tokenization).sort("sample")
    if cfg.max_samples:
        smp = smp.head(cfg.max_samples)
    if smp.height == 0:
        raise ConfigError(f"store {store.url} has no samples to attribute")
    first, n_tok = store.tokenization(tokenization).sample_rows()
    labels = None
    index = {c: i for i, c in enumerate(head.classes)}
    if cfg.target == "label" and head.kind == "classifier":
        smp = smp.drop_nulls("label")
        if smp.height == 0:
            raise ConfigError(
                f"store {store.url} has no labels: --target label needs them (or use --target predicted)"
            )
        raw = [str(v) for v in smp["label"].to_list()]
        unknown = sorted({v for v in raw if v not in index}, key=str)
        if unknown:
            raise ConfigError(
                f"label {unknown[0]!r} of {store.url} is not one of model {head.key!r}'s classes "
                f"({', '.join(head.classes)}): --target label needs the labels the head was trained on"
            )
        labels = np.asarray([index[v] for v in raw], dtype=np.int64)
    elif head.kind == "classifier":
        known = [None if v is None else index.get(str(v)) for v in smp["label"].to_list()]
        labels = np.asarray(known, dtype=np.int64) if None not in known else None
    ids = smp["sample"].to_numpy().astype(np.int64)  # after any sample without a label is dropped
    return Corpus(ids, labels, first[ids], n_tok[ids])


def corpus_batches(
    store: Store, tokenization: str | None, cp: Corpus, pad_id: int, batch_size: int, device: str,
    order: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, Batch, np.ndarray | None]]:  # fmt: skip
    """``(indices into cp, batch, labels or None)`` of the corpus's samples ``batch_size`` at a time, in ``order``
    (indices into ``cp``; default: corpus order), their stored token ids right-padded."""
    from actstore.effects.splice import make_batch

    tk = store.tokenization(tokenization)
    order = np.arange(len(cp.samples)) if order is None else order
    for a in range(0, len(order), batch_size):
        idx = order[a : a + batch_size]
        seqs = [tk.token_ids(int(cp.first[i]), int(cp.first[i] + cp.n_tokens[i])) for i in idx]
        batch = make_batch(seqs, cp.samples[idx], pad_id, device)
        yield idx, batch, (cp.labels[idx] if cp.labels is not None else None)


def attribute_batch(
    head: HeadModel, splice: Splice, batch: Any, target: str, labels: np.ndarray | None
) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
    """One batch's attribution rows ``{column: [array]}`` and its latent sums ``(d_sae,)`` over real tokens."""
    import torch

    from actstore.effects.splice import logits, target_classes, targets

    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("sample", "feature", "class", "attribution", "activation")
    }
    with splice(grad=True, batch=batch):
        out = logits(head, batch)
    acts = splice.acts
    assert acts is not None
    mask = batch.attention_mask.unsqueeze(-1).to(acts.dtype)  # (b, seq, 1)
    act_sum = (acts.detach() * mask).sum(1)  # (b, d_sae)
    b_idx, f_idx = torch.nonzero(act_sum > 0, as_tuple=True)
    tgts = targets(head, out, batch, target, labels)
    per_sample = target_classes(head, out, target, labels) if tgts[0][0] == "*" else None
    for n, (cls, values) in enumerate(tgts):
        (grad,) = torch.autograd.grad(values.sum(), acts, retain_graph=n < len(tgts) - 1)
        attr = (acts.detach() * grad * mask).sum(1)  # (b, d_sae)
        cols["sample"].append(batch.samples[b_idx.cpu().numpy()])
        cols["feature"].append(f_idx.cpu().numpy().astype(np.int32))
        names = (
            np.asarray(per_sample, dtype=object)[b_idx.cpu().numpy()]
            if per_sample
            else np.full(len(b_idx), cls, dtype=object)
        )
        cols["class"].append(names)
        cols["attribution"].append(attr[b_idx, f_idx].float().cpu().numpy())
        cols["activation"].append(act_sum[b_idx, f_idx].float().cpu().numpy())
    return cols, act_sum.sum(0).float().cpu().numpy()


def _frame(cols: dict[str, list[np.ndarray]]) -> pl.DataFrame:
    import polars as pl

    return pl.DataFrame({
        "sample": np.concatenate(cols["sample"]).astype(np.int64),
        "feature": np.concatenate(cols["feature"]).astype(np.int32),
        "class": pl.Series(np.concatenate(cols["class"]).astype(str), dtype=pl.String),
        "attribution": np.concatenate(cols["attribution"]).astype(np.float32),
        "activation": np.concatenate(cols["activation"]).astype(np.float32),
    })  # fmt: skip


def parquet_bytes(df: pl.DataFrame, row_group_size: int = ROW_GROUP_ROWS) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf, row_group_size=row_group_size, statistics=True)
    return buf.getvalue()


def attribute_block(
    store: Store,
    head: HeadModel,
    splice: Splice,
    cp: Corpus,
    lo: int,
    hi: int,
    cfg: EffectsConfig,
    device: str,
) -> tuple[pl.DataFrame, np.ndarray]:
    """Samples ``lo:hi`` of the corpus (longest first within the block, to pad little): their rows, and the sum
    of each latent over their tokens ``(d_sae,)``."""
    order = lo + np.argsort(-cp.n_tokens[lo:hi], kind="stable")
    cols: dict[str, list[np.ndarray]] = {}
    sums = np.zeros(splice.sae.cfg.d_sae, dtype=np.float64)
    batches = corpus_batches(
        store, splice.sae.cfg.tokenization, cp, head.pad_id, cfg.batch_size, device, order
    )
    for _, batch, labels in batches:
        part, s = attribute_batch(head, splice, batch, cfg.target, labels)
        for k, v in part.items():
            cols.setdefault(k, []).extend(v)
        sums += s
    return _frame(cols), sums


# ---------------------------------------------------------------- the run
def read_meta(store: Store, sae: str, model: str) -> dict[str, Any]:
    """``effects.json`` of ``sae`` on ``model`` (``{}`` when absent or not a JSON object: a hostile store's is data,
    never trusted further than its type)."""
    key = layout.effects_file(sae, model, layout.EFFECTS_META)
    if not store.loc.exists(key):
        return {}
    try:
        out = json.loads(store.loc.read_bytes(key))
    except (ValueError, RecursionError):
        return {}
    return out if isinstance(out, dict) else {}


def _parts(store: Store, sae: str, model: str) -> dict[int, str]:
    """``{first sample index: key}`` of the finished parts."""
    base = f"{layout.effects_dir(sae, model)}/{layout.EFFECTS_PARTS}"
    out = {}
    for key in store.loc.walk(base):
        first = layout.parse_effects_part(key.rsplit("/", 1)[-1])
        if first is not None:
            out[first] = key
    return out


def run_attribution(
    store: Store,
    cfg: EffectsConfig,
    head: HeadModel,
    splice: Splice,
    device: str,
    progress: bool = False,
) -> EffectsResult:
    """Attribute every block of the corpus not yet done, then write the sorted table (module docstring); the
    caller holds the folder's lock."""
    from tqdm.auto import tqdm

    from actstore.storage.integrity import update_manifest

    sae, key = cfg.sae, head.key
    folder = layout.effects_dir(sae, key)
    ident = {**cfg.identity(), "model": key}
    meta = read_meta(store, sae, key)
    if cfg.overwrite:
        store.loc.rmtree(folder)
        meta = {}
    elif meta and meta.get("identity") != ident:
        raise ConfigError(
            f"{folder} holds effects computed with other settings ({meta.get('identity')}): pass --overwrite "
            "to recompute them"
        )
    if meta.get("complete") and store.loc.exists(
        layout.effects_file(sae, key, layout.EFFECTS_TABLE)
    ):
        return EffectsResult(
            **{k: v for k, v in meta["result"].items() if k in EffectsResult.__dataclass_fields__}
        )
    cp = corpus(store, splice.sae.cfg.tokenization, cfg, head)
    store.loc.write_bytes(layout.effects_file(sae, key, layout.EFFECTS_META),
                          json.dumps({"identity": ident, "complete": False}).encode())  # fmt: skip
    parts = _parts(store, sae, key)
    sums_key = f"{folder}/{layout.EFFECTS_PARTS}/sums.npy"
    sums = np.zeros(splice.sae.cfg.d_sae, dtype=np.float64)
    if parts and store.loc.exists(sums_key):
        sums = np.load(io.BytesIO(store.loc.read_bytes(sums_key)), allow_pickle=False)
    t0, n_done = time.perf_counter(), 0
    blocks = range(0, len(cp.samples), cfg.part_samples)
    bar = tqdm(
        total=len(cp.samples),
        desc=f"effects {sae}",
        unit=" samples",
        disable=not progress,
        leave=False,
    )
    for lo in blocks:
        hi = min(lo + cfg.part_samples, len(cp.samples))
        if lo in parts:
            bar.update(hi - lo)
            continue
        df, s = attribute_block(store, head, splice, cp, lo, hi, cfg, device)
        sums += s
        buf = io.BytesIO()
        np.save(buf, sums, allow_pickle=False)
        # the sums first: a part on disk always has its tokens counted
        store.loc.write_bytes(sums_key, buf.getvalue())
        store.loc.write_bytes(
            layout.effects_part(sae, key, lo), parquet_bytes(df.sort("sample", "feature"))
        )
        n_done += hi - lo
        bar.update(hi - lo)
    bar.close()
    seconds = time.perf_counter() - t0
    parts = _parts(store, sae, key)
    n_rows = sort_parts(store, [parts[p] for p in sorted(parts)], layout.effects_file(sae, key, layout.EFFECTS_TABLE),
                        splice.sae.cfg.d_sae)  # fmt: skip
    n_tokens = int(cp.n_tokens.sum())
    res = EffectsResult(
        sae=sae, model=key, layer=splice.layer, target=cfg.target if head.kind == "classifier" else "loss",
        n_samples=len(cp.samples), n_rows=n_rows, seconds=seconds,
        samples_per_s=n_done / seconds if seconds > 0 else 0.0,
        feature_mean={int(j): float(sums[j] / n_tokens) for j in np.flatnonzero(sums)}, config=asdict(cfg),
    )  # fmt: skip
    store.loc.write_bytes(layout.effects_file(sae, key, layout.EFFECTS_META), json.dumps(
        {"identity": ident, "complete": True, "result": res.__dict__, "created": now()}, default=str).encode())  # fmt: skip
    store.loc.rmtree(f"{folder}/{layout.EFFECTS_PARTS}")
    update_manifest(store.loc, prefixes=[folder])
    return res


def sort_parts(
    store: Store, keys: list[str], out: str, d_sae: int, bucket_rows: int = BUCKET_ROWS
) -> int:
    """Write the rows of the part files ``keys`` to ``out`` sorted by feature, class and sample, out of core:
    each part is split into feature-range buckets of about ``bucket_rows`` rows on local disk, then each bucket is
    sorted and appended (memory: one part, then one bucket). The rows written."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    def read(key: str) -> pa.Table:
        with store.loc.open_input(key) as f:
            return pq.read_table(f)

    if not keys:
        raise ConfigError(f"no attribution parts to sort into {out}")
    n_total, schema = 0, None
    for key in keys:  # the footers only
        with store.loc.open_input(key) as f:
            pf = pq.ParquetFile(f)
            n_total += pf.metadata.num_rows
            schema = schema or pf.schema_arrow
    n_buckets = max(1, -(-n_total // bucket_rows))
    edges = (
        np.linspace(0, d_sae, n_buckets + 1).round().astype(np.int64)
    )  # (n_buckets + 1,) feature bounds
    order = [("feature", "ascending"), ("class", "ascending"), ("sample", "ascending")]
    with tempfile.TemporaryDirectory(prefix="actstore-effects-") as tmp:
        # one bucket: the parts themselves, read once each while writing
        spilled: list[list[str]] = (
            [list(keys)] if n_buckets == 1 else [[] for _ in range(n_buckets)]
        )
        for j, key in enumerate(keys if n_buckets > 1 else []):
            t = read(key)
            bucket = (
                np.searchsorted(edges, t.column("feature").to_numpy(), side="right") - 1
            )  # (rows,)
            for i in np.unique(bucket):
                path = f"{tmp}/{i}-{j}.parquet"
                pq.write_table(t.take(np.flatnonzero(bucket == i)), path)
                spilled[int(i)].append(path)
        with store.loc.open_output(out) as f, pq.ParquetWriter(f, schema) as w:
            for files in spilled:
                if not files:
                    continue
                tables = [read(x) if n_buckets == 1 else pq.read_table(x) for x in files]
                w.write_table(
                    pa.concat_tables(tables).sort_by(order), row_group_size=ROW_GROUP_ROWS
                )
    return n_total


def table_key(store: Store, sae: str, model: str, file: str = layout.EFFECTS_TABLE) -> str:
    """The key of a finished table of ``sae`` on ``model`` (:data:`layout.EFFECTS_TABLE`, ``ABLATIONS_TABLE``, ...),
    or one clear error when there is none."""
    key = layout.effects_file(sae, model, file)
    if not store.loc.exists(key):
        raise ConfigError(
            f"no {file} of SAE {sae!r} on model {model!r} in {store.url}: run actstore effects"
        )
    return key


def effect_batches(store: Store, sae: str, model: str, columns: list[str]) -> Iterator[Any]:
    """The finished attribution table of ``sae`` on ``model``, one row group (a pyarrow table) at a time."""
    import pyarrow.parquet as pq

    with store.loc.open_input(table_key(store, sae, model)) as f:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            yield pf.read_row_group(g, columns=columns)


def feature_totals(store: Store, sae: str, model: str, d_sae: int) -> np.ndarray:
    """Each feature's summed |attribution| over samples and classes ``(d_sae,)`` float64, read a row group at a
    time."""
    tot = np.zeros(d_sae, dtype=np.float64)
    for t in effect_batches(store, sae, model, ["feature", "attribution"]):
        np.add.at(tot, t.column("feature").to_numpy(), np.abs(t.column("attribution").to_numpy()))
    return tot


def class_sums(store: Store, sae: str, model: str, features: list[int], samples: np.ndarray,
               by_class: bool) -> dict[int, dict[str, float]]:  # fmt: skip
    """``{feature: {class: summed attribution}}`` of ``features`` over ``samples`` (classes pooled as ``"*"``
    unless ``by_class``), read a row group at a time."""
    out: dict[int, dict[str, float]] = {int(f): {} for f in features}
    want = np.asarray(sorted(out), dtype=np.int64)
    keep_samples = np.unique(samples)
    for t in effect_batches(store, sae, model, ["sample", "feature", "class", "attribution"]):
        f = t.column("feature").to_numpy()
        m = np.isin(f, want) & np.isin(t.column("sample").to_numpy(), keep_samples)
        if not m.any():
            continue
        idx = np.flatnonzero(m)
        cls = t.column("class").to_numpy(zero_copy_only=False)[idx] if by_class else None
        for n, (feat, a) in enumerate(
            zip(f[idx], t.column("attribution").to_numpy()[idx], strict=True)
        ):
            c = str(cls[n]) if cls is not None else "*"
            out[int(feat)][c] = out[int(feat)].get(c, 0.0) + float(a)
    return out


def read_effects(
    store: Store, sae: str, model: str, file: str = layout.EFFECTS_TABLE
) -> pl.DataFrame:
    """A finished table of ``sae`` on ``model`` (the attribution table unless ``file`` says which), whole: for small
    tables (:func:`effect_batches` streams the attribution table)."""
    import polars as pl

    return pl.read_parquet(io.BytesIO(store.loc.read_bytes(table_key(store, sae, model, file))))


def top_features(totals: np.ndarray, n: int) -> list[int]:
    """The ``n`` features with the largest total |attribution| (:func:`feature_totals`), ties by feature."""
    order = np.lexsort((np.arange(len(totals)), -totals))
    return [int(f) for f in order[:n] if totals[f] > 0]
