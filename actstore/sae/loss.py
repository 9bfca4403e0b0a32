"""One training step of an SAE: its loss and the optimizer step.

Losses (in the normalised input space, ``x * norm_scale``; MSE is the mean
over elements):

* ``relu-l1``: ``MSE + l1 * mean_tokens(sum_i h_i * ||W_dec_i||)``;
* ``topk`` / ``batchtopk``: ``MSE + aux_coef * AuxK``, where AuxK is the MSE of
  reconstructing the residual ``x - x_hat`` from the ``aux_k`` largest
  pre-activations of dead latents; decoder rows stay at unit norm;
* plus what an architecture adds to a batch top-k step (``Arch.extra_loss``: Matryoshka's nested prefixes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from actstore.sae.archs import get_arch
from actstore.sae.archs.base import Entries
from actstore.sae.config import TrainConfig
from actstore.sae.metrics import TrainTracker
from actstore.sae.model import SAE
from actstore.sae.sparse import BatchTopKEncode, TopKEncode, decode_entries, decode_topk


class LossParts(NamedTuple):
    """One training step's loss and what the metrics need."""

    loss: torch.Tensor
    mse: torch.Tensor
    """Element MSE in normalised space."""
    penalty: torch.Tensor
    """L1 term (relu-l1) or auxiliary loss (topk / batchtopk), before its coefficient."""
    acts: torch.Tensor | None
    """(b, d_sae); None from the sparse topk / batchtopk step, which never makes the dense matrix"""
    x_hat_n: torch.Tensor
    """(b, d_in), normalised space"""
    fired: torch.Tensor
    """(d_sae,) tokens of the batch each feature was active on"""
    kept: torch.Tensor | None = None
    """batchtopk: (m,) the activations the batch top-k kept (their minimum sets the inference threshold)"""


def sae_loss(
    sae: SAE,
    x: torch.Tensor,
    dead: torch.Tensor | None,
    l1: float,
    aux_k: int,
    aux_coef: float,
    options: Mapping[str, Any] | None = None,
    target: torch.Tensor | None = None,
) -> LossParts:
    """Training loss of ``sae`` on raw activations ``x (b, d_in)``; ``dead`` is a bool ``(d_sae,)`` mask. An
    architecture may add a loss to a batch top-k step's (:meth:`Arch.extra_loss`, given ``options``: the values of
    its options, e.g. Matryoshka's nested prefixes). A transcoder reconstructs ``target (b, d_in)`` (raw rows of its
    target site) instead of ``x``, plus its skip connection's part."""
    # (b, d_in); a crosscoder's (b, n_sources * d_in), each source by its own scale
    xn = x * sae.scale
    tn = xn if target is None else target * sae.out_scale  # what it reconstructs, normalised
    arch, kept = get_arch(sae.cfg.arch), None
    extra: torch.Tensor | None = None
    if arch.uses_k:  # sparse: only the encoder's forward is a dense (b, d_in, d_sae) matmul
        xc = sae.centred(xn)
        if arch.fixed_topk:
            # (b, k), (b, d_sae)
            vals, idx, pre = TopKEncode.apply(xc, sae.W_enc, sae.b_enc, int(sae.cfg.k))
            x_hat_n = decode_topk(vals, idx, sae.W_dec, sae.b_dec)
            latents = idx[vals > 0]
        else:
            n_keep = int(sae.cfg.k) * x.shape[0]
            # (m,) x 3, (b, d_sae)
            kept, tokens, lats, pre = BatchTopKEncode.apply(xc, sae.W_enc, sae.b_enc, n_keep)
            x_hat_n = decode_entries(kept, tokens, lats, x.shape[0], sae.W_dec, sae.b_dec)
            latents = lats[kept > 0]
            entries = Entries(kept, tokens, lats, x.shape[0])
            extra = arch.extra_loss(sae, entries, tn, options or {})
        acts, fired = (
            None,
            torch.bincount(latents, minlength=sae.cfg.d_sae),
        )  # (d_sae,) from the indices
    else:
        pre = sae.pre_acts(x)  # (b, d_sae)
        acts = sae.activate(pre, train=True)
        x_hat_n = sae.decode_normalised(acts)
        # (d_sae,); acts >= 0, and a float sum beats a bool one 10x on CPU
        fired = torch.sign(acts).sum(0).long()
    if sae.cfg.skip:
        x_hat_n = x_hat_n + sae.skip_normalised(xn)
    mse = ((x_hat_n - tn) ** 2).mean()
    if arch.l1_penalty:
        # mean_tokens(sum_i h_i w_i), one pass
        penalty = (acts.sum(0) * sae.l1_weights()).sum() / acts.shape[0]
        return LossParts(mse + l1 * penalty, mse, penalty, acts, x_hat_n, fired)
    penalty = torch.zeros((), device=x.device)
    if dead is not None and bool(dead.any()):
        penalty = aux_loss(sae, xn, x_hat_n, dead, aux_k, tn)
    loss = mse + aux_coef * penalty + (extra if extra is not None else 0.0)
    return LossParts(loss, mse, penalty, acts, x_hat_n, fired, kept)


