"""Exact ablation (``actstore effects``, after attribution): the features with the largest attribution, each set to
zero (or to its mean activation) in the splice and the model run again.

For every ablated feature and class: the mean change of the class's probability over the samples (``delta_prob``),
the change of accuracy (``delta_acc``, when the store has labels the head knows), and, on the attribution's own
target, the summed exact change ``effect`` beside the summed ``attribution``; a decoder LM's rows are the change of
its mean next-token loss (``delta_loss``). Zeroing feature ``j`` changes a target by ``-attribution`` to first
order, so the rank correlation of ``-attribution`` and ``effect`` over the ablated features says how far the
first-order estimate can be trusted (``effects.json``: ``rank_correlation``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from actstore.effects.attribute import (
    Corpus,
    EffectsResult,
    class_sums,
    corpus,
    corpus_batches,
    feature_totals,
    parquet_bytes,
    read_effects,
    read_meta,
    top_features,
)
from actstore.effects.config import EffectsConfig
from actstore.errors import ConfigError
from actstore.format import layout

if TYPE_CHECKING:
    import polars as pl
    import torch

    from actstore.effects.splice import Batch, Edit, HeadModel, Splice
    from actstore.store.reader import Store


@dataclass
class Outputs:
    """What one pass over the ablation samples gives, per sample."""

    probs: np.ndarray | None
    """A classifier's class probabilities ``(n, n_classes)``."""
    target: np.ndarray
    """The attribution's target per sample ``(n, n_targets)`` (one column, or one per class for ``logits``)."""
    loss: np.ndarray | None
    """A decoder LM's summed next-token loss ``(n,)``."""
    n_tokens: np.ndarray | None
    """A decoder LM's predicted tokens per sample ``(n,)``."""


def _outputs(head: HeadModel, cfg: EffectsConfig, out: torch.Tensor, batch: Any, labels: np.ndarray | None,
             fixed: torch.Tensor | None) -> tuple[Any, ...]:  # fmt: skip
    """One batch's part of :class:`Outputs` from the head's output."""
    import torch

    from actstore.effects.splice import lm_losses, targets

    if head.kind == "lm":
        loss = lm_losses(out, batch).cpu().numpy()
        return None, loss[:, None], loss, batch.attention_mask[:, 1:].sum(1).cpu().numpy()
    if cfg.target == "predicted" and fixed is not None:
        tgt = out.log_softmax(-1).gather(1, fixed[:, None])
    else:
        tgt = torch.stack([v for _, v in targets(head, out, batch, cfg.target, labels)], 1)
    return out.softmax(-1).cpu().numpy(), tgt.cpu().numpy(), None, None


class _Collect:
    """:class:`Outputs` of one pass, filled batch by batch into arrays allocated once: many small arrays kept
    between a forward pass's large temporaries fragment the heap (RSS grew ~1 MB per sample over 800 IMDb samples
    of ablations before)."""

    def __init__(self, head: HeadModel, cfg: EffectsConfig, n: int) -> None:
        c = len(head.classes)
        lm = head.kind == "lm"
        self.probs = None if lm else np.zeros((n, c), dtype=np.float32)
        self.target = np.zeros((n, c if cfg.target == "logits" and not lm else 1), dtype=np.float64)
        self.loss = np.zeros(n, dtype=np.float64) if lm else None
        self.n_tokens = np.zeros(n, dtype=np.int64) if lm else None

    def put(self, at: np.ndarray, part: tuple[Any, ...]) -> None:
        for dest, value in zip(
            (self.probs, self.target, self.loss, self.n_tokens), part, strict=True
        ):
            if dest is not None:
                dest[at] = value

    def outputs(self) -> Outputs:
        return Outputs(self.probs, self.target, self.loss, self.n_tokens)


class PerBatch(NamedTuple):
    """An edit that depends on the batch (patching: each token's value from another model's rows)."""

    make: Callable[[Batch], Edit]


