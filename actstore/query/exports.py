"""Feature tables out to other tools, built from the feature Parquet and the token index (no model re-run).

**delphi** (EleutherAI's auto-interpretation; the layout its ``LatentDataset`` reads, as ``LatentCache.save_splits``
and ``save_config`` write it)::

    OUT/<hookpoint>/<start>_<end>.safetensors   locations (n, 3) uint16|uint32: (sample, position, latent - start)
                                                activations (n,) float16; tokens (n_samples, ctx_len) int64
    OUT/<hookpoint>/config.json                 delphi's CacheConfig fields + model_name (+ "actstore": provenance)

``<hookpoint>`` is sparsify's / delphi's name of the residual stream actstore stored: ``layers.N`` for
``hidden_states[N + 1]`` (the output of block N), ``embed_tokens`` for ``hidden_states[0]``. Latent ranges are
delphi's (``linspace(0, d_sae, n_splits + 1)``, ``end`` inclusive); ``tokens`` holds every sample padded to the
longest (rounded up to a multiple of 32, delphi's example length) with the vocabulary's pad token (``config.json``
names it), so (sample, position) points at the token.

**neuronpedia** (the ``batch-N.json`` files SAEDashboard's NeuronpediaRunner writes and Neuronpedia's
``convert-saedashboard-to-neuronpedia-export.py`` reads)::

    OUT/batch-<i>.json   {"model_id", "layer", "sae_set", "sae_id_suffix", "features": [...]}

each feature with ``feature_index``, ``frac_nonzero``, the activation histogram (``freq_hist_data_bar_heights`` counts,
``freq_hist_data_bar_values`` bin centres, over its non-zero values), and ``activations``: its top contexts, each the
token strings of a window of its sample with the feature's value at every token, ``qualifying_token_index`` (the top
token's place in the window) and ``bin_min = bin_max = bin_contains = -1`` (the top-activations group). Fields
that need the model's unembedding or neurons (logit effects, neuron alignment, correlations) are empty lists.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from actstore.errors import ConfigError
from actstore.query.config import FeatureExportConfig
from actstore.query.lookups import token_context
from actstore.query.tables import FeatureTable, lazy_feature_stats, lazy_features, resolve_sae
from actstore.storage.files import output_folder, write_file

if TYPE_CHECKING:
    from actstore.store.reader import Store

PAD_TOKENS = ("[PAD]", "<pad>", "<|endoftext|>", "</s>", "<|pad|>")
DELPHI_CTX_MULTIPLE = 32
"""delphi cuts ``tokens`` rows into examples of ``example_ctx_len`` (default 32), which must divide the row length:
the rows are padded to a multiple of it."""


@dataclass
class FeatureExport:
    """What ``export-features`` wrote."""

    out: str
    format: str
    files: list[str] = field(default_factory=list)
    n_bytes: int = 0
    """Bytes written."""
    n_entries: int = 0
    """Non-zero (token, feature) values exported (delphi) or contexts written (neuronpedia)."""
    table_bytes: int = 0
    """Bytes of the SAE's feature table, for comparison."""


def hookpoint(layer: int) -> str:
    """delphi's / sparsify's module name of ``hidden_states[layer]``."""
    return "embed_tokens" if layer == 0 else f"layers.{layer - 1}"


def _pad_id(vocab: np.ndarray) -> int:
    for name in PAD_TOKENS:
        hit = np.flatnonzero(vocab == name)
        if hit.size:
            return int(hit[0])
    return 0


def export_features(store: Store, cfg: FeatureExportConfig) -> FeatureExport:
    """Write SAE ``cfg.sae``'s feature table in ``cfg.format`` under ``cfg.out`` (see the module docstring)."""
    t = resolve_sae(store, sae=cfg.sae)
    with output_folder(cfg.out) as out:
        res = FeatureExport(str(out), cfg.format)
        res.table_bytes = sum(store.loc.size(k) for k in t.file_keys)
        if cfg.format == "delphi":
            _delphi(store, t, cfg, out, res)
        else:
            _neuronpedia(store, t, cfg, out, res)
    res.n_bytes = sum(Path(f).stat().st_size for f in res.files)
    return res


