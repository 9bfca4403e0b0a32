"""Feature diff between two SAEs, e.g. pretrained vs fine-tuned at the same layer.

Every feature of SAE A is matched to SAE B (and every feature of B to A) by

* **decoder cosine**: the largest cosine between its decoder row and the other SAE's decoder rows;
* **activation correlation**: the largest Pearson correlation between its activations and the other
  SAE's feature activations over the same token rows (both SAEs read their own model's
  activations of the shared, row-aligned token index; a seeded sample of rows).

and labelled:

``retained``  decoder cosine >= ``retain`` and activation correlation >= ``retain`` (or the feature
              never fired on the sample, so only its decoder speaks);
``modified``  not retained, but decoder cosine or activation correlation >= ``match``;
``lost``      (features of A) no counterpart in B above ``match``;
``new``       (features of B) no counterpart in A above ``match``.

The result is a Parquet table ``STORE/diffs/<name>/diff.parquet`` (with ``diff.json`` beside it)
and the SQL view ``feature_diff``.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch

from actstore.analysis.config import DiffConfig
from actstore.clock import now
from actstore.errors import ConfigError, NotFoundError
from actstore.format import layout
from actstore.query.views import diff_names
from actstore.sae.files import load_sae
from actstore.sae.model import check_fits
from actstore.storage.integrity import check_file, update_manifest
from actstore.storage.locks import StoreLock

if TYPE_CHECKING:
    from actstore.sae.model import SAE
    from actstore.store.reader import Store

MAX_CORR_CELLS = 1 << 27  # d_sae_a * d_sae_b accumulator cells (float64: 1 GiB)


@dataclass
class DiffResult:
    """Per-feature scores and labels for both SAEs."""

    name: str
    table: pl.DataFrame
    """side (a|b), sae, feature, match_decoder, decoder_cos, match_activation, activation_corr, frequency, status."""
    counts: dict[str, dict[str, int]]
    """side -> status -> number of features."""
    n_rows: int
    """Token rows the correlations used."""
    config: dict[str, Any] = field(default_factory=dict)


def decoder_cosines(a: SAE, b: SAE) -> np.ndarray:
    """Cosine between every decoder row of ``a`` and of ``b``: ``(d_sae_a, d_sae_b)``."""
    wa = torch.nn.functional.normalize(a.W_dec.detach().double(), dim=1)  # (d_sae_a, d_in)
    wb = torch.nn.functional.normalize(b.W_dec.detach().double(), dim=1)  # (d_sae_b, d_in)
    return (wa @ wb.T).cpu().numpy()


class Correlations:
    """Streaming Pearson correlation between every feature of A and of B."""

    def __init__(self, da: int, db: int) -> None:
        self.n = 0
        self.sa, self.sb = np.zeros(da), np.zeros(db)
        self.saa, self.sbb = np.zeros(da), np.zeros(db)
        self.sab = np.zeros((da, db))
        self.active_a, self.active_b = np.zeros(da), np.zeros(db)

    def add(self, fa: np.ndarray, fb: np.ndarray) -> None:
        fa, fb = fa.astype(np.float64), fb.astype(np.float64)  # (n, d_sae_a), (n, d_sae_b)
        self.n += len(fa)
        self.sa += fa.sum(0)
        self.sb += fb.sum(0)
        self.saa += (fa * fa).sum(0)
        self.sbb += (fb * fb).sum(0)
        self.sab += fa.T @ fb
        self.active_a += (fa > 0).sum(0)
        self.active_b += (fb > 0).sum(0)

    def corr(self) -> np.ndarray:
        """``(d_sae_a, d_sae_b)``; NaN where a feature never varies."""
        n = max(self.n, 1)
        ma, mb = self.sa / n, self.sb / n
        va, vb = self.saa / n - ma**2, self.sbb / n - mb**2
        cov = self.sab / n - np.outer(ma, mb)
        den = np.sqrt(np.outer(np.clip(va, 0, None), np.clip(vb, 0, None)))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = cov / den
        r[den <= 1e-12] = np.nan
        return r


def _check_pair(store: Store, a: SAE, b: SAE, cfg: DiffConfig) -> None:
    for name, s in ((cfg.sae_a, a), (cfg.sae_b, b)):
        check_fits(store, s.cfg, name)
    if a.cfg.is_crosscoder or b.cfg.is_crosscoder:
        which = cfg.sae_a if a.cfg.is_crosscoder else cfg.sae_b
        raise ConfigError(
            f"{which} is a crosscoder: diff its latents with actstore diff-crosscoder --sae {which}"
        )
    if a.cfg.d_in != b.cfg.d_in:
        raise ConfigError(
            f"SAEs {cfg.sae_a} (d_in {a.cfg.d_in}) and {cfg.sae_b} (d_in {b.cfg.d_in}) read different widths"
        )
    store.check_aligned(str(a.cfg.model), str(b.cfg.model))


@torch.no_grad()
def activation_correlations(
    store: Store, a: SAE, b: SAE, cfg: DiffConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(corr (d_sae_a, d_sae_b), frequency_a, frequency_b, n_rows)`` over a seeded sample of shared rows."""
    if a.cfg.d_sae * b.cfg.d_sae > MAX_CORR_CELLS:
        raise ConfigError(
            f"activation correlation of {a.cfg.d_sae} x {b.cfg.d_sae} features is too large to hold: pass --no-activation-corr"
        )
    xa = store.activations(a.cfg.model, a.cfg.layer)  # type: ignore[arg-type]
    xb = store.activations(b.cfg.model, b.cfg.layer)  # type: ignore[arg-type]
    n = min(len(xa), len(xb))
    if n == 0:
        raise NotFoundError(
            f"no committed rows for {a.cfg.model} / {b.cfg.model} in {store.url}: finish actstore extract"
        )
    p = 1.0 if not cfg.rows or cfg.rows >= n else cfg.rows / n
    rng = np.random.default_rng(cfg.seed)
    acc = Correlations(a.cfg.d_sae, b.cfg.d_sae)
    dev = a.W_enc.device
    for ca, cb in zip(
        xa.iter_chunks(0, n, xa.chunk_rows), xb.iter_chunks(0, n, xa.chunk_rows), strict=True
    ):
        keep = rng.random(len(ca.values)) < p if p < 1 else np.ones(len(ca.values), dtype=bool)
        if not keep.any():
            continue
        fa = (
            a.encode(torch.from_numpy(ca.values[keep]).to(dev)).float().cpu().numpy()
        )  # (rows, d_sae_a)
        fb = (
            b.encode(torch.from_numpy(cb.values[keep]).to(dev)).float().cpu().numpy()
        )  # (rows, d_sae_b)
        acc.add(fa, fb)
    n_used = max(acc.n, 1)
    return acc.corr(), acc.active_a / n_used, acc.active_b / n_used, acc.n


