"""Ground-truth recovery: how well an SAE's latents recover a known feature dictionary.

SynthSAEBench's metrics (Chanin & Garriga-Alonso 2026, arXiv 2602.14687; SAELens ``sae_lens.synthetic.evals``),
computed here without SAELens so that an actstore SAE and a SAELens SAE are scored by the same code:

- **MCC**: the mean ``|cos|`` between decoder rows and true feature directions under the one-to-one matching
  that maximises it (the Hungarian algorithm);
- **uniqueness**: distinct true features among the latents' best matches, over the number of latents;
- **precision / recall / F1**: each latent as a detector of its best-matching true feature (by decoder cosine),
  counted over samples whose true codes are known, then averaged over latents (a dead latent scores 0);
- **explained variance**: ``1 - E||x - x_hat||^2 / Var(x)``, with ``Var(x)`` the total variance;
- **L0** of the SAE and of the true codes, and latents that never fired.

``tests/test_groundtruth.py`` checks every figure against SAELens's own evaluation on the same samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch


class TruthBatch(NamedTuple):
    """Rows with their true sparse codes."""

    x: torch.Tensor
    """Activations ``(n, d)``."""
    codes: torch.Tensor
    """True feature activations ``(n, n_true)`` (dense; zero where a feature is off)."""


class Encoded(NamedTuple):
    """What an SAE makes of a batch."""

    latents: torch.Tensor
    """Latent activations ``(n, d_sae)``."""
    x_hat: torch.Tensor
    """Reconstruction ``(n, d)`` in the space of the batch's ``x``."""


@dataclass
class GroundTruthResult:
    """Recovery of a known dictionary by one SAE (every figure as SynthSAEBench defines it)."""

    mcc: float
    uniqueness: float
    f1: float
    precision: float
    recall: float
    explained_variance: float
    l0: float
    true_l0: float
    dead: int
    """Latents that never fired on the evaluated rows."""
    n_rows: int


def abs_cosines(decoder: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``|cos|`` ``(d_sae, n_true)`` between decoder rows ``(d_sae, d)`` and true directions ``(n_true, d)``."""
    decoder, features = decoder.detach().float().cpu(), features.detach().float().cpu()
    a = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-8)
    b = features / features.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return (a @ b.T).abs()


def mcc(decoder: torch.Tensor, features: torch.Tensor) -> float:
    """Mean ``|cos|`` of the best one-to-one matching of decoder rows to true directions."""
    return _mcc(abs_cosines(decoder, features))


def uniqueness(decoder: torch.Tensor, features: torch.Tensor) -> float:
    """Distinct true features among the latents' best matches, over the number of latents."""
    return _uniqueness(abs_cosines(decoder, features))


def _mcc(cos: torch.Tensor) -> float:
    """:func:`mcc` from the ``|cos|`` matrix ``(d_sae, n_true)``."""
    # scikit-learn's dependency; only this metric needs it
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(1 - cos.numpy())
    return float(cos[torch.as_tensor(rows), torch.as_tensor(cols)].mean())


def _uniqueness(cos: torch.Tensor) -> float:
    """:func:`uniqueness` from the ``|cos|`` matrix ``(d_sae, n_true)``."""
    if len(cos) == 0:
        return 0.0
    return len(cos.argmax(dim=1).unique()) / len(cos)


def ground_truth_metrics(
    decoder: torch.Tensor,
    features: torch.Tensor,
    batches: Iterable[TruthBatch],
    encode: Callable[[torch.Tensor], Encoded],
) -> GroundTruthResult:
    """Score an SAE (``decoder (d_sae, d)`` and ``encode``) against true directions ``features (n_true, d)`` on
    ``batches`` of rows with their true codes."""
    cos = abs_cosines(decoder, features)  # (d_sae, n_true), once for every metric
    d_sae = len(cos)
    best = cos.argmax(dim=1)  # (d_sae,): each latent's true feature
    tp = torch.zeros(d_sae, dtype=torch.float64)
    fp = torch.zeros(d_sae, dtype=torch.float64)
    fn = torch.zeros(d_sae, dtype=torch.float64)
    fired = torch.zeros(d_sae, dtype=torch.bool)
    n = 0
    l0 = true_l0 = sq_norm = sq_resid = 0.0
    sum_x: torch.Tensor | None = None
    with torch.no_grad():
        for batch in batches:
            x = batch.x.float().cpu()  # (n, d)
            out = encode(x)
            on = out.latents.cpu() != 0  # (n, d_sae)
            truth = batch.codes.cpu()[:, best] > 0  # (n, d_sae): each latent's feature is on
            tp += (on & truth).sum(0)
            fp += (on & ~truth).sum(0)
            fn += (~on & truth).sum(0)
            fired |= on.any(0)
            l0 += float(on.sum())
            true_l0 += float((batch.codes != 0).sum())
            xd = x.double()
            s = xd.sum(0)
            sum_x = s if sum_x is None else sum_x + s
            sq_norm += float(xd.pow(2).sum())
            sq_resid += float((xd - out.x_hat.cpu().double()).pow(2).sum())
            n += len(x)
    if n == 0 or sum_x is None:
        raise ValueError("no rows to evaluate")
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), 0.0)
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), 0.0)
    f1 = torch.where(
        precision + recall > 0,
        2 * precision * recall / (precision + recall).clamp_min(1e-12),
        0.0,
    )
    variance = sq_norm / n - float((sum_x / n).pow(2).sum())
    return GroundTruthResult(
        mcc=_mcc(cos),
        uniqueness=_uniqueness(cos),
        f1=float(f1.mean()),
        precision=float(precision.mean()),
        recall=float(recall.mean()),
        explained_variance=1 - (sq_resid / n) / variance if variance > 0 else float("nan"),
        l0=l0 / n,
        true_l0=true_l0 / n,
        dead=int((~fired).sum()),
        n_rows=n,
    )


def actstore_encoder(
    sae: torch.nn.Module, batch_topk: bool = False
) -> Callable[[torch.Tensor], Encoded]:
    """``encode`` for an actstore :class:`~actstore.sae.model.SAE`: its inference activations and reconstruction
    (a BatchTopK or Matryoshka SAE: pre-activations above its calibrated threshold), or with ``batch_topk`` its
    training activation (each batch keeps its ``k x n`` largest), which is how SynthSAEBench scores those
    architectures: SAELens's ``eval_sae_on_synthetic_data`` encodes with the training SAE, batch by batch."""

    def encode(x: torch.Tensor) -> Encoded:
        out = sae(x, train=batch_topk)
        return Encoded(out.acts, out.x_hat)

    return encode


def as_numpy(result: GroundTruthResult) -> dict[str, float]:
    """The result as a flat ``{metric: value}`` (JSON-ready)."""
    return {k: float(np.round(v, 6)) for k, v in result.__dict__.items()}
