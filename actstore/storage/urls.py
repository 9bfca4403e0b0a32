"""Which store paths are URLs, and whether a command may open one writable (light: no filesystem imported)."""

from __future__ import annotations

REMOTE_SCHEMES = (
    "s3://",
    "s3a://",
    "gs://",
    "gcs://",
    "az://",
    "abfs://",
    "abfss://",
    "adl://",
    "http://",
    "https://",
    "memory://",
)
READ_ONLY_SCHEMES = ("http://", "https://")


def is_remote(path: str) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def write_access(path: str, writable: bool) -> bool:
    """Whether a command that writes may open ``path`` writable: local folders yes, URLs only with ``--writable``."""
    return bool(writable) or not is_remote(str(path).removeprefix("file://"))
