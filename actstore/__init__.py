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

from actstore.version import __version__

_EXPORTS = {
    "ActstoreError": "errors",
    "Store": "store.reader",
    "open_store": "store.reader",
    "ExtractConfig": "store.extract",
    "ExtractResult": "store.extract",
    "SAE": "sae.model",
    "SAEConfig": "sae.model",
    "export_sae": "sae.export",
    "list_saes": "sae.files",
    "load_sae": "sae.files",
    "sae_names": "sae.files",
    "read_metrics": "sae.files",
    "ImportConfig": "sae.config",
    "import_sae": "sae.imports",
    "FeatureExportConfig": "query.config",
    "export_features": "query.exports",
    "TrainConfig": "sae.train",
    "TrainResult": "sae.run",
    "train_sae": "sae.train",
    "EncodeConfig": "encoding.encode",
    "EncodeResult": "encoding.encode",
    "sql": "query.views",
    "connect": "query.views",
    "run_query": "query.named",
    "top_tokens": "query.lookups",
    "top_features": "query.lookups",
    "features": ("query.tables", "lazy_features"),
    "feature_stats": ("query.tables", "lazy_feature_stats"),
    "store_info": "query.info",
    "CopyConfig": "storage.config",
    "copy_store": "storage.copy",
}
"""Public name -> module (or (module, name there)) under actstore. The stage functions whose names are also
package names (``extract``, ``encode``) are imported from their modules: ``from actstore.encoding.encode import encode``."""

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
