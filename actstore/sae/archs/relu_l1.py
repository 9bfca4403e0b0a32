"""relu-l1: ReLU, with sparsity from an L1 penalty weighted by each decoder row's norm (the paper's, SAELens's
standard SAE)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from actstore.sae.archs.base import Arch, SAELike

if TYPE_CHECKING:
    import torch


class ReluL1(Arch):
    name = "relu-l1"
    l1_penalty = True
    saelens_architecture = "standard"

    def activate(self, sae: SAELike, pre: torch.Tensor, train: bool) -> torch.Tensor:
        import torch

        return torch.relu(pre)
