"""Fine-tuning settings.

Torch-free, so the CLI builds its options (defaults, choices, help) from these fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from actstore.data.corpora import DataConfig
from actstore.errors import ConfigError

SPLIT_ALIASES = {
    "train": "train",
    "validation": "val",
    "valid": "val",
    "val": "val",
    "dev": "val",
    "test": "test",
}


@dataclass
class FinetuneConfig:
    """Everything one ``actstore finetune`` run needs (saved as ``finetune.json``)."""

    model: str
    """Hugging Face id, local directory, or bundled:minilm."""
    data: DataConfig
    """The labelled corpus (``limit`` here is applied after a seeded shuffle, so classes stay mixed)."""
    out: str
    """Output directory: becomes a Hugging Face model directory."""
    epochs: int = 10
    """Training epochs (the paper: 10)."""
    lr: float = 2e-5
    """Adam learning rate (the paper: 2e-5)."""
    batch_size: int = 16
    """Samples per optimisation step."""
    max_length: int = 128
    """Truncate texts to this many tokens."""
    seed: int = 0
    """Seed for the split, the shuffles, the head and dropout."""
    labels: list[str] | None = None
    """Keep only rows with these labels (default: all)."""
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train / validation / test fractions when the data has no ``split`` field."""
    ignore_split: bool = False
    """Ignore the data's own ``split`` field and use the ``split`` fractions."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    keep_checkpoint: bool = False
    """Keep ``checkpoint/`` (the last epoch's weights and Adam state) after training."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        self.split = tuple(float(x) for x in self.split)  # type: ignore[assignment]
        if (
            len(self.split) != 3
            or min(self.split) < 0
            or abs(sum(self.split) - 1) > 1e-6
            or self.split[0] == 0
        ):
            raise ConfigError(
                f"split fractions must be three non-negative numbers summing to 1, got {self.split}"
            )
        if self.labels is not None:
            self.labels = [str(x) for x in self.labels]
            if not self.labels:
                raise ConfigError(
                    "--labels given but empty: list the labels to keep, e.g. --labels pos,neg"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
