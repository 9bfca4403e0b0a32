"""actstore: an activation store plus query tool for interpretability research.

Stream per-layer hidden states of transformer models into compressed Zarr
arrays, train sparse autoencoders out-of-core from them, and query SAE feature
activations with SQL.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import ActstoreError  # noqa: E402
from .sae import SAE, SAEConfig, export_sae, list_saes, load_sae  # noqa: E402
from .store import Store, open_store  # noqa: E402
from .train import TrainConfig, TrainResult, train_sae  # noqa: E402

__all__ = [
    "SAE", "ActstoreError", "SAEConfig", "Store", "TrainConfig", "TrainResult", "__version__", "export_sae", "list_saes",
    "load_sae", "open_store", "train_sae",
]  # fmt: skip