def run_passes(store: Store, head: HeadModel, splice: Splice, cp: Corpus, cfg: EffectsConfig, device: str,
               edits: list[Edit | PerBatch]) -> list[Outputs]:  # fmt: skip
    """The clean run, then one run per edit, over ``cp``. Batch by batch: the clean run records what the blocks
    below the splice output, and each edited run replays it, computing only the splice and the layers above it.
    An edited run's ``--target predicted`` keeps each sample's clean predicted class (the same function of the
    output)."""
    from actstore.effects.splice import BelowSplice, logits

    below = BelowSplice(head, splice.layer)
    runs = [_Collect(head, cfg, len(cp.samples)) for _ in range(len(edits) + 1)]
    tk = splice.sae.cfg.tokenization
    for at, batch, labels in corpus_batches(store, tk, cp, head.pad_id, cfg.batch_size, device):
        with below.record(), splice(batch=batch):
            out = logits(head, batch)
        runs[0].put(at, _outputs(head, cfg, out, batch, labels, None))
        fixed = out.argmax(-1) if head.kind == "classifier" else None
        with below.replay():
            for n, edit in enumerate(edits):
                with splice(
                    edit=edit.make(batch) if isinstance(edit, PerBatch) else edit, batch=batch
                ):
                    runs[n + 1].put(
                        at, _outputs(head, cfg, logits(head, batch), batch, labels, fixed)
                    )
    return [r.outputs() for r in runs]


def run_pass(store: Store, head: HeadModel, splice: Splice, cp: Corpus, cfg: EffectsConfig, device: str,
             edit: Edit | None) -> Outputs:  # fmt: skip
    """The spliced model over ``cp`` with ``edit`` (None: the clean run), every layer computed."""
    from actstore.effects.splice import logits

    run = _Collect(head, cfg, len(cp.samples))
    tk = splice.sae.cfg.tokenization
    for at, batch, labels in corpus_batches(store, tk, cp, head.pad_id, cfg.batch_size, device):
        with splice(edit=edit, batch=batch):
            run.put(at, _outputs(head, cfg, logits(head, batch), batch, labels, None))
    return run.outputs()


def set_feature(feature: int, value: float | torch.Tensor) -> Edit:
    """Set ``feature`` to ``value`` at every token (a number, or one per token ``(b, seq)``)."""
    import torch

    def edit(acts: torch.Tensor) -> torch.Tensor:
        out = acts.clone()
        out[..., feature] = value.to(out.dtype) if isinstance(value, torch.Tensor) else value
        return out

    return edit


def other_latents(
    store: Store, splice: Splice, key: str, device: str
) -> Callable[[Batch], torch.Tensor]:
    """The SAE's latents ``(b, seq, d_sae)`` of model ``key``'s stored rows (the splice's layer) of each batch's
    samples, the same tokens as the batch's (what ``--ablate-mode patch`` sets a feature to); one clear error when
    the store cannot give them."""
    import torch

    c = splice.sae.cfg
    if key not in store.model_keys():
        raise ConfigError(
            f"--patch-from {key!r}: store {store.url} has no such model ({', '.join(store.model_keys())})"
        )
    tk = store.model_info(key).tokenization
    if c.tokenization and tk != c.tokenization:
        raise ConfigError(f"--patch-from {key!r} uses tokenization {tk}, SAE {c.name!r} {c.tokenization}: "
                          "their token rows differ")  # fmt: skip
    if splice.layer not in store.layers(key):
        raise ConfigError(
            f"--patch-from {key!r} has no layer {splice.layer} in {store.url}: extract it"
        )
    acts = store.activations(key, splice.layer)
    if acts.d_model != c.d_in:
        raise ConfigError(
            f"--patch-from {key!r} layer {splice.layer} is {acts.d_model} wide, the SAE reads {c.d_in}"
        )
    from actstore.effects.splice import stored_rows

    first, _ = store.tokenization(c.tokenization).sample_rows()
    memo: dict[str, Any] = {}

    def latents(batch: Batch) -> torch.Tensor:
        if memo.get("batch") is batch:
            return memo["v"]
        b, seq = batch.input_ids.shape
        x = torch.zeros(b, seq, c.d_in)
        stored_rows(acts, first, batch, x)
        with torch.no_grad():
            v = splice.sae.encode(x.reshape(-1, c.d_in).to(device)).reshape(b, seq, -1)
        memo.update(batch=batch, v=v)
        return v

    return latents


def patch_source(cfg: EffectsConfig, head: HeadModel, splice: Splice) -> str:
    """The store model ``--ablate-mode patch`` reads: ``--patch-from``, else the SAE's own model when it is spliced
    into another."""
    own = str(splice.sae.cfg.model)
    if cfg.patch_from:
        return cfg.patch_from
    if own == head.key:
        raise ConfigError(
            f"--ablate-mode patch needs --patch-from MODEL: SAE {cfg.sae!r} is of {head.key}, the model it is spliced "
            "into"
        )
    return own


