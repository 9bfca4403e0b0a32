"""Query stage: DuckDB views over a store.

Views: ``samples`` and ``tokens`` (per tokenization, the default one under the
plain names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import duckdb

if TYPE_CHECKING:
    from .store import Store


def _list_sql(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def connect(store: Store, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection whose views read the store's Parquet tables."""
    con = duckdb.connect(":memory:")
    if store.tokenization_keys():
        tok = store.tokenization()
        for table in ("tokens", "samples"):
            files = tok.parquet_files(table)
            if files:
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet({_list_sql(files)})")
    return con