def aux_loss(
    sae: SAE,
    xn: torch.Tensor,
    x_hat_n: torch.Tensor,
    dead: torch.Tensor,
    aux_k: int,
    tn: torch.Tensor | None = None,
) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the MSE of reconstructing the residual ``tn - x_hat_n (b, d_in)`` (``tn``: what it
    reconstructs, ``xn`` for an SAE) from the ``aux_k`` largest pre-activations of the ``dead (d_sae,)`` latents,
    ReLU'd.

    Computed sparsely: the dead latents' pre-activations are one ``(b, d_in, n_dead)`` matmul and their gradients
    an index-add over the ``b * aux_k`` chosen entries (:class:`TopKEncode`), instead of a dense gradient through
    every pre-activation (two more ``(b, d_in, d_sae)`` matmuls per step). The values are the same.
    """
    resid = ((xn if tn is None else tn) - x_hat_n).detach()  # (b, d_in)
    dead_idx = dead.nonzero().squeeze(1)  # (n_dead,)
    kk = min(aux_k, len(dead_idx))
    vals, sub, _ = TopKEncode.apply(
        sae.centred(xn), sae.W_enc[:, dead_idx], sae.b_enc[dead_idx], kk
    )  # (b, kk)
    return (
        (decode_topk(vals, dead_idx[sub], sae.W_dec, torch.zeros_like(sae.b_dec)) - resid) ** 2
    ).mean()


def train_step(
    sae: SAE,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    tracker: TrainTracker,
    cfg: TrainConfig,
    aux_k: int,
    l1: float | None = None,
) -> LossParts:
    """One optimizer step on raw activations ``x (b, d_in)`` (already on the SAE's device); updates ``tracker``.
    ``l1`` is this step's L1 coefficient (default ``cfg.l1``: no warm-up)."""
    l1_penalty = get_arch(sae.cfg.arch).l1_penalty
    dead = None if l1_penalty else tracker.dead_mask()
    l1_now = float(cfg.l1 or 0.0) if l1 is None else l1
    x, target = sae.split_rows(x)  # a transcoder's rows: its source and target side by side
    parts = sae_loss(
        sae,
        x,
        dead,
        l1_now,
        aux_k,
        cfg.aux_coef,
        cfg.arch_options(),
        target if sae.cfg.is_transcoder else None,
    )
    opt.zero_grad(set_to_none=True)
    parts.loss.backward()
    if not l1_penalty:  # unit decoder rows: their gradient along themselves is dropped
        sae.remove_parallel_grads()
    if cfg.unit_grad:  # the whole gradient at norm 1 (SAELens's clip at 1 of a loss summed over d_in acts on every step)
        grads = [p.grad for p in sae.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        for g in grads:
            g.div_(norm + 1e-12)
    elif cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    opt.step()
    if not l1_penalty:
        sae.set_decoder_norm()
    with torch.no_grad():
        tracker.update(target, parts.x_hat_n / sae.out_scale, parts.fired)
    return parts
