"""The SQL console of ``actstore serve``: one read-only statement over the store's views, bounded in time and rows.

Each query runs on a fresh sandboxed, read-only DuckDB connection (``query.views.connect``: only the store's own
files can be read, local or remote; no writes, no ATTACH, no extensions, no settings changes). On top of that the
console accepts exactly one statement, and only a ``SELECT`` (``WITH`` ... ``SELECT``, ``VALUES``, ``FROM`` ...
included, as DuckDB parses them): ``COPY``, ``ATTACH``, ``INSTALL``, ``LOAD``, ``SET``, ``PRAGMA``, ``CREATE`` and
the rest are refused before anything runs. A query still running after ``timeout`` seconds is interrupted; at most
``max_rows`` rows come back (``truncated`` says when there were more).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb

from actstore.errors import ConfigError

if TYPE_CHECKING:
    from actstore.store.reader import Store


class QueryRefused(ConfigError):
    """A console statement that is not one read-only SELECT."""


@dataclass
class ConsoleResult:
    """What one console query returned."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool
    """More rows than ``max_rows`` were there."""
    seconds: float
    params: dict[str, Any] = field(default_factory=dict)


def check_statement(sql: str) -> None:
    """QueryRefused unless ``sql`` is exactly one SELECT statement (as DuckDB's own parser reads it)."""
    try:
        stmts = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRefused(f"the query does not parse: {str(exc).splitlines()[0]}") from None
    if len(stmts) != 1:
        raise QueryRefused(f"one statement at a time, please (got {len(stmts)})")
    kind = stmts[0].type
    if kind != duckdb.StatementType.SELECT:
        raise QueryRefused(f"only SELECT queries run here (this is {kind.name}): the console is read-only")


def run_console(store: Store, sql: str, params: dict[str, Any] | None = None, max_rows: int = 1000,
                timeout: float = 10.0, base: duckdb.DuckDBPyConnection | None = None) -> ConsoleResult:  # fmt: skip
    """Run one read-only SELECT (:func:`check_statement`) with ``params`` bound; interrupted after ``timeout``.

    ``base``: a sandboxed connection of the store (``query.views.connect``) kept by the caller; the query runs on a
    cursor of it (its own connection to the same read-only, locked database), else on a fresh connection."""
    from actstore.query.views import connect

    check_statement(sql)
    con = base.cursor() if base is not None else connect(store)
    timer = threading.Timer(timeout, con.interrupt)
    t0 = time.perf_counter()
    timer.start()
    try:
        cur = con.execute(sql, params or {})
        rows = cur.fetchmany(max_rows + 1)
        cols = [d[0] for d in (cur.description or [])]
    except duckdb.InterruptException:
        raise QueryRefused(f"the query ran past {timeout:g} s and was stopped: add a WHERE or a LIMIT") from None
    except duckdb.Error as exc:
        raise QueryRefused(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    finally:
        timer.cancel()
        con.close()
    return ConsoleResult(cols, rows[:max_rows], len(rows) > max_rows, time.perf_counter() - t0, dict(params or {}))


def named_console(store: Store, name: str, given: dict[str, Any], max_rows: int = 1000, timeout: float = 10.0,
                  base: duckdb.DuckDBPyConnection | None = None) -> ConsoleResult:  # fmt: skip
    """A named query (``sql/NAME.sql``) with its declared parameters from a form, through the same bounds."""
    from actstore.query.named import bind_params, load_query

    q = load_query(name)
    values = bind_params(store, q, {k: v for k, v in given.items() if v not in (None, "")})
    return run_console(store, q.sql, values, max_rows, timeout, base)
