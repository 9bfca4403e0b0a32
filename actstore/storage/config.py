"""The copy's settings.

Light (no zarr, no fsspec), so the CLI builds its options (defaults, choices, help) from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actstore.errors import ConfigError


@dataclass
class CopyConfig:
    """Everything one ``actstore copy`` run needs."""

    src: str
    """Source store: a path or URL."""
    dst: str
    """Destination: a path or a writable bucket URL (created if missing)."""
    include: list[str] = field(default_factory=list)
    """Copy only these models/layers/SAEs (``MODEL``, ``MODEL:LAYER``, ``sae:NAME`` or key globs); empty = all."""
    jobs: int = 8
    """Objects copied in parallel."""
    src_options: dict[str, Any] = field(default_factory=dict)
    """fsspec storage options of the source."""
    dst_options: dict[str, Any] = field(default_factory=dict)
    """fsspec storage options of the destination."""

    def __post_init__(self) -> None:
        if self.jobs <= 0:
            raise ConfigError(f"--jobs must be positive, got {self.jobs}")
        if self.src.rstrip("/") == self.dst.rstrip("/"):
            raise ConfigError("copy source and destination are the same store")
        self.include = [s for s in (x.strip() for x in self.include) if s]
