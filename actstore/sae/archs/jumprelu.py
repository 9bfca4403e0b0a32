"""jumprelu: ReLU of the pre-activations above a per-feature threshold (Rajamanoharan et al. 2024; Gemma Scope).
Imported from SAELens, not trained here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from actstore.sae.archs.base import Arch, SAELike

if TYPE_CHECKING:
    import torch


class JumpReLU(Arch):
    name = "jumprelu"
    trained = False
    per_feature_threshold = True

    def activate(self, sae: SAELike, pre: torch.Tensor, train: bool) -> torch.Tensor:
        import torch

        return torch.where(pre > sae.threshold, torch.relu(pre), torch.zeros_like(pre))
