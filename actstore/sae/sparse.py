"""TopK training without dense ``(n, d_sae)`` matmuls past the encoder: the decoder as a gather of the k active rows.

A TopK SAE's step, done densely, is five ``(n, d_in, d_sae)`` matmuls: the encoder, the decoder, two for the
decoder's gradients and one for the encoder's weight gradient, although only ``k`` of ``d_sae`` latents are non-zero
per token. As in EleutherAI sparsify (``fused_encoder.py``, ``utils.py``: an embedding-bag decoder on CPU), here only
the encoder's forward is dense: :class:`TopKEncode` returns the top-k values and indices and computes its gradients
from them alone (an index-add over the ``n * k`` active entries), and :func:`decode_topk` is
``torch.nn.functional.embedding_bag`` over the active decoder rows. The values are those of the dense path
(``SAE.activate``: the same top-k, ReLU'd), up to float summation order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class TopKEncode(torch.autograd.Function):
    """``(values (n, k), indices (n, k), pre (n, d_sae))`` of ``relu(topk(xc @ w_enc + b_enc))``.

    Gradients flow from ``values`` sparsely and, when ``pre`` is used too (the auxiliary loss of dead latents),
    from ``pre`` densely.
    """

    @staticmethod
    def forward(ctx: Any, xc: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, k: int) -> Any:  # type: ignore[override]
        pre = torch.addmm(b_enc, xc, w_enc)  # (n, d_sae)
        vals, idx = pre.topk(k, dim=-1, sorted=False)  # (n, k)
        vals = vals.clamp_min(0)
        ctx.save_for_backward(xc, w_enc, idx, vals)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)
        return vals, idx, pre

    @staticmethod
    def backward(ctx: Any, g_vals: torch.Tensor | None, _g_idx: Any, g_pre: torch.Tensor | None) -> Any:  # type: ignore[override]
        xc, w_enc, idx, vals = ctx.saved_tensors
        d_in, d_sae = w_enc.shape
        g_xc = g_w = g_b = None
        if g_vals is not None:
            g = g_vals * (vals > 0)  # (n, k), through the ReLU
            flat = idx.reshape(-1)
            g_b = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, flat, g.reshape(-1))
            rows = (g.unsqueeze(-1) * xc.unsqueeze(1)).reshape(-1, d_in)  # (n * k, d_in)
            g_w = torch.zeros(d_sae, d_in, dtype=g.dtype, device=g.device).index_add_(0, flat, rows).t()
            g_xc = F.embedding_bag(idx, w_enc.t().contiguous(), per_sample_weights=g, mode="sum")  # (n, d_in)
        if g_pre is not None:
            g_w = xc.t() @ g_pre if g_w is None else g_w + xc.t() @ g_pre
            g_b = g_pre.sum(0) if g_b is None else g_b + g_pre.sum(0)
            g_xc = g_pre @ w_enc.t() if g_xc is None else g_xc + g_pre @ w_enc.t()
        return g_xc, g_w, g_b, None


def decode_topk(vals: torch.Tensor, idx: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j vals[:, j] * w_dec[idx[:, j]] + b_dec``: ``(n, d_in)`` from the k active latents of each row."""
    return F.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum") + b_dec
