"""One SAE training run's state and phases (:class:`TrainingRun`: start or restore, loop, finish), its checkpoints
(safetensors, every ``checkpoint_every`` steps) and its result. :func:`actstore.sae.train.train_sae` runs one;
:mod:`actstore.sae.group` runs several from one pass over the rows."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actstore.errors import ConfigError
from actstore.format import layout
from actstore.models.checkpoint import restore_optimizer
from actstore.sae.archs import get_arch
from actstore.sae.config import FIELDS_ADDED, RUNTIME_FIELDS, SAEConfig, TrainConfig
from actstore.sae.fidelity import spliced_fidelity
from actstore.sae.files import read_checkpoint, save_checkpoint, save_sae
from actstore.sae.loss import LossParts, train_step
from actstore.sae.metrics import (
    RisingFVUWarning,
    TrainTracker,
    curve_after,
    evaluate,
    rising_fvu,
    rising_fvu_cause,
    training_curves,
)
from actstore.sae.model import SAE, check_d_in
from actstore.sae.optim import ScheduleFreeSignSGD, averaged, make_optimizer
from actstore.sae.recipe import ramp
from actstore.sae.resample import MIN_EXPECTED_FIRES, resample_latents, resample_steps
from actstore.sae.rows import (
    estimate_stats,
    held_out_rows,
)
from actstore.sae.stream import RowSplit, ShuffledStream
from actstore.storage.integrity import update_manifest
from actstore.store.reader import Store
from actstore.version import __version__

CKPT = layout.SAE_CHECKPOINT


@dataclass
class TrainResult:
    """What a training run made."""

    name: str
    """Name under STORE/saes/."""
    sae: SAE
    """The trained SAE (on the training device, eval mode)."""
    metrics: dict[str, Any]
    """Contents of metrics.json (final train and held-out metrics, history)."""
    steps: int
    """Optimizer steps in total (including those before a resume)."""
    tokens: int
    """Training tokens seen in total."""
    seconds: float
    """Wall time of this process's training loop."""
    steps_per_s: float
    """Steps per second in this process."""
    eval_seconds: float = 0.0
    """Of ``seconds``, the time spent on held-out evaluations (the curves' points and the final metrics)."""
    resumed_from: int = 0
    """Step the run resumed from (0: a fresh run)."""
    store: str = ""
    split: RowSplit | None = field(default=None, repr=False)
    """The train / held-out split used."""


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The options that decide what a run trains, as given (before :meth:`TrainConfig.resolve`): a checkpoint keeps
    them, and a restart with other ones is refused."""
    return {k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_FIELDS}


CALIBRATION_BATCHES = 8
"""Training batches a batchtopk SAE's inference threshold is calibrated on at the end of its run."""


