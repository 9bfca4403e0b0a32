"""batchtopk: the batch keeps its ``k x batch`` largest pre-activations in training (Bussmann et al. 2024); at
inference a token keeps the pre-activations above a threshold calibrated at the end of training (its own top ``k``
until one is)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from actstore.sae.archs.base import Arch, SAELike
from actstore.sae.archs.topk import per_token_topk

if TYPE_CHECKING:
    import torch


class BatchTopK(Arch):
    name = "batchtopk"
    uses_k = True
    calibrated_threshold = True
    saelens_architecture = (
        "jumprelu"  # its calibrated threshold, per feature: what SAELens saves for inference
    )

    def activate(self, sae: SAELike, pre: torch.Tensor, train: bool) -> torch.Tensor:
        import torch

        k = int(sae.cfg.k or 0)
        if not train and float(sae.threshold) <= 0:
            return per_token_topk(pre, k)
        if train:  # top k*n over the whole batch
            flat = torch.relu(pre).flatten()
            vals, idx = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
            return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(pre)
        return torch.where(pre > sae.threshold, pre, torch.zeros_like(pre))

    def topk_at_inference(self, sae: SAELike) -> bool:
        return float(sae.threshold) <= 0