def _label(
    dec: np.ndarray, act: np.ndarray, retain: float, match: float, unmatched: str
) -> list[str]:
    out = []
    for d, r in zip(dec, act, strict=True):
        r_ok = np.isnan(r) or r >= retain
        if d >= retain and r_ok:
            out.append("retained")
        elif d >= match or (not np.isnan(r) and r >= match):
            out.append("modified")
        else:
            out.append(unmatched)
    return out


def diff_features(store: Store, cfg: DiffConfig, save: bool = True) -> DiffResult:
    """Match and label the features of ``cfg.sae_a`` and ``cfg.sae_b``; saved under ``diffs/<name>/`` when ``save``."""
    a, b = load_sae(store, cfg.sae_a), load_sae(store, cfg.sae_b)
    _check_pair(store, a, b, cfg)
    cos = decoder_cosines(a, b)  # (d_sae_a, d_sae_b)
    if cfg.activation_corr:
        corr, freq_a, freq_b, n_rows = activation_correlations(store, a, b, cfg)
    else:
        corr = np.full_like(cos, np.nan)
        freq_a, freq_b, n_rows = np.full(a.cfg.d_sae, np.nan), np.full(b.cfg.d_sae, np.nan), 0
    frames = []
    for side, sae_name, c, r, freq, unmatched in (
        ("a", cfg.sae_a, cos, corr, freq_a, "lost"),
        ("b", cfg.sae_b, cos.T, corr.T, freq_b, "new"),
    ):
        dec_match = c.argmax(1)
        dec = c[np.arange(len(c)), dec_match]
        all_nan = np.isnan(r).all(1)
        act_match = np.where(all_nan, -1, np.nanargmax(np.where(np.isnan(r), -np.inf, r), axis=1))
        act = np.where(all_nan, np.nan, r[np.arange(len(r)), np.clip(act_match, 0, None)])
        frames.append(
            pl.DataFrame(
                {
                    "side": [side] * len(c),
                    "sae": [sae_name] * len(c),
                    "feature": np.arange(len(c), dtype=np.int32),
                    "match_decoder": dec_match.astype(np.int32),
                    "decoder_cos": dec.astype(np.float64),
                    "match_activation": act_match.astype(np.int32),
                    "activation_corr": act.astype(np.float64),
                    "frequency": np.asarray(freq, dtype=np.float64),
                    "status": _label(dec, act, cfg.retain, cfg.match, unmatched),
                }
            )
        )
    table = pl.concat(frames).with_columns(
        pl.col("activation_corr").fill_nan(None), pl.col("frequency").fill_nan(None)
    )
    side_statuses = {"a": ("retained", "modified", "lost"), "b": ("retained", "modified", "new")}
    counts = {
        side: {s: int(((table["side"] == side) & (table["status"] == s)).sum()) for s in statuses}
        for side, statuses in side_statuses.items()
    }
    res = DiffResult(str(cfg.name), table, counts, int(n_rows), asdict(cfg))
    if save:
        save_diff(store, res)
    return res


def save_diff(store: Store, res: DiffResult) -> str:
    buf = io.BytesIO()
    res.table.write_parquet(buf)
    key = layout.diff_dir(res.name)
    meta = {"config": res.config, "counts": res.counts, "n_rows": res.n_rows, "created": now()}
    # one writer of a diff at a time
    with StoreLock(store.loc, key, f"diff-features {res.name}").acquire():
        store.loc.write_bytes(layout.diff_file(res.name, layout.DIFF_TABLE), buf.getvalue())
        store.loc.write_bytes(
            layout.diff_file(res.name, layout.DIFF_META), json.dumps(meta, indent=2).encode()
        )
        update_manifest(store.loc, prefixes=[key])  # checksums for the new files (actstore verify)
    return store.loc.join(f"{key}/diff.parquet")


def load_diff(store: Store, name: str) -> DiffResult:
    if name not in diff_names(store):
        raise NotFoundError(
            f"no feature diff named {name!r} in {store.url}: run actstore diff-features"
        )
    table_key, meta_key = (
        layout.diff_file(name, layout.DIFF_TABLE),
        layout.diff_file(name, layout.DIFF_META),
    )
    raw = store.loc.read_bytes(table_key)
    check_file(store.loc, table_key, raw)
    table = pl.read_parquet(io.BytesIO(raw))
    raw = store.loc.read_bytes(meta_key)
    check_file(store.loc, meta_key, raw)
    meta = json.loads(raw)
    return DiffResult(name, table, meta["counts"], int(meta["n_rows"]), meta["config"])
