"""Train stage, measurement side: SAE quality metrics on training and held-out rows.

* ``mse``: mean squared error per element, in the model's activation space.
* ``fvu``: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``.
* ``l0``: mean number of active features per token.
* ``dead_fraction``: on held-out rows (``eval``, what ``train``, ``saes`` and the report show), features with no
  activation on any held-out token at the end of the run; in the training tracker (``train``), features with no
  activation in the last ``dead_window_tokens`` training tokens (``min(dead_window, tokens seen)``: in a run
  shorter than the window, "never fired in the whole run", which a feature that fired once early escapes). A full
  pass over the store is counted by ``encode`` (``never_fired_fraction`` in ``encoding.json``).
* ``dense_fraction``: features active on more than ``dense_threshold`` of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from actstore.sae.model import SAE


@torch.no_grad()
def evaluate(
    sae: SAE, x: torch.Tensor, batch_size: int = 4096, dense_threshold: float = 0.1
) -> dict[str, Any]:
    """Metrics of ``sae`` (inference mode) on raw activations ``x (n, d_in)``."""
    n = x.shape[0]
    if n == 0:
        return {}
    dev = sae.W_dec.device
    d_in, d_sae, n_src = sae.d_input, sae.cfg.d_sae, sae.cfg.n_sources
    mean = sae.split_rows(x)[1].double().mean(0).to(dev)  # (d_in,) of what it reconstructs
    sse = torch.zeros(n_src, dtype=torch.float64, device=dev)  # per source (one for an SAE)
    var = torch.zeros(n_src, dtype=torch.float64, device=dev)
    l0 = 0.0
    fires = torch.zeros(d_sae, dtype=torch.float64, device=dev)
    for a in range(0, n, batch_size):
        # (b, d_in): its input, and what it reconstructs (a transcoder's target; an SAE's input)
        xb, yb = sae.split_rows(x[a : a + batch_size].to(dev, non_blocking=True))
        rec = sae.reconstruct(xb)
        sse += ((rec.x_hat - yb).double() ** 2).view(len(xb), n_src, -1).sum(dim=(0, 2))
        var += ((yb.double() - mean) ** 2).view(len(xb), n_src, -1).sum(dim=(0, 2))
        l0 += float(rec.fired.sum())
        fires += rec.fired.double()
    freq = fires / n
    tot_sse, tot_var = float(sse.sum()), float(var.sum())
    out_ = {
        "n_tokens": n,
        "mse": tot_sse / (n * d_in),
        "fvu": tot_sse / tot_var if tot_var > 0 else float("nan"),
        "l0": l0 / n,
        "dead_fraction": float((fires == 0).double().mean()),
        "dense_fraction": float((freq > dense_threshold).double().mean()),
    }
    if n_src > 1:  # a crosscoder: how well it reconstructs each model (source) on its own
        out_["sources"] = [
            {
                "source": lab,
                "fvu": float(e / v) if v > 0 else float("nan"),
                "mse": float(e) / (n * sae.cfg.d_in),
            }
            for lab, e, v in zip(sae.cfg.source_labels(), sse.tolist(), var.tolist(), strict=True)
        ]
    return out_


@dataclass
class TrainTracker:
    """Running training metrics: interval sums and, per feature, the token count when it last fired.

    All state is tensors (``state()`` / ``load()``) so a checkpoint restores it exactly.
    """

    d_sae: int
    dead_window: int
    dense_threshold: float = 0.1
    tokens_seen: int = 0
    # (d_sae,) int64 tokens_seen after the batch it last fired in
    last_fired: torch.Tensor = field(init=False)
    fires: torch.Tensor = field(init=False)  # (d_sae,) fires in the current interval
    sums: torch.Tensor = field(init=False)  # (4,) float64 interval: sse_raw, var_raw, l0, tokens

    def __post_init__(self) -> None:
        self.last_fired = torch.zeros(self.d_sae, dtype=torch.int64)
        self.fires = torch.zeros(self.d_sae, dtype=torch.float64)
        self.sums = torch.zeros(4, dtype=torch.float64)

    def to(self, device: torch.device | str) -> TrainTracker:
        self.last_fired, self.fires, self.sums = (
            self.last_fired.to(device),
            self.fires.to(device),
            self.sums.to(device),
        )
        return self

    def dead_mask(self) -> torch.Tensor:
        """bool ``(d_sae,)``: no activation in the last ``dead_window`` tokens (or ever, early on)."""
        return self.last_fired <= max(0, self.tokens_seen - self.dead_window)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, fired: torch.Tensor) -> None:
        """Add one batch: raw ``x (b, d_in)``, raw ``x_hat (b, d_in)``, ``fired (d_sae,)``: the tokens of the batch
        each feature was active on."""
        b = x.shape[0]
        self.tokens_seen += b
        self.last_fired[fired > 0] = self.tokens_seen
        self.fires += fired.double()
        xd = x.double()
        sse = ((x_hat.double() - xd) ** 2).sum()
        var = ((xd - xd.mean(0)) ** 2).sum()
        self.sums += torch.stack(
            [
                sse,
                var,
                fired.sum().double(),
                torch.tensor(float(b), dtype=torch.float64, device=x.device),
            ]
        )

    def interval(self, d_in: int) -> dict[str, Any]:
        """Metrics over the batches since the last call; starts a new interval."""
        sse, var, l0, n = (float(v) for v in self.sums.cpu())
        out: dict[str, Any] = {}
        if n > 0:
            out = {
                "mse": sse / (n * d_in),
                "fvu": sse / var if var > 0 else float("nan"),
                "l0": l0 / n,
                "dense_fraction": float(((self.fires / n) > self.dense_threshold).double().mean()),
            }
        out["dead_fraction"] = float(self.dead_mask().double().mean())
        out["dead_window_tokens"] = min(self.dead_window, self.tokens_seen)
        self.fires.zero_()
        self.sums.zero_()
        return out

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "track.last_fired": self.last_fired.cpu(),
            "track.fires": self.fires.cpu(),
            "track.sums": self.sums.cpu(),
            "track.tokens_seen": torch.tensor(self.tokens_seen, dtype=torch.int64),
        }

    def load(self, t: dict[str, torch.Tensor]) -> None:
        dev = self.last_fired.device
        self.last_fired = t["track.last_fired"].to(dev)
        self.fires = t["track.fires"].to(dev)
        self.sums = t["track.sums"].to(dev)
        self.tokens_seen = int(t["track.tokens_seen"])


def training_curves(history: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """The run's curves as columns, from its history: ``train`` (every log entry: tokens seen, FVU and L0 over the
    batches since the previous entry) and ``eval`` (held-out FVU, L0 and dead fraction at each evaluation point, on
    the run's ``curve_eval_tokens`` held-out rows; histories from before the curves: the epoch-end evaluations).
    FVU against tokens shows whether a run converged; FVU against L0 where it sits on the sparsity frontier."""
    train: dict[str, list[float]] = {"tokens": [], "fvu": [], "l0": []}
    held: dict[str, list[float]] = {"tokens": [], "fvu": [], "l0": [], "dead_fraction": []}
    for e in history:
        if "fvu" in e:
            for key in train:
                train[key].append(float(e[key]))
        ev = (e.get("curve") if any("curve" in h for h in history) else e.get("eval")) or {}
        if "fvu" in ev:
            held["tokens"].append(float(e["tokens"]))
            for key in ("fvu", "l0", "dead_fraction"):
                held[key].append(float(ev[key]))
    return {"train": train, "eval": held}


class RisingFVUWarning(UserWarning):
    """The held-out FVU rose at two evaluation points in a row: the run is getting worse with more data."""


RISE_TOLERANCE = 0.01
"""Relative rise of the held-out FVU over two evaluation points below which it counts as noise, not a trend."""


def rising_fvu(fvus: list[float]) -> bool:
    """Whether the last two held-out FVU points each rose over the one before, by :data:`RISE_TOLERANCE` in all."""
    return (
        len(fvus) >= 3
        and fvus[-3] < fvus[-2] < fvus[-1]
        and fvus[-1] > fvus[-3] * (1 + RISE_TOLERANCE)
    )


def curve_after(history: list[dict[str, Any]], step: float) -> list[float]:
    """The held-out FVUs of the training curve's points (``history`` entries with a ``curve``) after ``step``."""
    return [
        float(e["curve"]["fvu"])
        for e in history
        if "curve" in e and "fvu" in e["curve"] and e["step"] > step
    ]


def rising_fvu_cause(cfg: Any, lr: float, fvus: list[float], tokens: int) -> str:
    """The warning for a run whose held-out FVU rises (:func:`rising_fvu`), naming the likely cause."""
    path = " -> ".join(f"{v:.3f}" for v in fvus[-3:])
    if cfg.optimizer == "signum":
        why = (
            f"signum's learning rate ({lr:.3g}) is likely too high for a run this long: pass --optimizer adam, or "
            "a smaller --lr"
        )
    else:
        why = f"the learning rate ({lr:.3g}) is likely too high: pass a smaller --lr"
    return (
        f"held-out FVU rose at two evaluation points in a row ({path} at {tokens:,} tokens): {why}"
    )