class TrainingRun:
    """One training run's state — the SAE, its optimizer, the dead-feature tracker, the history — and its phases:
    :meth:`start` or :meth:`restore`, then :meth:`loop`, then :meth:`finish`."""

    def __init__(
        self,
        st: Store,
        cfg: TrainConfig,
        name: str,
        acts: Any,
        split: RowSplit,
        stream: ShuffledStream,
        device: torch.device,
        sae: SAE,
        meta: dict[str, Any],
        eval_x: torch.Tensor | None = None,
    ) -> None:
        self.st, self.cfg, self.name, self.split, self.stream, self.device = (
            st,
            cfg,
            name,
            split,
            stream,
            device,
        )
        self.aux_k = int(cfg.aux_k or 1)  # resolved (TrainConfig.resolve)
        self.sae = sae.to(device).train()
        self.per_epoch = stream.batches_per_epoch
        self.total_steps = (
            math.ceil(cfg.tokens / cfg.batch_size)
            if cfg.tokens
            else self.per_epoch * int(cfg.epochs or 1)
        )
        self.base_lr = cfg.learning_rate(sae.cfg.d_sae, self.total_steps * cfg.batch_size)
        self.resample_steps = resample_steps(cfg.resample, self.total_steps)
        self.opt = make_optimizer(str(cfg.optimizer), self.sae.parameters(), self.base_lr)
        self.tracker = TrainTracker(sae.cfg.d_sae, cfg.dead_window, cfg.dense_threshold).to(device)
        self.meta = meta
        self.start_step = self.step = int(meta["step"])
        self.history: list[dict[str, Any]] = list(meta.get("history", []))
        self.thr_ema: float | None = meta.get("threshold_ema")
        self.eval_x = (
            eval_x if eval_x is not None else held_out_rows(acts, split)
        )  # (n_eval, d_model)
        # the FVU-tokens curve: an evenly spaced subset of the held-out rows (cheap)
        n_curve = len(self.eval_x)
        pick = np.linspace(0, n_curve - 1, cfg.curve_eval_tokens).round().astype(np.int64)
        self.curve_x = (
            self.eval_x if n_curve <= cfg.curve_eval_tokens else self.eval_x[torch.from_numpy(pick)]
        )
        self.last_train: dict[str, Any] = {}
        self.eval_seconds = self.loop_eval_seconds = (
            0.0  # this process's time in evaluate(): in all, in the loop
        )
        n_ev = min(cfg.eval_points, self.total_steps)
        self.eval_steps = (
            {math.ceil(self.total_steps * (i + 1) / n_ev) for i in range(n_ev)} if n_ev else set()
        )

    # ---- init or restore
    @classmethod
    def start(
        cls,
        st: Store,
        cfg: TrainConfig,
        identity: dict[str, Any],
        name: str,
        acts: Any,
        split: RowSplit,
        stream: ShuffledStream,
        device: torch.device,
        tokenization: str,
        eval_x: torch.Tensor | None = None,
    ) -> TrainingRun:
        """A new run of a resolved ``cfg`` (``identity``: the options as given, kept in its checkpoints): inputs
        scaled to mean squared norm d_in, ``b_dec`` at the (scaled) mean of a few chunks or zeros."""
        sources = cfg.sources()
        pair = cfg.transcoder_pair()
        n_src = (
            len(sources) if sources else 2 if pair else 1
        )  # row blocks: a transcoder's source and target
        d_in = acts.d_model // n_src
        data_init = cfg.init == "data"
        d_sae = int(cfg.d_sae or 0)
        mean_sq, mean, sample = estimate_stats(
            stream, cfg.seed, n_src, n_sample=d_sae if data_init else 0
        )
        scales = [math.sqrt(d_in / v) if cfg.normalize and v > 0 else 1.0 for v in mean_sq]
        cross: dict[str, Any] = {}
        if sources is not None:
            cross = {
                "models": [s.model for s in sources],
                "layers": [s.layer for s in sources],
                "norm_scales": scales,
            }
        elif pair is not None:
            cross = {
                "target": {"model": pair[1].model, "layer": pair[1].layer, "norm_scale": scales[1]},
                "skip": bool(cfg.skip),
            }
        sae = SAE(
            SAEConfig(
                arch=str(cfg.arch),
                d_in=d_in,
                d_sae=d_sae,
                k=cfg.k,
                l1=float(cfg.l1 or 0.0),
                norm_scale=scales[0],
                model=cfg.model,
                layer=cfg.layer,
                tokenization=tokenization,
                name=name,
                training=cfg.to_dict(),
                actstore_version=__version__,
                **cross,
            )
        )
        if cfg.b_dec_init == "mean":  # at the mean of what it reconstructs
            target_mean = mean[d_in:] if pair is not None else mean
            with torch.no_grad():
                sae.b_dec.copy_(torch.from_numpy(target_mean).float() * sae.out_scale)
        if data_init:
            # (n_src * d_in,): each block of columns (a crosscoder's sources, a transcoder's sides) by its own scale
            cols = torch.tensor(scales, dtype=torch.float32).repeat_interleave(d_in)
            rows_n = torch.from_numpy(sample).float() * cols
            get_arch(str(cfg.arch)).start(sae, rows_n, torch.from_numpy(mean).float() * cols)
        meta = {"step": 0, "history": [], "threshold_ema": None, "config": identity}
        return cls(st, cfg, name, acts, split, stream, device, sae, meta, eval_x)

    @classmethod
    def restore(
        cls,
        st: Store,
        cfg: TrainConfig,
        identity: dict[str, Any],
        name: str,
        acts: Any,
        split: RowSplit,
        stream: ShuffledStream,
        device: torch.device,
        eval_x: torch.Tensor | None = None,
    ) -> TrainingRun:
        """The run continued from its checkpoint, refused when it was started with other options (``identity``, the
        options as given, against the checkpoint's)."""
        tensors, meta, sae_cfg = read_checkpoint(st, name)
        old, new = (
            {**FIELDS_ADDED, **meta.get("config", {})},
            identity,
        )  # an older run: the values it used
        # a field one side lacks is its default, None: a run checkpointed by another version's fields still matches
        diff = sorted(k_ for k_ in set(old) | set(new) if old.get(k_) != new.get(k_))
        if diff:
            raise ConfigError(
                f"an unfinished run named {name!r} in {st.url} was started with other options (differs in: {', '.join(diff)}): "
                "rerun with the original options to continue it, or pass --overwrite to start over"
            )
        check_d_in(
            sae_cfg,
            getattr(acts, "d_source", acts.d_model),
            f"layer {cfg.layer} of model {cfg.model!r} in {st.url}",
        )
        meta["config"] = (
            identity  # the checkpoint's, with any field added since at the value it used
        )
        run = cls(st, cfg, name, acts, split, stream, device, SAE(sae_cfg), meta, eval_x)
        run.sae.load_state_dict(
            {k_[4:]: v.to(device) for k_, v in tensors.items() if k_.startswith("sae.")}
        )
        restore_optimizer(run.opt, tensors)
        run.tracker.load(tensors)
        return run

    # ---- the loop
    def evaluate(self, x: torch.Tensor | None = None) -> dict[str, Any]:
        """Held-out metrics of the model being trained (signum: its averaged parameters, the ones saved)."""
        t0 = time.perf_counter()
        self.sae.eval()
        self._set_threshold()
        with averaged(self.opt):
            out = evaluate(
                self.sae,
                self.eval_x if x is None else x,
                self.cfg.batch_size,
                self.cfg.dense_threshold,
            )
        self.sae.train()
        self.eval_seconds += time.perf_counter() - t0
        return out

    def _set_threshold(self) -> None:
        """batchtopk: inference uses the running mean of each batch's smallest kept activation."""
        if get_arch(self.sae.cfg.arch).calibrated_threshold and self.thr_ema is not None:
            self.sae.threshold.fill_(float(self.thr_ema))

    @torch.no_grad()
    def _calibrate_threshold(self) -> None:
        """batchtopk: the inference threshold from the final weights, the mean over a few training batches of the
        smallest activation the batch top-k keeps (so held-out L0 is about k). The running average kept during
        training lags behind the weights: in a short run it stays near the untrained model's (L0 11 at k 32)."""
        if not get_arch(self.sae.cfg.arch).calibrated_threshold:
            return
        mins = []
        for i, batch in enumerate(self.stream.batches(0, 0)):
            if i >= CALIBRATION_BATCHES:
                break
            # (b, d_sae)
            inputs = self.sae.split_rows(batch.to(self.device))[0]  # a transcoder's: its source
            acts = self.sae.activate(self.sae.pre_acts(inputs), train=True)
            pos = acts[acts > 0]
            if pos.numel():
                mins.append(float(pos.min()))
        if mins:
            self.thr_ema = sum(mins) / len(mins)
            # measured with the old threshold: measure it again
            if self.history and "eval" in self.history[-1]:
                self.history[-1]["eval"] = self.evaluate()
            if self.history and "curve" in self.history[-1]:
                self.history[-1]["curve"] = self._curve_point(self.history[-1])

    def checkpoint(self) -> None:
        self.meta.update(
            step=self.step, history=self.history, threshold_ema=self.thr_ema
        )  # config: the identity
        save_checkpoint(self.st, self.name, self.sae, self.opt, self.tracker, self.meta)

    def loop(self, progress: bool, on_step: Callable[[int, dict[str, Any]], None] | None) -> float:
        """Train until ``total_steps``; returns the seconds it took."""
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not progress,
            desc=f"train {self.name}",
            unit="step",
            leave=False,
        )
        t0 = time.perf_counter()
        try:
            while self.step < self.total_steps:
                epoch, skip = divmod(self.step, self.per_epoch)
                for batch in self.stream.batches(epoch, skip):
                    self.train_on(
                        batch.to(self.device, non_blocking=True), epoch, bar, on_step
                    )  # (b, d_in)
                    if self.step >= self.total_steps:
                        break
        finally:
            bar.close()
        # what finish() evaluates is not part of the loop's time
        self.loop_eval_seconds = self.eval_seconds
        return time.perf_counter() - t0

    def train_on(
        self,
        x: torch.Tensor,
        epoch: int,
        bar: Any,
        on_step: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        """One optimizer step on the batch ``x (b, d_in)``, then its log entry, evaluations and checkpoint."""
        parts = self._one_step(x)
        bar.update(1)
        self._log(parts, bar)
        end_of_epoch = self.step % self.per_epoch == 0
        every = self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0
        if self.step < self.total_steps and (every or end_of_epoch):
            self.checkpoint()
        if on_step is not None:
            on_step(self.step, {"loss": float(parts.loss.detach()), "epoch": epoch})

    def _curve_point(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Held-out metrics on the curve's rows; the entry's full evaluation when those are all the held-out rows."""
        if self.curve_x is self.eval_x and "eval" in entry:
            return entry["eval"]
        return self.evaluate(self.curve_x)

    def l1_at(self, step: int) -> float:
        """relu-l1's L1 coefficient at ``step``: ramped linearly from 0 over the first ``l1_warmup`` of the steps."""
        return float(self.cfg.l1 or 0.0) * ramp(step, self.cfg.l1_warmup * self.total_steps)

    def _check_rising(self) -> None:
        """Warn (once per run, kept in metrics.json's ``warnings``) when the held-out FVU rises at two curve points in
        a row after relu-l1's L1 warm-up and the last dead-latent resampling."""
        warned = self.meta.setdefault("warnings", [])
        if any("held-out FVU rose" in w for w in warned):
            return
        warm = (
            self.cfg.l1_warmup * self.total_steps if get_arch(self.sae.cfg.arch).l1_penalty else 0
        )
        # a resampling disturbs the curve on purpose: judge it after the last
        warm = max(warm, *self.resample_steps, 0)
        fvus = curve_after(self.history, warm)
        if rising_fvu(fvus):
            msg = rising_fvu_cause(self.cfg, self.base_lr, fvus, self.tracker.tokens_seen)
            warned.append(msg)
            warnings.warn(f"SAE {self.name}: {msg}", RisingFVUWarning, stacklevel=2)

    def _one_step(self, x: torch.Tensor) -> LossParts:
        lr = self.base_lr * self.cfg.lr_factor(self.step, self.total_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        parts = train_step(
            self.sae, self.opt, x, self.tracker, self.cfg, self.aux_k, self.l1_at(self.step)
        )
        if parts.kept is not None:  # batchtopk
            with torch.no_grad():
                pos = parts.kept[parts.kept > 0]
                if pos.numel():
                    m = float(pos.min())
                    self.thr_ema = m if self.thr_ema is None else 0.99 * self.thr_ema + 0.01 * m
        self.step += 1
        if self.step in self.resample_steps:
            self._resample(x, parts)
        return parts

    def _resample(self, x: torch.Tensor, parts: LossParts) -> None:
        """Latents silent since the last resampling restart toward this batch's residuals (:mod:`actstore.sae.resample`);
        skipped while the window is too short to tell a rare latent from a dead one (under MIN_EXPECTED_FIRES per latent)."""
        since = int(self.meta.get("resampled_at_tokens", 0))
        done = self.meta.setdefault("resampled", [])
        k = self.sae.cfg.k
        if k and (self.tracker.tokens_seen - since) * k < MIN_EXPECTED_FIRES * self.sae.cfg.d_sae:
            done.append(
                {
                    "step": self.step,
                    "tokens": self.tracker.tokens_seen,
                    "latents": 0,
                    "skipped": "window too short",
                }
            )
            return
        silent = self.tracker.last_fired <= since
        n = resample_latents(
            self.sae,
            self.opt,
            x * self.sae.scale,
            parts.x_hat_n.detach(),
            silent,
            self.cfg.seed + self.step,
        )
        self.meta["resampled_at_tokens"] = self.tracker.tokens_seen
        done.append({"step": self.step, "tokens": self.tracker.tokens_seen, "latents": n})

    def _log(self, parts: LossParts, bar: Any) -> None:
        """A history entry every ``log_every`` steps, at each epoch's end and at each of the ``eval_points`` (with
        held-out metrics at the epoch ends, the eval points and the last step)."""
        step, cfg = self.step, self.cfg
        end_of_epoch = step % self.per_epoch == 0
        at_eval = step in self.eval_steps
        if not (step % cfg.log_every == 0 or end_of_epoch or at_eval or step == self.total_steps):
            return
        entry: dict[str, Any] = {
            "step": step,
            "epoch": step / self.per_epoch,
            "tokens": self.tracker.tokens_seen,
            "loss": float(parts.loss.detach()),
            "lr": float(self.opt.param_groups[0]["lr"]),
            **self.tracker.interval(self.sae.d_input),
        }
        if (end_of_epoch and not cfg.tokens) or step == self.total_steps:
            entry["eval"] = self.evaluate()
        if at_eval or step == self.total_steps:
            entry["curve"] = self._curve_point(entry)
        self.history.append(entry)
        if "curve" in entry:
            self._check_rising()
        self.last_train = entry
        bar.set_postfix(
            fvu=f"{entry.get('fvu', float('nan')):.3f}",
            l0=f"{entry.get('l0', 0):.1f}",
            dead=f"{entry['dead_fraction']:.2f}",
        )

    # ---- finish
    def finish(self, seconds: float) -> TrainResult:
        """Final metrics, the SAE saved, the checkpoint dropped, checksums recorded."""
        sae, step, split = self.sae, self.step, self.split
        if isinstance(self.opt, ScheduleFreeSignSGD):
            self.opt.finalize()  # the averaged parameters are the model
        self._calibrate_threshold()
        sae.eval()
        self._set_threshold()
        history = self.history
        final_eval = history[-1]["eval"] if history and "eval" in history[-1] else self.evaluate()
        sae.eval()  # evaluate() leaves it in training mode
        steps_run = step - self.start_step
        task = None
        if self.cfg.task_samples and not sae.cfg.is_crosscoder:
            task = spliced_fidelity(
                self.st, sae, split.eval_samples, str(self.device), self.cfg.task_samples
            )
        metrics = {
            "name": self.name,
            "steps": step,
            "tokens": self.tracker.tokens_seen,
            "epochs": step / self.per_epoch,
            "lr": self.base_lr,  # the peak learning rate (before warm-up and decay)
            "n_train_rows": split.n_train,
            "n_eval_rows": int(len(split.eval_rows)),
            "n_eval_samples": int(len(split.eval_samples)),
            "train": {
                k_: v
                for k_, v in self.last_train.items()
                if k_ not in ("eval", "step", "epoch", "tokens", "loss", "lr")
            },
            "eval": final_eval,
            "threshold": float(sae.threshold)
            if get_arch(sae.cfg.arch).calibrated_threshold
            else None,
            "norm_scale": sae.cfg.norm_scale,
            "norm_scales": sae.cfg.norm_scales,
            "seconds": seconds,
            "steps_per_s": steps_run / seconds if seconds > 0 else 0.0,
            "eval_seconds": self.loop_eval_seconds,
            "resumed_from": self.start_step,
            "device": str(self.device),
            "history": history,
            "curves": training_curves(history),
            "task": task,
            "warnings": list(self.meta.get("warnings", [])),
            "resampled": list(self.meta.get("resampled", [])),
        }
        save_sae(self.st, sae, self.name, metrics)
        self.st.loc.rmtree(layout.sae_file(self.name, layout.SAE_CHECKPOINT_DIR))
        # checksums for the new files (actstore verify)
        update_manifest(self.st.loc, prefixes=[layout.sae_dir(self.name)])
        return TrainResult(
            name=self.name,
            sae=sae,
            metrics=metrics,
            steps=step,
            tokens=self.tracker.tokens_seen,
            seconds=seconds,
            steps_per_s=metrics["steps_per_s"],
            eval_seconds=self.loop_eval_seconds,
            resumed_from=self.start_step,
            store=self.st.url,
            split=split,
        )