def check_ablations(
    store: Store, cfg: EffectsConfig, head: HeadModel, splice: Splice, device: str
) -> None:
    """What the ablations will need, checked before any attribution is written (one line each)."""
    d_sae = splice.sae.cfg.d_sae
    bad = [f for f in cfg.ablate_features or [] if f >= d_sae]
    if bad:
        raise ConfigError(
            f"--ablate-features {bad[0]} is not a feature of SAE {cfg.sae!r} (0..{d_sae - 1})"
        )
    if cfg.ablate_mode == "patch":
        other_latents(store, splice, patch_source(cfg, head, splice), device)


def patch(feature: int, latents: Callable[[Batch], torch.Tensor]) -> PerBatch:
    """Set ``feature`` at each token to its value in ``latents`` (:func:`other_latents`)."""

    return PerBatch(lambda batch: set_feature(feature, latents(batch)[..., feature]))


def ablation_rows(head: HeadModel, cfg: EffectsConfig, cp: Corpus, clean: Outputs, abl: Outputs, feature: int,
                  attribution: dict[str, float], true: np.ndarray | None) -> list[dict[str, Any]]:  # fmt: skip
    """The table's rows of one ablated feature (module docstring)."""
    n = len(cp.samples)
    if head.kind == "lm":
        assert abl.loss is not None and clean.loss is not None and clean.n_tokens is not None
        d_loss = float((abl.loss - clean.loss).sum() / max(int(clean.n_tokens.sum()), 1))
        return [{"feature": feature, "mode": cfg.ablate_mode, "class": head.classes[0], "delta_prob": None,
                 "delta_acc": None, "delta_loss": d_loss, "n": n, "attribution": attribution.get(head.classes[0], 0.0),
                 "effect": float((abl.loss - clean.loss).sum())}]  # fmt: skip
    assert abl.probs is not None and clean.probs is not None
    d_acc = None
    if true is not None:
        d_acc = float((abl.probs.argmax(1) == true).mean() - (clean.probs.argmax(1) == true).mean())
    d_tgt = (abl.target - clean.target).sum(0)  # (n_targets,)
    rows = []
    for c, name in enumerate(head.classes):
        col = c if cfg.target == "logits" else 0
        rows.append({"feature": feature, "mode": cfg.ablate_mode, "class": name,
                     "delta_prob": float((abl.probs[:, c] - clean.probs[:, c]).mean()), "delta_acc": d_acc,
                     "delta_loss": None, "n": n,
                     "attribution": attribution.get(name if cfg.target == "logits" else "*", 0.0),
                     "effect": float(d_tgt[col])})  # fmt: skip
    return rows


def sample_rows(head: HeadModel, cfg: EffectsConfig, cp: Corpus, clean: Outputs, ablated: list[Outputs],
                feats: list[int]) -> pl.DataFrame:  # fmt: skip
    """Per ablated feature and sample: the change of the target (summed over classes for ``logits``), and a
    classifier's prediction before and after (``ablation_samples.parquet``)."""
    import polars as pl

    n = len(cp.samples)
    cols: dict[str, Any] = {"feature": np.repeat(np.asarray(feats, dtype=np.int32), n),
                            "sample": np.tile(cp.samples.astype(np.int64), len(feats)),
                            "delta": np.concatenate([(a.target - clean.target).sum(1) for a in ablated])}  # fmt: skip
    if head.kind == "classifier" and clean.probs is not None:
        names = np.asarray(head.classes, dtype=object)
        cols["predicted"] = np.tile(names[clean.probs.argmax(1)].astype(str), len(feats))
        cols["predicted_ablated"] = np.concatenate([names[a.probs.argmax(1)].astype(str) for a in ablated
                                                    if a.probs is not None])  # fmt: skip
    else:
        cols["predicted"] = cols["predicted_ablated"] = np.full(n * len(feats), None)
    return pl.DataFrame(cols, schema={"feature": pl.Int32, "sample": pl.Int64, "delta": pl.Float64,
                                      "predicted": pl.String, "predicted_ablated": pl.String}).with_columns(
        pl.lit(cfg.ablate_mode).alias("mode"))  # fmt: skip


