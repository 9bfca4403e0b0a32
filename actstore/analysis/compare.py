"""Compare stage: layer-wise similarity of two row-aligned models in one store (the paper's Fig 1).

Metrics, each per layer over the token rows both models share:

``mean-cosine``   the paper's: cosine between the mean activation vectors of the two models;
``token-cosine``  mean over tokens of the per-token cosine ``cos(a_t, b_t)``;
``cka``           linear CKA (Kornblith et al. 2019) on token rows, optionally a seeded sample of them.

Everything streams chunk by chunk: memory is a few chunks plus, for CKA, three
``(d_model, d_model)`` float64 Gram accumulators, whatever the store's size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from actstore.analysis.config import METRICS, CompareConfig
from actstore.errors import ConfigError, NotFoundError
from actstore.storage.files import save_figure

if TYPE_CHECKING:
    from actstore.store.reader import Store

EPS = 1e-12


# ---------------------------------------------------------------- metrics on arrays
def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine between the mean rows of ``a (n, d)`` and ``b (n, d)``."""
    ma, mb = np.asarray(a, np.float64).mean(0), np.asarray(b, np.float64).mean(0)
    return float(ma @ mb / max(np.linalg.norm(ma) * np.linalg.norm(mb), EPS))


def token_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the cosine between ``a[t]`` and ``b[t]``."""
    return float(_row_cosines(np.asarray(a, np.float64), np.asarray(b, np.float64)).mean())


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between ``x (n, d1)`` and ``y (n, d2)`` (rows are the same examples)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    acc = _CKA(x.shape[1], y.shape[1])
    acc.add(x, y)
    return acc.value()


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = np.einsum("ij,ij->i", a, b)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, EPS)


class _CKA:
    """Streaming linear CKA: ``||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` from running sums.

    Rows are shifted by the first block's mean (CKA is translation invariant), which keeps the
    float32 block products accurate; the sums across blocks are float64.
    """

    def __init__(self, dx: int, dy: int) -> None:
        self.n = 0
        self.sx, self.sy = np.zeros(dx), np.zeros(dy)
        self.xx, self.yy, self.yx = np.zeros((dx, dx)), np.zeros((dy, dy)), np.zeros((dy, dx))
        self.shift: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if len(x) == 0:
            return
        if self.shift is None:
            self.shift = (np.asarray(x, np.float64).mean(0), np.asarray(y, np.float64).mean(0))
        x = (np.asarray(x, np.float64) - self.shift[0]).astype(np.float32)  # (rows, dx)
        y = (np.asarray(y, np.float64) - self.shift[1]).astype(np.float32)  # (rows, dy)
        self.n += len(x)
        self.sx += x.sum(0, dtype=np.float64)
        self.sy += y.sum(0, dtype=np.float64)
        self.xx += x.T @ x
        self.yy += y.T @ y
        self.yx += y.T @ x

    def value(self) -> float:
        if self.n < 2:
            return float("nan")
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.xx - self.n * np.outer(mx, mx)
        cyy = self.yy - self.n * np.outer(my, my)
        cyx = self.yx - self.n * np.outer(my, mx)
        den = np.linalg.norm(cxx) * np.linalg.norm(cyy)
        return float(np.sum(cyx * cyx) / den) if den > EPS else float("nan")


@dataclass
class CompareResult:
    """Similarity per layer and metric, for one store."""

    store: str
    label: str
    models: tuple[str, str]
    n_rows: int
    table: pl.DataFrame
    """Columns: label, model_a, model_b, layer, metric, value, n_rows."""
    config: dict[str, Any] = field(default_factory=dict)


def _pick_models(store: Store, models: tuple[str, str] | None) -> tuple[str, str]:
    have = store.models
    if models is None:
        if len(have) != 2:
            raise ConfigError(
                f"store {store.url} holds {len(have)} models ({', '.join(have) or 'none'}): pass --models A,B"
            )
        return have[0], have[1]
    for m in models:
        if m not in have:
            raise NotFoundError(
                f"model {m!r} is not in store {store.url} (models: {', '.join(have) or 'none'}): check --models"
            )
    return models


def compare_layer(store: Store, a: str, b: str, layer: int, cfg: CompareConfig) -> dict[str, float]:
    """All of ``cfg.metrics`` for one layer, in one streaming pass; also ``n_rows``."""
    xa, xb = store.activations(a, layer), store.activations(b, layer)
    store.check_aligned(a, b)
    n = min(len(xa), len(xb))
    if n == 0:
        raise NotFoundError(
            f"layer {layer} of {a} or {b} in {store.url} has no committed rows yet: finish actstore extract"
        )
    same_width = xa.d_model == xb.d_model
    want = set(cfg.metrics)
    if not same_width and want & {"mean-cosine", "token-cosine"}:
        raise ConfigError(
            f"{a} (d_model {xa.d_model}) and {b} (d_model {xb.d_model}) differ in width: only --metric cka applies"
        )
    sum_a, sum_b = np.zeros(xa.d_model), np.zeros(xb.d_model)
    cos_sum = 0.0
    cka = _CKA(xa.d_model, xb.d_model) if "cka" in want else None
    p = 1.0 if not cfg.cka_rows or cfg.cka_rows >= n else cfg.cka_rows / n
    rng = np.random.default_rng(cfg.seed + layer)
    step = xa.chunk_rows
    for ca, cb in zip(xa.iter_chunks(0, n, step), xb.iter_chunks(0, n, step), strict=True):
        va, vb = ca.values.astype(np.float64), cb.values.astype(np.float64)  # (rows, d_model)
        sum_a += va.sum(0)
        sum_b += vb.sum(0)
        if "token-cosine" in want:
            cos_sum += float(_row_cosines(va, vb).sum())
        if cka is not None:
            keep = rng.random(len(va)) < p if p < 1 else slice(None)
            cka.add(va[keep], vb[keep])
    out: dict[str, float] = {"n_rows": float(n)}
    if "mean-cosine" in want:
        out["mean-cosine"] = float(
            sum_a @ sum_b / max(np.linalg.norm(sum_a) * np.linalg.norm(sum_b), EPS)
        )
    if "token-cosine" in want:
        out["token-cosine"] = cos_sum / n
    if cka is not None:
        out["cka"] = cka.value()
    return out


def compare(
    store: Store, cfg: CompareConfig, label: str | None = None, progress: bool = False
) -> CompareResult:
    """Layer-wise similarity of two row-aligned models of ``store``."""
    from tqdm.auto import tqdm

    a, b = _pick_models(store, cfg.models)
    common = sorted(set(store.layers(a)) & set(store.layers(b)))
    layers = common if cfg.layers is None else sorted(set(cfg.layers))
    missing = [x for x in layers if x not in common]
    if missing:
        raise NotFoundError(
            f"layer {missing[0]} is not stored for both {a} and {b} in {store.url} (shared layers: "
            f"{', '.join(map(str, common)) or 'none'}): extract it for both models"
        )
    if not layers:
        raise NotFoundError(
            f"{a} and {b} share no layers in {store.url}: extract the same layers of both"
        )
    label = label or Path(store.url.rstrip("/")).name
    rows = []
    n_rows = 0
    for layer in tqdm(layers, desc=f"compare {a} vs {b}", disable=not progress):
        vals = compare_layer(store, a, b, layer, cfg)
        n_rows = int(vals.pop("n_rows"))
        for m in cfg.metrics:
            rows.append(
                {
                    "label": label,
                    "model_a": a,
                    "model_b": b,
                    "layer": layer,
                    "metric": m,
                    "value": vals[m],
                    "n_rows": n_rows,
                }
            )
    return CompareResult(store.url, label, (a, b), n_rows, pl.DataFrame(rows), asdict(cfg))


def wide(table: pl.DataFrame) -> pl.DataFrame:
    """One row per (label, layer), one column per metric (and n_rows last)."""
    index = ["label", "model_a", "model_b", "layer", "n_rows"]
    w = table.pivot(on="metric", index=index, values="value", maintain_order=True)
    return w.select([c for c in w.columns if c != "n_rows"] + ["n_rows"])


def plot_similarity(table: pl.DataFrame, path: str, title: str | None = None) -> str:
    """A PNG in the style of the paper's Fig 1: similarity vs layer, one line per store / dataset, a panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if m in set(table["metric"].to_list())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        sub = table.filter(pl.col("metric") == m)
        for lab in sub["label"].unique(maintain_order=True).to_list():
            s = sub.filter(pl.col("label") == lab).sort("layer")
            ax.plot(s["layer"].to_list(), s["value"].to_list(), marker="o", label=lab)
        ax.set_title(m)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel("similarity")
        ax.grid(alpha=0.3)
        layers = sorted(set(sub["layer"].to_list()))
        ax.set_xticks(layers)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def compare_stores(
    stores: list[str],
    cfg: CompareConfig,
    labels: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> pl.DataFrame:
    """:func:`compare` over several stores (e.g. one per dataset), concatenated into one long table."""
    from actstore.store.reader import open_store

    if labels is not None and len(labels) != len(stores):
        raise ConfigError(
            f"{len(labels)} labels for {len(stores)} stores: give one label per store"
        )
    tables = []
    for i, path in enumerate(stores):
        st = open_store(path, storage_options=storage_options)
        tables.append(compare(st, cfg, label=labels[i] if labels else None).table)
    return pl.concat(tables)
