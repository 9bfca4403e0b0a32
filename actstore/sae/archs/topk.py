"""topk: each token keeps its ``k`` largest pre-activations, ReLU'd (Gao et al. 2024; sparsify's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from actstore.sae.archs.base import Arch, SAELike

if TYPE_CHECKING:
    import torch


def per_token_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's ``k`` largest entries of ``pre (n, d_sae)``, ReLU'd; zeros elsewhere."""
    import torch

    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))


class TopK(Arch):
    name = "topk"
    uses_k = True
    fixed_topk = True
    saelens_architecture = "topk"
    saelens_activation = "topk"

    def activate(self, sae: SAELike, pre: torch.Tensor, train: bool) -> torch.Tensor:
        return per_token_topk(pre, int(sae.cfg.k or 0))

    def saelens_cfg(self, sae: SAELike) -> dict[str, Any]:
        return {"activation_fn_kwargs": {"k": sae.cfg.k}, "k": sae.cfg.k}
