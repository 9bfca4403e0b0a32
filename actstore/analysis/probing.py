"""Sparse probing (``actstore eval``): does an SAE's feature basis carry the store's labels in a few features?

SAEBench's sparse probing, on the labels every store's samples carry. Each sample's SAE feature activations are
mean-pooled over its tokens (and, for the dense baseline, its raw activations of the same layer). For each task
(one label against the rest, the most frequent labels; a two-label store is one task) the training samples pick
the k features whose class means differ most, and a logistic probe on those k features is scored on held-out
samples, beside a probe on every raw dimension. Both classes of a task are balanced to the same size, so chance
is 0.5. The probe is scikit-learn's L2 logistic regression (``C = l2``, intercept unpenalised) on standardized
inputs, fitted with L-BFGS in float64; ``tests/test_probing.py`` checks it against scikit-learn itself.

A 2026 comparison of SAE evaluations (arXiv 2605.18229) found sparse probing the most reliable of SAEBench's;
the result is saved beside the SAE as ``evals.json`` (key ``sparse_probing``; ``layout.SAE_EVALS``) when the store
is writable.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from actstore.analysis.config import EvalConfig
from actstore.clock import now
from actstore.errors import ConfigError
from actstore.format import layout
from actstore.sae.files import load_sae, read_evals
from actstore.storage.integrity import update_manifest

if TYPE_CHECKING:
    from actstore.store.reader import Store


class Pooled(NamedTuple):
    """Per-sample mean-pooled activations of the probed samples."""

    features: np.ndarray
    """SAE feature activations ``(n_samples, d_sae)`` float32."""
    raw: np.ndarray
    """The layer's raw activations ``(n_samples, d_model)`` float32 (the dense probe's inputs)."""
    labels: np.ndarray
    """Each sample's label ``(n_samples,)`` as text."""


@dataclass
class ProbeTask:
    """One binary task: a label against the rest, balanced."""

    label: str
    n_train: int
    n_test: int
    dense: float
    """Held-out accuracy of the probe on every raw dimension."""
    sparse: dict[int, float]
    """k -> held-out accuracy of the probe on the k features chosen on the training samples."""
    features: dict[int, list[int]] = field(default_factory=dict)
    """k -> the features chosen."""


