"""The query stage's choices and defaults, in a module light enough for the CLI to build its options from."""

from dataclasses import dataclass, field

from actstore.errors import ConfigError
from actstore.fields import cli, opt

RANK_BY = ("variance", "frequency", "label-association", "effect")
"""How ``top_features`` ranks: activation variance over all tokens (the paper's choice), firing frequency, label
association, or effect on the model's output (summed attribution, ``actstore effects``)."""
TOP_TOKENS_N = 20
"""Rows ``top_tokens`` returns by default."""
CONTEXT_TOKENS = 8
"""Tokens of context ``top_tokens`` shows on each side by default."""
TOP_FEATURES_N = 10
"""Features ``top_features`` returns by default (per label for label-association)."""

FEATURE_EXPORT_FORMATS = ("delphi", "neuronpedia")
"""Layouts ``export-features`` writes: delphi's latent cache, Neuronpedia's batch files (SAEDashboard's layout)."""


@dataclass
class FeatureExportConfig:
    """One ``actstore export-features`` run: an encoded SAE's feature table in another tool's layout."""

    sae: str
    """Name of the encoded SAE."""
    format: str = field(metadata=cli(choices=FEATURE_EXPORT_FORMATS))
    """delphi: its latent cache (safetensors per latent range); neuronpedia: batch-N.json dashboards."""
    out: str
    """Folder to write (created; files of an earlier export are replaced)."""
    n_splits: int = 5
    """delphi: latent ranges per hook point, one safetensors file each (delphi's n_splits)."""
    features: list[int] | None = opt(None, shown="every feature that fires")
    """neuronpedia: which features, e.g. 3,17,210."""
    top_n: int = 20
    """neuronpedia: top activating contexts per feature."""
    context: int = 32
    """neuronpedia: tokens of the sample on each side of the top token in a context."""
    features_per_batch: int = 128
    """neuronpedia: features per batch-N.json file."""
    hist_bins: int = 50
    """neuronpedia: bins of each feature's activation histogram."""

    def __post_init__(self) -> None:
        if self.format not in FEATURE_EXPORT_FORMATS:
            raise ConfigError(
                f"unknown --format {self.format!r}: choose one of {', '.join(FEATURE_EXPORT_FORMATS)}"
            )
        for name in ("n_splits", "top_n", "features_per_batch", "hist_bins"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.context < 0:
            raise ConfigError(f"--context must be >= 0, got {self.context}")
