"""The encoding stage's settings.

Torch-free, so the CLI builds its options (defaults, choices, help) from these fields."""

from __future__ import annotations

from dataclasses import dataclass

from actstore.errors import ConfigError
from actstore.fields import opt


@dataclass
class EncodeConfig:
    """Everything one ``actstore encode`` run needs."""

    sae: str
    """Name of the SAE under STORE/saes/ (it names its model and layer)."""
    batch_rows: int = 8192
    """Token rows per SAE forward pass."""
    n_buckets: int = opt(16, names=("--buckets",))
    """Feature-range buckets (files) at least; more when a bucket would hold over 4M activations (memory)."""
    spill_entries: int = 16_000_000
    """Non-zero activations held in memory (16 bytes each) before they are spilled to disk as sorted runs."""
    row_group_rows: int = 16384
    """Rows per Parquet row group of the final files (a feature lookup reads only its own groups)."""
    workers: int = 2
    """Threads: blocks are sorted while the next is encoded, and this many buckets are finished at once (1 = none)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when present)."""
    overwrite: bool = False
    """Re-encode from scratch even if a complete or differently-configured encoding exists."""
    break_lock: bool = False
    """Take over the encode lock of a writer that died on another host."""
    ray_workers: int | None = None
    """Ray actors with --ray (default: one per GPU, else one per --threads CPUs of the cluster)."""
    threads: int | None = None
    """torch CPU threads of each Ray actor (default: torch's own)."""

    def __post_init__(self) -> None:
        if not self.sae:
            raise ConfigError("encode needs --sae NAME: the SAE to run (see actstore info)")
        for name in ("batch_rows", "n_buckets", "spill_entries", "row_group_rows", "workers"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("ray_workers", "threads"):
            if getattr(self, name) is not None and int(getattr(self, name)) <= 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}"
                )
