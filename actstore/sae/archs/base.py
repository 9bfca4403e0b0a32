"""What an SAE architecture is to actstore: the questions the trainer, the encoder, the exporters and the config ask
of it, answered once per architecture (one module each, registered in :mod:`actstore.sae.archs`).

Torch-free at import (the config and the CLI read the registry); the methods that compute import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    import torch


class SAELike(Protocol):
    """What an architecture reads of an SAE (:class:`actstore.sae.model.SAE`): its config and threshold."""

    cfg: Any
    threshold: torch.Tensor


DATA_INIT_ENCODER = 0.25
"""topk / batchtopk with ``--init data``: the encoder starts as the decoder's transpose times this (a transcoder's
as its source rows' directions times this). Rows taken from tokens start close together (many tokens look alike),
and a large encoder lets the first winners starve the rest; 0.25 fit as well as larger values with the fewest dead
latents (docs/TRAINING.md)."""


class Entries(NamedTuple):
    """The entries a batch top-k step kept (:class:`actstore.sae.sparse.BatchTopKEncode`): ``m`` of them."""

    values: torch.Tensor
    """(m,) activations"""
    tokens: torch.Tensor
    """(m,) the row of the batch each belongs to"""
    latents: torch.Tensor
    """(m,) the latent each belongs to"""
    n_rows: int
    """rows in the batch"""


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
    crosscoder: bool = True
    """It may be trained as a crosscoder (``train-crosscoder``: several sources, a decoder each)."""
    per_feature_threshold: bool = False
    """Its ``threshold`` buffer holds one threshold per feature ``(d_sae,)`` (jumprelu); else one number ``()``."""
    calibrated_threshold: bool = False
    """Training calibrates an inference threshold at its end (batchtopk)."""
    saelens_architecture: str = "jumprelu"
    """The SAELens architecture its export loads as (``standard``, ``topk``, ``jumprelu``)."""
    saelens_activation: str = "relu"
    """SAELens's legacy ``activation_fn_str`` of its export."""
    options: tuple[str, ...] = ()
    """The ``TrainConfig`` fields only it reads: set for any other architecture, they are refused in one line."""

    def check(self, cfg: Any, crosscoder: bool) -> None:
        """Checks (ConfigError, one line) and normalises its :attr:`options` in the ``TrainConfig`` ``cfg``, once,
        when the config is made; ``crosscoder``: the config reads several sources."""

    def resolve(self, cfg: Any, d_sae: int) -> dict[str, Any]:
        """The fields of ``cfg`` it resolves for a dictionary of ``d_sae`` latents (``TrainConfig.resolve``)."""
        return {}

    def start(self, sae: Any, rows_n: torch.Tensor, mean_n: torch.Tensor) -> None:
        """``--init data``: start ``sae`` from training rows ``rows_n (m, d_input)`` of mean ``mean_n (d_input,)``,
        both in the normalised space (:meth:`actstore.sae.model.SAE.init_from_rows`)."""
        sae.init_from_rows(rows_n)

    def extra_loss(
        self, sae: Any, entries: Entries, target_n: torch.Tensor, options: Mapping[str, Any]
    ) -> torch.Tensor | None:
        """A loss its batch top-k step adds to the reconstruction's (None: none), from the step's ``entries``,
        ``target_n (b, d_out)`` (what the SAE reconstructs, in the normalised space) and the values of its
        :attr:`options` (a resolved config's)."""
        return None

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
