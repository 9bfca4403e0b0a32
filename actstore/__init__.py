"""actstore: an activation store plus query tool for interpretability research.

Stream per-layer hidden states of transformer models into compressed Zarr
arrays, train sparse autoencoders out-of-core from them, and query SAE feature
activations with SQL.

The public API is re-exported here and imported on first use (PEP 562), so
``import actstore`` is cheap and loads torch only when a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

_EXPORTS = {
    "ActstoreError": "errors",
    "Store": "store", "open_store": "store",
    "ExtractConfig": "extract", "ExtractResult": "extract",
    "SAE": "sae", "SAEConfig": "sae", "export_sae": "sae", "list_saes": "sae", "load_sae": "sae", "sae_names": "sae",
    "TrainConfig": "train", "TrainResult": "train", "train_sae": "train",
    "EncodeConfig": "encode", "EncodeResult": "encode",
    "sql": "query", "connect": "query", "top_tokens": "query", "top_features": "query", "run_query": "query",
    "features": ("query", "lazy_features"), "feature_stats": ("query", "lazy_feature_stats"),
    "store_info": "share", "CopyConfig": "share", "copy_store": "share",
}  # fmt: skip
"""Public name -> module (or (module, name there)) under actstore. The stage functions whose names are also module
names (``extract``, ``encode``) are imported from their modules: ``from actstore.encode import encode``."""

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'actstore' has no attribute {name!r}")
    module, attr = (target, name) if isinstance(target, str) else target
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