@dataclass
class ProbingResult:
    """What ``actstore eval`` reports: every task, and the means over them."""

    sae: str
    model: str
    layer: int
    n_samples: int
    tasks: list[ProbeTask]
    dense: float
    """Mean held-out accuracy of the dense probes."""
    sparse: dict[int, float]
    """k -> mean held-out accuracy of the k-sparse probes."""
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- the probe
def fit_logistic(
    x: np.ndarray, y: np.ndarray, c: float = 1.0, max_iter: int = 500,
    sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:  # fmt: skip
    """scikit-learn's L2 logistic regression: ``w, b`` minimising ``0.5 ||w||^2 + c * sum_i v_i log(1 + exp(-s_i
    (x_i w + b)))`` with ``s = 2y - 1`` (``x (n, d)``, ``y (n,)`` of 0/1, ``v`` the sample weights, default 1), by
    L-BFGS in float64."""
    import torch

    xt = torch.as_tensor(x, dtype=torch.float64)
    s = torch.as_tensor(2.0 * np.asarray(y, dtype=np.float64) - 1.0)
    v = torch.as_tensor(
        np.ones(len(s)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    )
    # (d + 1,): weights, then intercept
    w = torch.zeros(xt.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        margin = s * (xt @ w[:-1] + w[-1])
        loss = 0.5 * (w[:-1] ** 2).sum() + c * (v * torch.nn.functional.softplus(-margin)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    out = w.detach().numpy()
    return out[:-1], float(out[-1])


def probe_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, c: float
) -> float:
    """Held-out accuracy of a logistic probe fitted on standardized training inputs (the test inputs standardized with
    the training mean and deviation)."""
    mean, std = x_train.mean(0), x_train.std(0)
    std = np.where(std > 0, std, 1.0)
    w, b = fit_logistic((x_train - mean) / std, y_train, c)
    pred = ((x_test - mean) / std) @ w + b > 0
    return float((pred == (y_test > 0)).mean())


def top_features(features: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` features whose mean activation differs most between the positive and the negative samples."""
    diff = np.abs(features[y > 0].mean(0) - features[y <= 0].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


# ---------------------------------------------------------------- pooling
def labelled_samples(
    store: Store, tokenization: str | None, cfg: EvalConfig
) -> tuple[np.ndarray, np.ndarray]:
    """``(sample ids (n,), labels (n,))`` of the samples to probe: every labelled one, or a seeded draw of
    ``max_samples``; sorted by sample."""
    smp = store.samples(tokenization).select("sample", "label").drop_nulls("label")
    if smp.height < 10:
        raise ConfigError(
            f"store {store.url} has {smp.height} labelled samples: sparse probing needs labels (extract a labelled "
            "corpus, or pass --label-field)"
        )
    idx = np.arange(smp.height)
    if smp.height > cfg.max_samples:
        idx = np.sort(
            np.random.default_rng(cfg.seed).choice(smp.height, cfg.max_samples, replace=False)
        )
    samples = smp["sample"].to_numpy()[idx].astype(np.int64)
    labels = np.asarray([str(v) for v in smp["label"].to_numpy()[idx]], dtype=object)
    return samples, labels


def pool(store: Store, cfg: EvalConfig, progress: bool = False) -> tuple[Pooled, Any]:
    """Mean-pool the SAE's features and the layer's raw activations over the tokens of each probed sample."""
    import torch
    from tqdm.auto import tqdm

    from actstore.models.loading import auto_device
    from actstore.sae.model import check_fits

    device = auto_device(cfg.device)
    sae = load_sae(store, cfg.sae, device).eval()
    acts = check_fits(store, sae.cfg, cfg.sae)
    tk = getattr(acts, "tokenization", None) or store.model_info(str(sae.cfg.model)).tokenization
    samples, labels = labelled_samples(store, tk, cfg)
    first, n_tok = store.tokenization(tk).sample_rows()
    starts, lens = first[samples], n_tok[samples]
    feats = np.zeros((len(samples), sae.cfg.d_sae), dtype=np.float32)  # (n_samples, d_sae)
    raw = np.zeros((len(samples), acts.d_model), dtype=np.float32)  # (n_samples, d_model)
    bar = tqdm(
        total=int(lens.sum()),
        desc=f"pool {cfg.sae}",
        unit=" tok",
        disable=not progress,
        leave=False,
    )
    i = 0
    with torch.no_grad():
        while i < len(samples):
            j, rows = i, 0
            while j < len(samples) and (rows == 0 or rows + lens[j] <= cfg.batch_rows):
                rows += int(lens[j])
                j += 1
            x = np.concatenate(
                [acts[int(a) : int(a + n)] for a, n in zip(starts[i:j], lens[i:j], strict=True)]
            )
            f = sae.encode(torch.from_numpy(x).to(device)).float().cpu().numpy()  # (rows, d_sae)
            bounds = np.concatenate([[0], np.cumsum(lens[i:j])[:-1]])
            feats[i:j] = np.add.reduceat(f, bounds, axis=0) / lens[i:j, None]
            raw[i:j] = np.add.reduceat(x, bounds, axis=0) / lens[i:j, None]
            bar.update(rows)
            i = j
    bar.close()
    return Pooled(feats, raw, labels), sae


# ---------------------------------------------------------------- tasks
def split_and_balance(
    y: np.ndarray, test: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)`` of a binary task, each side with as many negatives as positives (drawn)."""
    out = []
    for part in (~test, test):
        pos, neg = np.flatnonzero(part & (y > 0)), np.flatnonzero(part & (y <= 0))
        n = min(len(pos), len(neg))
        out.append(
            np.sort(
                np.concatenate(
                    [rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]
                )
            )
        )
    return out[0], out[1]


def sparse_probing(store: Store, cfg: EvalConfig, progress: bool = False) -> ProbingResult:
    """Probe ``cfg.sae``'s features (k-sparse) and its layer's raw activations (dense) on the store's labels."""
    t0 = time.perf_counter()
    pooled, sae = pool(store, cfg, progress)
    values, counts = np.unique(pooled.labels, return_counts=True)
    if len(values) < 2:
        raise ConfigError(
            f"store {store.url} has one label ({values[0]!r}) among its samples: nothing to probe"
        )
    order = np.argsort(-counts, kind="stable")
    chosen = [str(values[o]) for o in order[: (1 if len(values) == 2 else cfg.max_classes)]]
    rng = np.random.default_rng(cfg.seed)
    test = rng.random(len(pooled.labels)) < cfg.test_fraction
    tasks = []
    for label in chosen:
        y = (pooled.labels == label).astype(np.int64)
        tr, te = split_and_balance(y, test, rng)
        if min(len(tr), len(te)) < 4:
            continue
        dense = probe_accuracy(pooled.raw[tr], y[tr], pooled.raw[te], y[te], cfg.l2)
        sparse, picked = {}, {}
        for k in cfg.k:
            top = top_features(pooled.features[tr], y[tr], min(k, pooled.features.shape[1]))
            x = pooled.features[:, top]
            sparse[k] = probe_accuracy(x[tr], y[tr], x[te], y[te], cfg.l2)
            picked[k] = [int(v) for v in top]
        tasks.append(ProbeTask(label, len(tr), len(te), dense, sparse, picked))
    if not tasks:
        raise ConfigError(
            f"too few labelled samples in {store.url} to hold some out for every task: extract more rows"
        )
    return ProbingResult(
        sae=cfg.sae, model=str(sae.cfg.model), layer=int(sae.cfg.layer or 0), n_samples=len(pooled.labels),
        tasks=tasks, dense=float(np.mean([t.dense for t in tasks])),
        sparse={k: float(np.mean([t.sparse[k] for t in tasks])) for k in cfg.k},
        seconds=time.perf_counter() - t0, config=asdict(cfg),
    )  # fmt: skip


# ---------------------------------------------------------------- evals.json
def save_evals(store: Store, res: Any, name: str = "sparse_probing") -> str:
    """Write (or update) ``saes/<res.sae>/evals.json`` with result ``res`` (a dataclass) under ``name``; its key."""
    from actstore.storage.locks import StoreLock

    key = layout.sae_file(res.sae, layout.SAE_EVALS)
    # one writer of the SAE's files
    lock = StoreLock(store.loc, layout.sae_dir(res.sae), f"eval {res.sae}").acquire()
    try:
        body = {**read_evals(store, res.sae), name: {**asdict(res), "created": now()}}
        store.loc.write_bytes(key, json.dumps(body, indent=1, sort_keys=True).encode())
        update_manifest(store.loc, prefixes=[layout.sae_dir(res.sae)])
    finally:
        lock.release()
    return key
