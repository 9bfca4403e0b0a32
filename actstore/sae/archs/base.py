"""What an SAE architecture is to actstore: the questions the trainer, the encoder, the exporters and the config ask
of it, answered once per architecture (one module each, registered in :mod:`actstore.sae.archs`).

Torch-free at import (the config and the CLI read the registry); the methods that compute import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class SAELike(Protocol):
    """What an architecture reads of an SAE (:class:`actstore.sae.model.SAE`): its config and threshold."""

    cfg: Any
    threshold: torch.Tensor


class Arch:
    """An SAE architecture. Subclasses set the attributes and implement :meth:`activate`."""

    name: str = ""
    """Its name in ``cfg.json`` and ``--arch``."""
    trained: bool = True
    """actstore trains it (False: imported only, e.g. jumprelu)."""
    uses_k: bool = False
    """It keeps ``k`` features per token (topk, batchtopk): ``k`` is required and resolved by default."""
    fixed_topk: bool = False
    """Every token keeps exactly its top ``k``, in training and at inference (topk): the top-k entries are the whole
    encoding (sparsify's format holds these only)."""
    l1_penalty: bool = False
    """Sparsity by a decoder-norm-weighted L1 penalty (relu-l1): decoder rows of free norm starting at 0.1, the L1
    warm-up, no AuxK loss; otherwise unit decoder rows and AuxK on the dead latents."""
    transcoder: bool = False
    """Reads one site and reconstructs another (``--source`` / ``--target``), not its own input."""
    nested: bool = False
    """Trained as nested prefixes of its dictionary, each prefix's reconstruction loss added (Matryoshka)."""
    per_feature_threshold: bool = False
    """Its ``threshold`` buffer holds one threshold per feature ``(d_sae,)`` (jumprelu); else one number ``()``."""
    calibrated_threshold: bool = False
    """Training calibrates an inference threshold at its end (batchtopk)."""
    saelens_architecture: str = "jumprelu"
    """The SAELens architecture its export loads as (``standard``, ``topk``, ``jumprelu``)."""
    saelens_activation: str = "relu"
    """SAELens's legacy ``activation_fn_str`` of its export."""

    def activate(self, sae: SAELike, pre: torch.Tensor, train: bool) -> torch.Tensor:
        """Feature activations ``(n, d_sae)`` from pre-activations ``pre (n, d_sae)``."""
        raise NotImplementedError

    def topk_at_inference(self, sae: SAELike) -> bool:
        """Whether :meth:`activate` at inference keeps each token's top ``k`` (so encoding may take the top-k entries
        without the dense activations): always for :attr:`fixed_topk`."""
        return self.fixed_topk

    def default_init(self, crosscoder: bool) -> str:
        """How decoder rows start by default: ``data`` for SAEs that keep k latents (measured on topk, batchtopk),
        ``random`` otherwise and for crosscoders (not measured)."""
        return "data" if self.uses_k and not crosscoder else "random"

    def saelens_cfg(self, sae: SAELike) -> dict[str, Any]:
        """Keys of the SAELens ``cfg.json`` its export adds (activation kwargs, ``k``)."""
        return {"activation_fn_kwargs": {}}
