"""Train stage: out-of-core SAE training from a store's layer arrays.

:func:`train_sae` streams shuffled batches from the Zarr chunks
(:class:`actstore.stream.ShuffledStream`), so memory is bounded by the shuffle
buffer whatever the store's size; it holds out whole samples for evaluation,
logs metrics (:mod:`actstore.metrics`) to a progress bar and ``metrics.json``,
and checkpoints weights, optimizer state and metric trackers (safetensors) every
``checkpoint_every`` steps under ``STORE/saes/NAME/checkpoint/``. A killed run
started again with the same config continues from its last checkpoint and ends
with the same weights as an uninterrupted run.

Losses (in the normalised input space, ``x * norm_scale``; MSE is the mean
over elements):

* ``relu-l1``: ``MSE + l1 * mean_tokens(sum_i h_i * ||W_dec_i||)``;
* ``topk`` / ``batchtopk``: ``MSE + aux_coef * AuxK``, where AuxK is the MSE of
  reconstructing the residual ``x - x_hat`` from the ``aux_k`` largest
  pre-activations of dead latents; decoder rows stay at unit norm.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from actstore.errors import ConfigError, NotFoundError, StoreError
from actstore.format import layout
from actstore.models.loading import auto_device
from actstore.sae.files import delete_sae, save_sae
from actstore.sae.metrics import TrainTracker, evaluate, task_accuracy
from actstore.sae.model import ARCHS, SAE, SAEConfig, check_d_in
from actstore.sae.stream import RowSplit, ShuffledStream, split_rows
from actstore.storage.integrity import update_manifest
from actstore.storage.location import check_name, write_access
from actstore.storage.locks import StoreLock
from actstore.store.reader import Store, open_store
from actstore.version import __version__

PRESETS: dict[str, dict[str, Any]] = {
    # the seed paper: 768 -> 1024, ReLU, MSE + 1e-3 L1, Adam 2e-5, 10 epochs
    "paper": {"arch": "relu-l1", "d_sae": 1024, "l1": 1e-3, "lr": 2e-5, "epochs": 10},
}
DEFAULT_EXPANSION = 4.0
DEFAULT_LR = 5e-4
DEFAULT_EPOCHS = 3
DEFAULT_K = 32
# fields that may change between a killed run and its restart
RUNTIME_FIELDS = ("device", "workers", "threads", "resume", "overwrite", "log_every", "checkpoint_every", "task_samples")
CKPT = layout.SAE_CHECKPOINT


@dataclass
class TrainConfig:
    """Everything one ``actstore train`` run needs (saved in the SAE's cfg.json as ``training``)."""

    model: str
    """Store key of the model whose activations to train on."""
    layer: int
    """Layer (hidden_states index) to train on."""
    arch: str | None = None
    """relu-l1 (default), topk or batchtopk."""
    d_sae: int | None = None
    """Number of features; default ``expansion * d_in``."""
    expansion: float | None = None
    """d_sae as a multiple of the layer's width (default 4) when d_sae is not given."""
    k: int | None = None
    """Active features per token for topk / batchtopk (default 32, at most d_sae / 4)."""
    l1: float | None = None
    """L1 coefficient for relu-l1 (default 1e-3)."""
    lr: float | None = None
    """Adam learning rate (default 5e-4; paper preset 2e-5)."""
    epochs: int | None = None
    """Passes over the training rows (default 3); ignored when ``tokens`` is given."""
    tokens: int | None = None
    """Train on this many tokens instead of whole epochs."""
    batch_size: int = 1024
    """Tokens per optimizer step."""
    preset: str | None = None
    """'paper': relu-l1, d_sae 1024, l1 1e-3, lr 2e-5, 10 epochs (explicit options still win)."""
    name: str | None = None
    """Name under STORE/saes/ (default MODEL-lLAYER-ARCH-D_SAE)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto."""
    seed: int = 0
    """Seed for initialisation, the held-out split and the shuffling."""
    normalize: bool = True
    """Scale inputs to mean squared norm d_in (the scale is saved as norm_scale)."""
    buffer_mb: int = 256
    """Shuffle buffer size in MiB of float32 rows."""
    workers: int = 2
    """Threads reading and decoding chunks."""
    threads: int | None = None
    """torch CPU threads while training (default: torch's; 1 avoids oversubscription beside other jobs)."""
    eval_fraction: float = 0.05
    """Fraction of tokens held out (as whole samples) for evaluation."""
    max_eval_tokens: int = 20_000
    """Cap on held-out tokens."""
    dead_window: int = 1_000_000
    """A feature is dead after this many training tokens without an activation."""
    dense_threshold: float = 0.1
    """A feature is dense when active on more than this fraction of tokens."""
    aux_k: int | None = None
    """Dead latents used by the topk/batchtopk auxiliary loss (default d_in / 2)."""
    aux_coef: float = 1 / 32
    """Weight of the auxiliary dead-latent loss."""
    task_samples: int = 256
    """Held-out samples for the task-accuracy check (models with a classification head; 0 disables)."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 disables)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (0: only at epoch ends)."""
    log_every: int = 50
    """Steps between metric log entries."""
    resume: bool = False
    """Require an unfinished run to continue (one is continued automatically anyway)."""
    overwrite: bool = False
    """Replace an existing SAE or unfinished run of the same name."""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"--threads must be positive, got {self.threads}")
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ConfigError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
            for key, val in PRESETS[self.preset].items():
                if getattr(self, key) is None and not (key == "d_sae" and self.expansion is not None):
                    setattr(self, key, val)
        self.arch = self.arch or "relu-l1"
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown --arch {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.d_sae is not None and self.expansion is not None:
            raise ConfigError("give --d-sae or --expansion, not both")
        if self.tokens is not None and self.epochs is not None:
            raise ConfigError("give --epochs or --tokens, not both")
        self.l1 = 1e-3 if self.l1 is None else self.l1
        self.lr = DEFAULT_LR if self.lr is None else self.lr
        if self.tokens is None:
            self.epochs = DEFAULT_EPOCHS if self.epochs is None else self.epochs
        checks = [
            (self.d_sae is None or self.d_sae > 0, f"--d-sae must be positive, got {self.d_sae}"),
            (self.expansion is None or self.expansion > 0, f"--expansion must be positive, got {self.expansion}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.l1 >= 0, f"--l1 must be >= 0, got {self.l1}"),
            (self.epochs is None or self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
            (self.tokens is None or self.tokens > 0, f"--tokens must be positive, got {self.tokens}"),
            (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
            (self.k is None or self.k > 0, f"--k must be positive, got {self.k}"),
            (0 <= self.eval_fraction < 1, f"eval_fraction must be in [0, 1), got {self.eval_fraction}"),
            (self.buffer_mb > 0 and self.workers > 0, "buffer_mb and workers must be positive"),
            (self.dead_window > 0, "dead_window must be positive"),
            (self.checkpoint_every >= 0 and self.log_every > 0, "checkpoint_every >= 0 and log_every > 0 please"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.k is not None and self.arch == "relu-l1":
            raise ConfigError("--k is for topk / batchtopk; relu-l1 uses --l1")

    def resolve(self, d_in: int) -> tuple[int, int | None, int]:
        """``(d_sae, k, aux_k)`` for a layer of width ``d_in``."""
        d_sae = self.d_sae or max(1, round((self.expansion or DEFAULT_EXPANSION) * d_in))
        k = None
        if self.arch != "relu-l1":
            k = self.k or max(1, min(DEFAULT_K, d_sae // 4))
            if k > d_sae:
                raise ConfigError(f"--k {k} is larger than d_sae {d_sae}")
        aux_k = min(self.aux_k or max(1, d_in // 2), d_sae)
        return d_sae, k, aux_k

    def default_name(self, d_sae: int) -> str:
        from actstore.models.loading import sanitize_key

        return sanitize_key(f"{self.model}-l{self.layer}-{self.arch}-{d_sae}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    resumed_from: int = 0
    """Step the run resumed from (0: a fresh run)."""
    store: str = ""
    split: RowSplit | None = field(default=None, repr=False)
    """The train / held-out split used."""


class PartialLayerWarning(UserWarning):
    """Training on a layer whose extraction is not finished (only its committed rows are used)."""


class LossParts(NamedTuple):
    """One training step's loss and what the metrics need."""

    loss: torch.Tensor
    mse: torch.Tensor
    """Element MSE in normalised space."""
    penalty: torch.Tensor
    """L1 term (relu-l1) or auxiliary loss (topk / batchtopk), before its coefficient."""
    acts: torch.Tensor
    """(b, d_sae)"""
    x_hat_n: torch.Tensor
    """(b, d_in), normalised space"""


def sae_loss(sae: SAE, x: torch.Tensor, dead: torch.Tensor | None, l1: float, aux_k: int, aux_coef: float) -> LossParts:
    """Training loss of ``sae`` on raw activations ``x (b, d_in)``; ``dead`` is a bool ``(d_sae,)`` mask."""
    xn = x * sae.cfg.norm_scale  # (b, d_in)
    pre = sae.pre_acts(x)  # (b, d_sae)
    acts = sae.activate(pre, train=True)
    x_hat_n = sae.decode_normalised(acts)
    mse = ((x_hat_n - xn) ** 2).mean()
    if sae.cfg.arch == "relu-l1":
        penalty = (acts * sae.W_dec.norm(dim=1)).sum(-1).mean()
        return LossParts(mse + l1 * penalty, mse, penalty, acts, x_hat_n)
    penalty = torch.zeros((), device=x.device)
    if dead is not None and bool(dead.any()):
        resid = (xn - x_hat_n).detach()  # (b, d_in)
        dead_pre = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        kk = min(aux_k, int(dead.sum()))
        vals, idx = dead_pre.topk(kk, dim=-1)
        aux_acts = torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))
        penalty = ((aux_acts @ sae.W_dec - resid) ** 2).mean()
    return LossParts(mse + aux_coef * penalty, mse, penalty, acts, x_hat_n)


def train_step(sae: SAE, opt: torch.optim.Optimizer, x: torch.Tensor, tracker: TrainTracker, cfg: TrainConfig,
               aux_k: int) -> LossParts:  # fmt: skip
    """One optimizer step on raw activations ``x (b, d_in)`` (already on the SAE's device); updates ``tracker``."""
    dead = tracker.dead_mask() if sae.cfg.arch != "relu-l1" else None
    parts = sae_loss(sae, x, dead, float(cfg.l1 or 0.0), aux_k, cfg.aux_coef)
    opt.zero_grad(set_to_none=True)
    parts.loss.backward()
    if sae.cfg.arch != "relu-l1":
        sae.remove_parallel_grads()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    opt.step()
    if sae.cfg.arch != "relu-l1":
        sae.set_decoder_norm()
    with torch.no_grad():
        tracker.update(x, parts.x_hat_n / sae.cfg.norm_scale, parts.acts)
    return parts


def _estimate_stats(stream: ShuffledStream, seed: int, max_chunks: int = 16) -> tuple[float, np.ndarray]:
    """``(mean squared norm, mean (d_in,))`` of the training rows of a few random chunks."""
    rng = np.random.default_rng([seed, 3])
    pick = rng.permutation(len(stream.chunks))[:max_chunks]
    sq, tot, n = 0.0, np.zeros(stream.acts.d_model, dtype=np.float64), 0
    for i in sorted(pick):
        v = stream._read(*stream.chunks[i]).astype(np.float64)  # (m, d_model)
        sq += float((v**2).sum())
        tot += v.sum(0)
        n += len(v)
    return sq / max(n, 1), tot / max(n, 1)


# ---------------------------------------------------------------- checkpoints
def _identity(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_FIELDS}


def _save_checkpoint(store: Store, name: str, sae: SAE, opt: torch.optim.Optimizer, tracker: TrainTracker,
                     meta: dict[str, Any]) -> None:  # fmt: skip
    tensors = {f"sae.{k}": v for k, v in sae.state_tensors().items()}
    for pid, st in opt.state_dict()["state"].items():
        for key, val in st.items():
            tensors[f"opt.{pid}.{key}"] = torch.as_tensor(val).detach().cpu().contiguous()
    tensors.update(tracker.state())
    md = {"meta": json.dumps(meta, default=float), "sae_cfg": sae.cfg.to_json()}
    store.loc.write_bytes(layout.sae_file(name, CKPT), st_save(tensors, metadata=md))


def _read_checkpoint(store: Store, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], SAEConfig]:
    raw = store.loc.read_bytes(layout.sae_file(name, CKPT))
    tensors = st_load(raw)
    n = int.from_bytes(raw[:8], "little")  # safetensors header: 8-byte length, then JSON with __metadata__
    md = json.loads(raw[8 : 8 + n]).get("__metadata__", {})
    return tensors, json.loads(md["meta"]), SAEConfig.from_dict(json.loads(md["sae_cfg"]))


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = val
    sd["state"] = state
    opt.load_state_dict(sd)


# ---------------------------------------------------------------- training
def train_sae(
    store: Store | str,
    cfg: TrainConfig,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    storage_options: dict[str, Any] | None = None,
    writable: bool = False,
) -> TrainResult:
    """Train an SAE on (cfg.model, cfg.layer) of ``store`` and save it under ``saes/NAME/``.

    A store given by URL must be opened writable (``writable=True``, ``--writable``) to save into it;
    this is checked before any training.

    ``on_step(step, info)`` is called after every optimizer step (after any
    checkpoint of that step is written).
    """
    if not cfg.threads:
        return _train_sae(store, cfg, progress, on_step, storage_options, writable)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train_sae(store, cfg, progress, on_step, storage_options, writable)
    finally:
        torch.set_num_threads(before)


def _train_sae(
    store: Store | str,
    cfg: TrainConfig,
    progress: bool,
    on_step: Callable[[int, dict[str, Any]], None] | None,
    storage_options: dict[str, Any] | None,
    writable: bool,
) -> TrainResult:
    if isinstance(store, str):  # a path: local stores are writable by a writing command, URLs with writable only
        st = open_store(store, storage_options=storage_options, writable=write_access(store, writable))
    else:
        st = store
    if st.loc.read_only:
        raise StoreError(f"store {st.url} is open read-only: pass --writable (open_store(url, writable=True)) to save an SAE")
    acts = st.activations(cfg.model, cfg.layer)  # NotFoundError names the model / layer
    d_in = acts.d_model
    if len(acts) == 0:
        raise NotFoundError(f"layer {cfg.layer} of model {cfg.model!r} in {st.url} has no committed rows yet: finish extract")
    d_sae, k, aux_k = cfg.resolve(d_in)
    name = cfg.name or cfg.default_name(d_sae)
    check_name(name, "SAE")  # one folder under saes/: 'a/b' would make an SAE nothing can find
    device = torch.device(auto_device(cfg.device))
    tok = st.model_tokenization(cfg.model)
    if not acts.attrs.get("complete"):
        warnings.warn(
            f"{cfg.model} layer {cfg.layer} in {st.url} is only partly extracted ({len(acts)} of "
            f"{acts.attrs.get('n_rows')} rows committed): training on the committed rows; finish the extract for the rest",
            PartialLayerWarning, stacklevel=3,
        )  # fmt: skip
    lock = StoreLock(st.loc, layout.sae_dir(name), f"train {name}").acquire()  # one trainer of an SAE name at a time
    try:
        return _train_locked(st, cfg, progress, on_step, acts, d_in, d_sae, k, aux_k, name, device, tok)
    finally:
        lock.release()


def _train_locked(
    st: Store, cfg: TrainConfig, progress: bool, on_step: Callable[[int, dict[str, Any]], None] | None, acts: Any,
    d_in: int, d_sae: int, k: int | None, aux_k: int | None, name: str, device: torch.device, tok: Any,
) -> TrainResult:  # fmt: skip
    from tqdm.auto import tqdm

    # ---- existing SAE / unfinished run?
    finished = st.loc.exists(layout.sae_file(name, layout.SAE_CONFIG))
    ckpt = st.loc.exists(layout.sae_file(name, CKPT))
    if cfg.overwrite:
        delete_sae(st, name)
        finished = ckpt = False
    elif finished:
        raise ConfigError(f"SAE {name!r} already exists in {st.url}: pass --overwrite to replace it, or choose another --name")
    elif cfg.resume and not ckpt:
        raise NotFoundError(f"no unfinished run named {name!r} in {st.url} to resume: drop --resume to start one")

    split = split_rows(tok, len(acts), cfg.eval_fraction, cfg.max_eval_tokens, cfg.seed)
    buffer_rows = max(1, cfg.buffer_mb * 2**20 // (4 * d_in))
    stream = ShuffledStream(acts, split.train_mask, cfg.batch_size, buffer_rows, seed=cfg.seed, workers=cfg.workers,
                            pin_memory=device.type == "cuda")  # fmt: skip
    per_epoch = stream.batches_per_epoch
    total_steps = math.ceil(cfg.tokens / cfg.batch_size) if cfg.tokens else per_epoch * int(cfg.epochs or 1)

    torch.manual_seed(cfg.seed)
    tracker = TrainTracker(d_sae, cfg.dead_window, cfg.dense_threshold)
    meta: dict[str, Any] = {"step": 0, "history": [], "threshold_ema": None, "config": _identity(cfg)}
    tensors: dict[str, torch.Tensor] | None = None
    if ckpt:
        tensors, meta, sae_cfg = _read_checkpoint(st, name)
        if meta.get("config") != _identity(cfg):
            old = meta.get("config", {})
            diff = sorted(k_ for k_ in set(old) | set(_identity(cfg)) if old.get(k_) != _identity(cfg).get(k_))
            raise ConfigError(
                f"an unfinished run named {name!r} in {st.url} was started with other options (differs in: {', '.join(diff)}): "
                "rerun with the original options to continue it, or pass --overwrite to start over"
            )
        check_d_in(sae_cfg, d_in, f"layer {cfg.layer} of model {cfg.model!r} in {st.url}")
        sae = SAE(sae_cfg)
    else:
        mean_sq, mean = _estimate_stats(stream, cfg.seed)
        scale = math.sqrt(d_in / mean_sq) if cfg.normalize and mean_sq > 0 else 1.0
        sae_cfg = SAEConfig(
            arch=str(cfg.arch), d_in=d_in, d_sae=d_sae, k=k, l1=float(cfg.l1 or 0.0), norm_scale=scale, model=cfg.model,
            layer=cfg.layer, tokenization=tok.key, name=name, training=cfg.to_dict(), actstore_version=__version__,
        )  # fmt: skip
        sae = SAE(sae_cfg)
        with torch.no_grad():
            sae.b_dec.copy_(torch.from_numpy(mean * scale).float())
    sae.to(device).train()
    opt = torch.optim.Adam(sae.parameters(), lr=float(cfg.lr))
    tracker.to(device)
    if tensors is not None:
        sae.load_state_dict({k_[4:]: v.to(device) for k_, v in tensors.items() if k_.startswith("sae.")})
        _restore_optimizer(opt, tensors)
        tracker.load(tensors)
    start_step = int(meta["step"])
    history: list[dict[str, Any]] = list(meta.get("history", []))
    thr_ema = meta.get("threshold_ema")

    eval_x = torch.from_numpy(acts.take(split.eval_rows)) if len(split.eval_rows) else torch.zeros(0, d_in)

    def run_eval() -> dict[str, Any]:
        sae.eval()
        if sae.cfg.arch == "batchtopk" and thr_ema is not None:
            sae.threshold.fill_(float(thr_ema))
        out = evaluate(sae, eval_x, cfg.batch_size, cfg.dense_threshold)
        sae.train()
        return out

    def checkpoint(step: int) -> None:
        meta.update(step=step, history=history, threshold_ema=thr_ema, config=_identity(cfg))
        _save_checkpoint(st, name, sae, opt, tracker, meta)

    bar = tqdm(total=total_steps, initial=start_step, disable=not progress, desc=f"train {name}", unit="step", leave=False)
    step = start_step
    t0 = time.perf_counter()
    last_train: dict[str, Any] = {}
    try:
        while step < total_steps:
            epoch, skip = divmod(step, per_epoch)
            for batch in stream.batches(epoch, skip):
                x = batch.to(device, non_blocking=True)  # (b, d_in)
                parts = train_step(sae, opt, x, tracker, cfg, aux_k)
                if sae.cfg.arch == "batchtopk":
                    with torch.no_grad():
                        pos = parts.acts[parts.acts > 0]
                        if pos.numel():
                            m = float(pos.min())
                            thr_ema = m if thr_ema is None else 0.99 * thr_ema + 0.01 * m
                step += 1
                bar.update(1)
                end_of_epoch = step % per_epoch == 0
                if step % cfg.log_every == 0 or end_of_epoch or step == total_steps:
                    entry: dict[str, Any] = {"step": step, "epoch": step / per_epoch, "tokens": tracker.tokens_seen,
                                             "loss": float(parts.loss.detach()), **tracker.interval(d_in)}  # fmt: skip
                    if (end_of_epoch and not cfg.tokens) or step == total_steps:
                        entry["eval"] = run_eval()
                    history.append(entry)
                    last_train = entry
                    bar.set_postfix(fvu=f"{entry.get('fvu', float('nan')):.3f}", l0=f"{entry.get('l0', 0):.1f}",
                                    dead=f"{entry['dead_fraction']:.2f}")  # fmt: skip
                if step < total_steps and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or end_of_epoch):
                    checkpoint(step)
                if on_step is not None:
                    on_step(step, {"loss": float(parts.loss.detach()), "epoch": epoch})
                if step >= total_steps:
                    break
    finally:
        bar.close()
    seconds = time.perf_counter() - t0

    # ---- finish: final metrics, save, drop the checkpoint
    sae.eval()
    if sae.cfg.arch == "batchtopk" and thr_ema is not None:
        sae.threshold.fill_(float(thr_ema))
    final_eval = history[-1].get("eval") if history and "eval" in history[-1] else run_eval()
    train_final = {k_: v for k_, v in last_train.items() if k_ not in ("eval", "step", "epoch", "tokens", "loss")}
    steps_run = step - start_step
    task = task_accuracy(st, sae, split.eval_samples, str(device), cfg.task_samples) if cfg.task_samples else None
    metrics = {
        "name": name,
        "steps": step,
        "tokens": tracker.tokens_seen,
        "epochs": step / per_epoch,
        "n_train_rows": split.n_train,
        "n_eval_rows": int(len(split.eval_rows)),
        "n_eval_samples": int(len(split.eval_samples)),
        "train": train_final,
        "eval": final_eval,
        "threshold": float(sae.threshold) if sae.cfg.arch == "batchtopk" else None,
        "norm_scale": sae.cfg.norm_scale,
        "seconds": seconds,
        "steps_per_s": steps_run / seconds if seconds > 0 else 0.0,
        "resumed_from": start_step,
        "device": str(device),
        "history": history,
        "task": task,
    }
    save_sae(st, sae, name, metrics)
    st.loc.rmtree(layout.sae_file(name, layout.SAE_CHECKPOINT_DIR))
    update_manifest(st.loc, prefixes=[layout.sae_dir(name)])  # checksums for the new files (actstore verify)
    return TrainResult(
        name=name, sae=sae, metrics=metrics, steps=step, tokens=tracker.tokens_seen, seconds=seconds,
        steps_per_s=metrics["steps_per_s"], resumed_from=start_step, store=st.url, split=split,
    )  # fmt: skip
