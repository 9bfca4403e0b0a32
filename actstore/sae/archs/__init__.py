"""SAE architectures as objects, one module each, registered here: the trainer, the encoder, the exporters and the
config ask :func:`get_arch` rather than compare names. A new architecture is a new module with an :class:`Arch`
subclass and its line in :data:`REGISTRY`."""

from __future__ import annotations

from actstore.errors import ConfigError
from actstore.sae.archs.base import Arch
from actstore.sae.archs.batchtopk import BatchTopK
from actstore.sae.archs.jumprelu import JumpReLU
from actstore.sae.archs.matryoshka import MatryoshkaBatchTopK
from actstore.sae.archs.relu_l1 import ReluL1
from actstore.sae.archs.topk import TopK
from actstore.sae.archs.transcoder import Transcoder

REGISTRY: dict[str, Arch] = {
    a.name: a
    for a in (ReluL1(), TopK(), BatchTopK(), MatryoshkaBatchTopK(), Transcoder(), JumpReLU())
}
"""Every architecture an SAE may have, by name (the order of ``--arch``'s choices)."""
ARCHS = tuple(REGISTRY)
"""Architectures an SAE may have."""
TRAIN_ARCHS = tuple(n for n, a in REGISTRY.items() if a.trained)
"""Architectures ``actstore train`` trains."""


def get_arch(name: str) -> Arch:
    """The architecture called ``name`` (ConfigError naming the known ones otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown SAE architecture {name!r}: choose one of {', '.join(ARCHS)}"
        ) from None


__all__ = ["ARCHS", "REGISTRY", "TRAIN_ARCHS", "Arch", "get_arch"]
