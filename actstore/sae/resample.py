"""Dead-latent resampling (``--resample N``): latents that fired on no token since the previous resampling (or the
start) get a fresh start pointing at tokens the SAE reconstructs badly.

After Bricken et al. 2023 ("Towards Monosemanticity", resampling at fixed steps): from one training batch, tokens
are drawn with probability proportional to their squared reconstruction error; each silent latent's decoder row
becomes the direction of one drawn token's residual ``x - x_hat`` (at the row's norm: unit for topk / batchtopk),
its encoder column the same direction at the mean norm of the live latents' encoder columns (so it competes for the
token on equal terms), its encoder bias 0, and its optimizer state is cleared (Adam's moments; signum's base
iterate set to the new values). AuxK (topk / batchtopk) pulls silent latents toward the residual by gradient;
resampling moves them there at once, which a run of a few hundred steps (``actstore demo``) needs.

Resampling happens ``resample`` times, evenly over the first half of the run (steps ``total/2 * j/resample``), so
the re-initialised latents have the second half to settle. A point whose window (tokens since the last resampling)
is too short to tell a rare latent from a dead one is skipped: topk / batchtopk need ``MIN_EXPECTED_FIRES`` fires
per latent on average (``window * k / d_sae``); on the tiny test store 8 resamplings of 256-token windows (2 fires
each) left 41% of the latents never firing where 4 left 13% and none 20%.
"""

from __future__ import annotations

import math

import torch

from actstore.sae.archs import get_arch
from actstore.sae.model import SAE
from actstore.sae.optim import ScheduleFreeSignSGD

MIN_EXPECTED_FIRES = 5
"""A resampling window must hold this many activations per latent on average (topk / batchtopk), else it is skipped."""


def resample_steps(n: int, total_steps: int) -> set[int]:
    """The steps (1-based: after that many optimizer steps) at which ``n`` resamplings happen."""
    return {max(1, math.ceil(total_steps / 2 * j / n)) for j in range(1, n + 1)} if n > 0 else set()


@torch.no_grad()
def resample_latents(
    sae: SAE,
    opt: torch.optim.Optimizer,
    xn: torch.Tensor,
    x_hat_n: torch.Tensor,
    silent: torch.Tensor,
    seed: int,
) -> int:
    """Re-initialise the ``silent (d_sae,)`` bool-masked latents of ``sae`` toward the residuals of the batch ``xn (b,
    d_in)`` (normalised space) and its reconstruction ``x_hat_n``, and clear their optimizer state; returns how many."""
    idx = silent.nonzero().squeeze(1)  # (n_silent,)
    if not len(idx):
        return 0
    resid = (xn - x_hat_n).float()  # (b, d_in)
    err = resid.pow(2).sum(1).double().cpu()  # (b,)
    if float(err.sum()) <= 0:
        return 0
    gen = torch.Generator().manual_seed(int(seed))
    pick = torch.multinomial(
        err, len(idx), replacement=len(idx) > int((err > 0).sum()), generator=gen
    )  # (n_silent,)
    dirs = resid[pick.to(resid.device)]
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (n_silent, d_in) unit
    live = ~silent
    enc_norm = (
        float(sae.W_enc[:, live].norm(dim=0).mean())
        if bool(live.any())
        else float(sae.W_enc.norm(dim=0).mean())
    )
    dec_norm = sae.W_dec[idx].norm(dim=1, keepdim=True)  # (n_silent, 1)
    # a relu latent's decoder norm weighs its L1: the live ones' mean
    if get_arch(sae.cfg.arch).l1_penalty and bool(live.any()):
        dec_norm = sae.W_dec[live].norm(dim=1).mean().expand(len(idx), 1)
    sae.W_dec[idx] = dirs * dec_norm
    sae.W_enc[:, idx] = dirs.t() * enc_norm
    sae.b_enc[idx] = 0.0
    _reset_state(sae, opt, idx)
    return len(idx)


def _reset_state(sae: SAE, opt: torch.optim.Optimizer, idx: torch.Tensor) -> None:
    """Clear the optimizer's state of the latents ``idx``: Adam's moments to 0; signum's base iterate ``z`` to the new
    parameters (so its average ``x`` and the point ``y`` start there too)."""
    for p in (sae.W_dec, sae.W_enc, sae.b_enc):
        st = opt.state.get(p)
        if not st:
            continue
        # W_enc (d_in, d_sae): latents are columns
        sel = (slice(None), idx) if p is sae.W_enc else (idx,)
        if isinstance(opt, ScheduleFreeSignSGD):
            st["z"][sel] = p[sel]
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key][sel] = 0.0