def rank_correlation(rows: pl.DataFrame) -> float | None:
    """Spearman's rho of ``-attribution`` and ``effect`` over the ablated features (zero ablation; for ``logits``
    the mean over classes), or None when it is undefined."""
    from scipy.stats import spearmanr

    rhos = []
    for _, g in rows.group_by("class"):
        x, y = -g["attribution"].to_numpy(), g["effect"].to_numpy()
        if len(g) >= 3 and np.std(x) > 0 and np.std(y) > 0:
            rhos.append(float(spearmanr(x, y).statistic))
    return float(np.mean(rhos)) if rhos else None


def run_ablations(store: Store, cfg: EffectsConfig, head: HeadModel, splice: Splice, device: str,
                  res: EffectsResult) -> dict[str, Any]:  # fmt: skip
    """Ablate ``--ablate-top`` features and ``--ablate-features`` (checked beforehand: :func:`check_ablations`);
    write ``ablations.parquet`` and add the summary to ``effects.json``; the summary."""
    import polars as pl
    import torch

    from actstore.storage.integrity import update_manifest

    top = top_features(
        feature_totals(store, cfg.sae, head.key, splice.sae.cfg.d_sae), cfg.ablate_top
    )
    feats = list(dict.fromkeys(top + list(cfg.ablate_features or [])))
    if not feats:
        return {}
    meta = read_meta(store, cfg.sae, head.key)
    ident = {"features": feats, "mode": cfg.ablate_mode, "ablate_samples": cfg.ablate_samples,
             "patch_from": cfg.patch_from}  # fmt: skip
    done = meta.get("ablation")
    done = done if isinstance(done, dict) else {}
    table_key = layout.effects_file(cfg.sae, head.key, layout.ABLATIONS_TABLE)
    if done.get("identity") == ident and store.loc.exists(table_key):
        return done  # the same ablations, already measured
    cp = corpus(store, splice.sae.cfg.tokenization, cfg, head)
    if cfg.ablate_samples:
        keep = slice(0, cfg.ablate_samples)
        cp = Corpus(
            cp.samples[keep],
            None if cp.labels is None else cp.labels[keep],
            cp.first[keep],
            cp.n_tokens[keep],
        )
    # the attribution rows carry each sample's predicted class or label: pooled unless --target logits
    by_class = cfg.target == "logits" or head.kind != "classifier"
    sums = class_sums(store, cfg.sae, head.key, feats, cp.samples, by_class)
    means = {int(k): float(v) for k, v in res.feature_mean.items()}
    edits: list[Edit | PerBatch]
    if cfg.ablate_mode == "patch":
        values = other_latents(store, splice, patch_source(cfg, head, splice), device)
        edits = [patch(j, values) for j in feats]
    else:
        edits = [
            set_feature(j, means.get(j, 0.0) if cfg.ablate_mode == "mean" else 0.0) for j in feats
        ]
    with torch.no_grad():
        clean, *ablated = run_passes(store, head, splice, cp, cfg, device, edits)
    rows = []
    for j, abl in zip(feats, ablated, strict=True):
        rows += ablation_rows(head, cfg, cp, clean, abl, j, sums[j], cp.labels)
    df = pl.DataFrame(rows, schema={"feature": pl.Int32, "mode": pl.String, "class": pl.String, "delta_prob": pl.Float64,
                                    "delta_acc": pl.Float64, "delta_loss": pl.Float64, "n": pl.Int64,
                                    "attribution": pl.Float64, "effect": pl.Float64})  # fmt: skip
    folder = layout.effects_dir(cfg.sae, head.key)
    store.loc.write_bytes(table_key, parquet_bytes(df))
    per_sample = sample_rows(head, cfg, cp, clean, ablated, feats)
    store.loc.write_bytes(
        layout.effects_file(cfg.sae, head.key, layout.ABLATION_SAMPLES), parquet_bytes(per_sample)
    )
    rho = rank_correlation(df) if cfg.ablate_mode == "zero" else None
    summary = {
        "features": feats,
        "mode": cfg.ablate_mode,
        "n_samples": len(cp.samples),
        "rank_correlation": rho,
        "identity": ident,
    }
    meta_key = layout.effects_file(cfg.sae, head.key, layout.EFFECTS_META)
    store.loc.write_bytes(meta_key, json.dumps({**meta, "ablation": summary}, default=str).encode())
    update_manifest(store.loc, prefixes=[folder])
    return summary


def read_ablations(store: Store, sae: str, model: str) -> pl.DataFrame:
    """The ablation table of ``sae`` on ``model``."""
    return read_effects(store, sae, model, layout.ABLATIONS_TABLE)
