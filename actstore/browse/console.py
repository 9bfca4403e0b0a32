"""The SQL console of ``actstore serve``: one read-only statement over the store's views, bounded in time and rows.

Each query runs on a fresh sandboxed, read-only DuckDB connection (``query.views.connect``: only the store's own
files can be read, local or remote; no writes, no ATTACH, no extensions, no settings changes). On top of that the
console accepts exactly one statement, and only a ``SELECT`` (``WITH`` ... ``SELECT``, ``VALUES``, ``FROM`` ...
included, as DuckDB parses them): ``COPY``, ``ATTACH``, ``INSTALL``, ``LOAD``, ``SET``, ``PRAGMA``, ``CREATE`` and
the rest are refused before anything runs. A query still running after ``timeout`` seconds is interrupted; at most
``max_rows`` rows and ``max_bytes`` bytes come back (``truncated`` says when there were more rows; more bytes are
refused while they are fetched). ``actstore serve`` runs these in query processes of bounded memory
(``browse/workers.py``), off its event loop.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

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
        raise QueryRefused(
            f"only SELECT queries run here (this is {kind.name}): the console is read-only"
        )


MAX_RESULT_MB = 16.0
"""Megabytes of result (Arrow bytes) the console returns at most; a larger result is refused while it is fetched."""
FETCH_ROWS = 64
"""Rows fetched at a time, so that the byte bound is checked before much more than it is held."""


def timed_out(timeout: float) -> QueryRefused:
    """The refusal of a query stopped after ``timeout`` seconds."""
    return QueryRefused(f"the query ran past {timeout:g} s and was stopped: add a WHERE or a LIMIT")


def too_big(what: str = "result") -> QueryRefused:
    """The refusal of a query whose ``what`` (query or result) needs more memory than the console allows."""
    return QueryRefused(
        f"the {what} needs more memory than the console allows: add a WHERE or a LIMIT"
    )


class Fetched(NamedTuple):
    """The rows one console query returned, as Arrow."""

    table: Any
    """``pyarrow.Table`` of at most ``max_rows`` rows."""
    truncated: bool
    """More rows than ``max_rows`` were there."""
    seconds: float


def fetch_table(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    params: dict[str, Any] | None,
    max_rows: int,
    timeout: float,
    max_bytes: int,
) -> Fetched:
    """Run one checked statement on ``con`` (a cursor it then closes) and fetch at most ``max_rows`` rows and
    ``max_bytes`` bytes, ``FETCH_ROWS`` at a time; interrupted after ``timeout`` s (execution and fetching both)."""
    import pyarrow as pa

    check_statement(sql)
    timer = threading.Timer(timeout, con.interrupt)
    t0 = time.perf_counter()
    timer.start()
    batches, n_rows, n_bytes = [], 0, 0
    try:
        with warnings.catch_warnings():
            # DuckDB: "Arrow output on a DB-API result makes an extra copy"
            warnings.simplefilter("ignore")
            reader = con.execute(sql, params or {}).to_arrow_reader(FETCH_ROWS)
        schema = reader.schema
        for batch in reader:
            batches.append(batch)
            n_rows += batch.num_rows
            n_bytes += batch.nbytes
            if n_bytes > max_bytes:
                raise QueryRefused(
                    f"the result is larger than {max_bytes / 2**20:g} MiB (the console's bound): select "
                    "fewer or shorter columns, or add a LIMIT"
                )
            if n_rows > max_rows:
                break
    except duckdb.InterruptException:
        raise timed_out(timeout) from None
    except duckdb.OutOfMemoryException:
        raise too_big("query") from None
    except MemoryError:
        raise too_big() from None
    except OSError as exc:  # DuckDB's Arrow conversion reports its out-of-memory as an OSError
        if "out of memory" not in str(exc).lower():
            raise
        raise too_big() from None
    except duckdb.Error as exc:
        raise QueryRefused(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    finally:
        timer.cancel()
        con.close()
    table = pa.Table.from_batches(batches, schema=schema).slice(0, max_rows)
    return Fetched(table, n_rows > max_rows, time.perf_counter() - t0)


def to_result(fetched: Fetched, params: dict[str, Any] | None = None) -> ConsoleResult:
    """A console result (Python rows) of fetched Arrow rows."""
    t = fetched.table
    cols = [c.to_pylist() for c in t.columns]
    rows = list(zip(*cols, strict=True)) if cols else [() for _ in range(t.num_rows)]
    return ConsoleResult(
        list(t.column_names), rows, fetched.truncated, fetched.seconds, dict(params or {})
    )


def run_console(
    store: Store,
    sql: str,
    params: dict[str, Any] | None = None,
    max_rows: int = 1000,
    timeout: float = 10.0,
    base: duckdb.DuckDBPyConnection | None = None,
    max_bytes: int = int(MAX_RESULT_MB * 2**20),
) -> ConsoleResult:
    """Run one read-only SELECT (:func:`check_statement`) with ``params`` bound; interrupted after ``timeout``, at most
    ``max_rows`` rows and ``max_bytes`` bytes (:func:`fetch_table`).

    ``base``: a sandboxed connection of the store (``query.views.connect``) kept by the caller; the query runs on a
    cursor of it (its own connection to the same read-only, locked database), else on a fresh connection."""
    from actstore.query.views import connect

    check_statement(sql)
    con = base.cursor() if base is not None else connect(store)
    return to_result(fetch_table(con, sql, params, max_rows, timeout, max_bytes), params)


def named_sql(store: Store, name: str, given: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The SQL of named query ``name`` (``sql/NAME.sql``) and its declared parameters bound from a form's values."""
    from actstore.query.named import bind_params, load_query

    q = load_query(name)
    return q.sql, bind_params(store, q, {k: v for k, v in given.items() if v not in (None, "")})


def named_console(
    store: Store,
    name: str,
    given: dict[str, Any],
    max_rows: int = 1000,
    timeout: float = 10.0,
    base: duckdb.DuckDBPyConnection | None = None,
) -> ConsoleResult:
    """A named query with its declared parameters from a form, through the same bounds."""
    sql, values = named_sql(store, name, given)
    return run_console(store, sql, values, max_rows, timeout, base)
