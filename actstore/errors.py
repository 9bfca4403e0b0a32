"""actstore's own error hierarchy.

Every error a user can cause derives from :class:`ActstoreError`, and each also
subclasses the closest built-in so callers may catch either. Messages name the
path, array, model or layer involved and say how to fix the problem; the CLI
prints them as one line.
"""

from __future__ import annotations


class ActstoreError(Exception):
    """Base class of every error actstore raises on purpose."""


class ConfigError(ActstoreError, ValueError):
    """Options that are invalid on their own or together."""


class QueryError(ActstoreError, ValueError):
    """A SQL query DuckDB refuses: a syntax error, a missing table or column, a file outside the store's sandbox."""


class DataError(ActstoreError, ValueError):
    """A corpus file that is missing, unreadable or lacks a field."""


class ModelError(ActstoreError, ValueError):
    """A model that cannot be found or loaded, or a layer it does not have."""


class StoreError(ActstoreError, OSError):
    """A store that is missing, unwritable or inconsistent with a request."""


class TokenizerMismatchError(StoreError):
    """A model whose tokenizer differs from the one a store's rows were made with."""


class NotFoundError(ActstoreError, KeyError):
    """A model, layer, SAE or query name that a store does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class IntegrityError(StoreError):
    """Stored bytes that fail their checksum or disagree with the manifest."""


class ConcurrencyError(StoreError):
    """Another writer holds the array or object this run wants to write."""
