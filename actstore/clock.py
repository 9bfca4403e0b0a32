"""The one clock: every timestamp actstore writes (attributes, manifests, locks, reports) is UTC ISO 8601 to the second
(a lease's expiry to the millisecond)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def now() -> str:
    """The current time as UTC ISO 8601 with seconds, e.g. ``2026-12-01T23:59:00+00:00``."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def deadline(seconds: float) -> str:
    """The time ``seconds`` from now, UTC ISO 8601 to the millisecond (a lease's expiry)."""
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def parse(stamp: str) -> datetime | None:
    """The time an ISO 8601 ``stamp`` names (UTC when it gives no zone), or None when it is not one."""
    try:
        t = datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def from_epoch(seconds: float) -> datetime:
    """A POSIX timestamp (a file's modification time) as a UTC datetime."""
    return datetime.fromtimestamp(seconds, UTC)


def iso(t: datetime) -> str:
    """``t`` as UTC ISO 8601 to the second."""
    return t.astimezone(UTC).isoformat(timespec="seconds")


def utcnow() -> datetime:
    return datetime.now(UTC)
