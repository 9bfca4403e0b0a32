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
CROSSCODER_ARCHS = tuple(n for n in TRAIN_ARCHS if REGISTRY[n].crosscoder)
"""Architectures ``actstore train-crosscoder`` trains."""
SAE_ONLY_OPTIONS = tuple(o for a in REGISTRY.values() if not a.crosscoder for o in a.options)
"""Options of the architectures a crosscoder cannot have (not ``train-crosscoder``'s)."""


def get_arch(name: str) -> Arch:
    """The architecture called ``name`` (ConfigError naming the known ones otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown SAE architecture {name!r}: choose one of {', '.join(ARCHS)}"
        ) from None


__all__ = [
    "ARCHS",
    "CROSSCODER_ARCHS",
    "REGISTRY",
    "SAE_ONLY_OPTIONS",
    "TRAIN_ARCHS",
    "Arch",
    "get_arch",
]
