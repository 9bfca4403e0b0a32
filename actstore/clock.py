"""The one clock: every timestamp actstore writes (attributes, manifests, locks, reports) is UTC ISO 8601 to the second."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> str:
    """The current time as UTC ISO 8601 with seconds, e.g. ``2026-12-01T23:59:00+00:00``."""
    return datetime.now(UTC).isoformat(timespec="seconds")