# ---------------------------------------------------------------- delphi
def _delphi(
    store: Store, t: FeatureTable, cfg: FeatureExportConfig, out: Path, res: FeatureExport
) -> None:
    from safetensors.numpy import save

    ctx = token_context(store, t.tokenization)
    first, n_tok = ctx.first_row, ctx.n_tokens  # (n_samples,) each
    ctx_len = -(-int(n_tok.max()) // DELPHI_CTX_MULTIPLE) * DELPHI_CTX_MULTIPLE if n_tok.size else 0
    pad = _pad_id(ctx.vocab)
    n_rows = int(first[-1] + n_tok[-1]) if n_tok.size else 0
    ids = np.asarray(ctx.token_id[:n_rows], dtype=np.int64)  # (n_rows,)
    sample_of = np.repeat(np.arange(first.size, dtype=np.int64), n_tok)  # (n_rows,)
    pos_of = np.arange(n_rows, dtype=np.int64) - first[sample_of]
    tokens = np.full((first.size, ctx_len), pad, dtype=np.int64)  # (n_samples, ctx_len)
    tokens[sample_of, pos_of] = ids
    hook_dir = out / hookpoint(t.layer)
    if hook_dir.exists():
        shutil.rmtree(hook_dir)
    hook_dir.mkdir(parents=True)
    n_splits = min(cfg.n_splits, t.d_sae)
    bounds = np.linspace(0, t.d_sae, n_splits + 1).astype(np.int64)
    lazy = lazy_features(store, t.sae)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        part = (
            lazy.filter((pl.col("feature") >= int(start)) & (pl.col("feature") < int(stop)))
            .select("row", "feature", "value")
            .sort(["row", "feature"])
            .collect()
        )
        row = part["row"].to_numpy().astype(np.int64)
        sample = sample_of[row] if row.size else row
        loc = np.stack(
            [sample, row - first[sample] if row.size else row, part["feature"].to_numpy() - start],
            axis=1,
        )
        small = loc.size == 0 or (int(loc[:, 0].max()) < 2**16 and int(loc[:, 2].max()) < 2**16)
        data = {
            "locations": loc.astype(np.uint16 if small else np.uint32).reshape(-1, 3),
            "activations": part["value"].to_numpy().astype(np.float16),
            "tokens": tokens,
        }
        path = hook_dir / f"{int(start)}_{int(stop) - 1}.safetensors"
        # safetensors' own file writer reports a full disk as a SafetensorError
        write_file(path, save(data))
        res.files.append(str(path))
        res.n_entries += int(row.size)
    info = store.model_info(t.model)
    config = {
        "dataset_repo": store.url,
        "dataset_split": "all",
        "dataset_name": t.tokenization or "",
        "dataset_column": "text",
        "batch_size": 32,
        "cache_ctx_len": ctx_len,
        "ctx_len": ctx_len,
        "n_tokens": n_rows,
        "n_splits": n_splits,
        "model_name": info.path or info.source or t.model,
        "actstore": {
            "sae": t.sae,
            "model": t.model,
            "layer": t.layer,
            "hidden_states_index": t.layer,
            "tokenization": t.tokenization,
            "pad_token_id": pad,
            "n_samples": int(first.size),
        },
    }
    cfg_path = hook_dir / "config.json"
    write_file(cfg_path, json.dumps(config, indent=2).encode())
    res.files.append(str(cfg_path))


# ---------------------------------------------------------------- neuronpedia
EMPTY_FIELDS = (
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_pearson",
    "correlated_neurons_l1",
    "correlated_features_indices",
    "correlated_features_pearson",
    "correlated_features_l1",
    "neg_str",
    "neg_values",
    "pos_str",
    "pos_values",
    "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values",
    "decoder_weights_dist",
)
"""Feature fields of the batch layout that need the model's unembedding or neurons: written as empty lists."""


def _feature_entry(
    store: Store, t: FeatureTable, ctx: Any, feature: int, n_active: int, cfg: FeatureExportConfig
) -> dict:
    from actstore.query.lookups import top_rows

    got = top_rows(store, t, feature, None)
    rows, values = got["row"], got["value"]  # (n_active,) each, value desc then row
    heights, edges = (
        np.histogram(values, bins=cfg.hist_bins) if values.size else (np.zeros(0, int), np.zeros(1))
    )
    order = np.argsort(rows, kind="stable")
    srows, svals = rows[order], values[order]
    acts = []
    for r in rows[: cfg.top_n]:
        s = int(np.searchsorted(ctx.first_row, r, side="right") - 1)
        lo = max(int(ctx.first_row[s]), int(r) - cfg.context)
        hi = min(int(ctx.first_row[s] + ctx.n_tokens[s]), int(r) + cfg.context + 1)
        window = np.arange(lo, hi, dtype=np.int64)
        at = np.searchsorted(srows, window)
        hit = (at < srows.size) & (srows[np.minimum(at, max(srows.size - 1, 0))] == window)
        vals = (
            np.where(hit, svals[np.minimum(at, max(svals.size - 1, 0))], 0.0)
            if srows.size
            else np.zeros(window.size)
        )
        acts.append(
            {
                "tokens": [str(x) for x in ctx.tokens(window)],
                "values": [float(v) for v in vals],
                "bin_min": -1,
                "bin_max": -1,
                "bin_contains": -1,
                "qualifying_token_index": int(r - lo),
            }
        )
    entry: dict[str, Any] = {
        "feature_index": int(feature),
        "frac_nonzero": n_active / t.n_rows if t.n_rows else 0.0,
        "freq_hist_data_bar_heights": [int(h) for h in heights],
        "freq_hist_data_bar_values": [float(v) for v in (edges[:-1] + edges[1:]) / 2],
        "activations": acts,
    }
    entry.update({k: [] for k in EMPTY_FIELDS})
    return entry


def _neuronpedia(
    store: Store, t: FeatureTable, cfg: FeatureExportConfig, out: Path, res: FeatureExport
) -> None:
    stats = lazy_feature_stats(store, t.sae).select("feature", "n_active").collect()
    n_active = dict(zip(stats["feature"].to_list(), stats["n_active"].to_list(), strict=True))
    if cfg.features is not None:
        bad = [f for f in cfg.features if not 0 <= f < t.d_sae]
        if bad:
            raise ConfigError(
                f"features {bad[:5]} are out of range for SAE {t.sae} ({t.d_sae} features: 0..{t.d_sae - 1})"
            )
        features = sorted(set(cfg.features))
    else:
        features = sorted(f for f, n in n_active.items() if n > 0)
    for old in out.glob("batch-*.json"):
        old.unlink()
    ctx = token_context(store, t.tokenization)
    for b, b0 in enumerate(range(0, len(features), cfg.features_per_batch)):
        entries = [
            _feature_entry(store, t, ctx, f, int(n_active.get(f, 0)), cfg)
            for f in features[b0 : b0 + cfg.features_per_batch]
        ]
        batch = {
            "model_id": t.model,
            "layer": t.layer,
            "sae_set": t.sae,
            "sae_id_suffix": None,
            "features": entries,
        }
        path = out / f"batch-{b}.json"
        write_file(path, json.dumps(batch).encode())
        res.files.append(str(path))
        res.n_entries += sum(len(e["activations"]) for e in entries)
