"""The feature browser's settings: ``actstore serve`` (``ServeConfig``) and ``actstore dashboard`` (``DashboardConfig``).

Torch-free, so the CLI builds its options (defaults, help) from these fields."""

from __future__ import annotations

import math
from dataclasses import dataclass

from actstore.errors import ConfigError
from actstore.fields import opt
from actstore.format.layout import check_name

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Hosts ``serve`` binds without ``--public``: only this machine can reach them."""


@dataclass
class ServeConfig:
    """One ``actstore serve`` of a store (read-only)."""

    host: str = "127.0.0.1"
    """Address to bind; anything but 127.0.0.1 / localhost / ::1 needs public=True (--public)."""
    port: int = 8765
    """Port to bind (0: any free port)."""
    public: bool = False
    """Allow binding an address other machines reach (the store's data is then readable by them)."""
    max_rows: int = 1000
    """Rows the SQL console returns at most (CSV downloads included)."""
    query_timeout: float = 10.0
    """Seconds a console query may run (fetching and page included) before it is stopped."""
    max_result_mb: float = 16.0
    """Megabytes of result a console query may return; a larger one is refused while it is fetched."""
    query_workers: int = 2
    """Console queries run at once, each in a process of its own (one per client at a time)."""
    query_memory_mb: int = 1024
    """Memory a console query's process may add (MiB); a query that needs more is refused."""
    page_size: int = 20
    """Top activating contexts per page of a feature."""
    context: int = 8
    """Tokens shown on each side of a context's hit."""
    histogram_bins: int = 40
    """Bins of a feature's activation histogram."""
    steer_models: list[str] = opt(
        factory=list, multiple=True, names=("--steer-model",), metavar="KEY=PATH"
    )
    """A steering form on the feature pages, running the model KEY of the store from the directory PATH (repeat for
    several). The browser loads no model otherwise: never from a path a store names."""

    def steer_paths(self) -> dict[str, str]:
        """``{model key: directory}`` of ``--steer-model``."""
        return dict(item.split("=", 1) for item in self.steer_models)

    def __post_init__(self) -> None:
        for item in self.steer_models:
            key, sep, path = item.partition("=")
            if not sep or not path:
                raise ConfigError(
                    f"--steer-model wants KEY=PATH (a store model key and a model directory), got {item!r}"
                )
            check_name(key, "model")
        if self.host not in LOCAL_HOSTS and not self.public:
            raise ConfigError(
                f"--host {self.host} would let other machines read the store: pass --public to allow it"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        for name in (
            "max_rows",
            "query_timeout",
            "max_result_mb",
            "query_workers",
            "query_memory_mb",
            "page_size",
            "histogram_bins",
        ):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a finite number above 0, got {v}"
                )
        if self.context < 0:
            raise ConfigError(f"--context must be >= 0, got {self.context}")


@dataclass
class DashboardConfig:
    """One ``actstore dashboard``: an SAE's feature pages as a static folder."""

    sae: str
    """The SAE (or crosscoder) whose features to export (encoded: actstore encode)."""
    out: str
    """Folder to write (index.html, feature-N.html, data/feature-N.json, static/)."""
    features: str | None = None
    """Features to export, comma separated (default: the top ones by variance)."""
    top: int = 50
    """Without --features: this many features, by variance."""
    contexts: int = 20
    """Top activating contexts per feature."""
    context: int = 8
    """Tokens shown on each side of a context's hit."""
    histogram_bins: int = 40
    """Bins of a feature's activation histogram."""

    def __post_init__(self) -> None:
        check_name(self.sae, "SAE")
        if self.top <= 0 or self.contexts <= 0 or self.histogram_bins <= 0 or self.context < 0:
            raise ConfigError(
                "--top, --contexts and histogram_bins must be positive, --context >= 0"
            )

    def feature_list(self) -> list[int] | None:
        if self.features is None:
            return None
        try:
            out = sorted({int(v) for v in self.features.split(",") if v.strip()})
        except ValueError:
            raise ConfigError(
                f"--features must be comma-separated integers, got {self.features!r}"
            ) from None
        if not out or min(out) < 0:
            raise ConfigError(f"--features must name features >= 0, got {self.features!r}")
        return out
