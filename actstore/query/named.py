"""Named queries: the ``.sql`` files in ``actstore/sql/``, their declared parameters, and running them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl

from actstore.errors import ConfigError, NotFoundError
from actstore.query.tables import resolve_sae
from actstore.query.views import connect, query_error

if TYPE_CHECKING:
    from actstore.store.reader import Store


SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
# ---------------------------------------------------------------- named queries
_PARAM = re.compile(r"^--\s*@param\s+(\w+)\s+(\w+)\s*(?:=\s*(\S+))?\s*:\s*(.*)$")
_TYPES = {"INTEGER": int, "BIGINT": int, "DOUBLE": float, "FLOAT": float, "VARCHAR": str}


@dataclass
class QueryParam:
    """One declared parameter of a named query."""

    name: str
    type: str
    """INTEGER, BIGINT, DOUBLE, FLOAT or VARCHAR."""
    default: Any
    """Value used when not given (None = SQL NULL); see ``required``."""
    required: bool
    help: str

    def convert(self, value: Any) -> Any:
        if value is None:
            return None
        try:
            return _TYPES[self.type](value)
        except (TypeError, ValueError):
            raise ConfigError(f"parameter {self.name} must be {self.type}, got {value!r}") from None


@dataclass
class NamedQuery:
    """A ``.sql`` file of ``actstore/sql/`` and its declared parameters."""

    name: str
    description: str
    sql: str
    params: list[QueryParam] = field(default_factory=list)


def _parse_query(name: str, text: str) -> NamedQuery:
    desc: list[str] = []
    params: list[QueryParam] = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        m = _PARAM.match(line)
        if m:
            pname, ptype, default, help_ = m.groups()
            ptype = ptype.upper()
            if ptype not in _TYPES:
                raise ConfigError(f"query {name}: parameter {pname} has unknown type {ptype}")
            required = default is None
            p = QueryParam(pname, ptype, None, required, help_.strip())
            p.default = None if required or default.upper() == "NULL" else p.convert(default)
            params.append(p)
        elif not params:
            desc.append(line.lstrip("-").strip())
    return NamedQuery(name, " ".join(d for d in desc if d), text, params)


def list_queries() -> list[NamedQuery]:
    """Every named query shipped with actstore, by name."""
    return [
        _parse_query(p.stem, p.read_text(encoding="utf-8")) for p in sorted(SQL_DIR.glob("*.sql"))
    ]


def load_query(name: str) -> NamedQuery:
    """A named query by name (``top-tokens`` and ``top_tokens`` both work)."""
    key = name.replace("-", "_").removesuffix(".sql")
    path = SQL_DIR / f"{key}.sql"
    if not re.fullmatch(r"\w+", key) or not path.is_file():
        names = ", ".join(q.name for q in list_queries())
        raise NotFoundError(
            f"no named query {name!r}: choose one of {names} (actstore query --list)"
        )
    return _parse_query(key, path.read_text(encoding="utf-8"))


def p_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"parameter layer must be an integer, got {value!r}") from None


def bind_params(store: Store, query: NamedQuery, given: dict[str, Any]) -> dict[str, Any]:
    """Typed values for every declared parameter; ``layer`` / ``model`` pick the SAE when ``sae`` is not given."""
    declared = {p.name: p for p in query.params}
    hints = {"layer", "model"} - set(declared)
    unknown = set(given) - set(declared) - hints
    if unknown:
        known = ", ".join([*declared, *sorted(hints)])
        raise ConfigError(
            f"query {query.name} has no parameter {', '.join(sorted(unknown))}: it takes {known}"
        )
    out: dict[str, Any] = {}
    for p in query.params:
        # by name (checked against layer / model when given), else the layer's only SAE
        if p.name == "sae":
            layer = given.get("layer")
            layer = None if layer is None else p_int(layer)
            sae = None if given.get("sae") is None else str(given["sae"])
            out["sae"] = resolve_sae(store, layer=layer, model=given.get("model"), sae=sae).sae
            continue
        if p.name in given and given[p.name] is not None:
            out[p.name] = p.convert(given[p.name])
        elif p.required:
            raise ConfigError(f"query {query.name} needs --param {p.name}=... ({p.help})")
        else:
            out[p.name] = p.default
    return out


def run_query(
    store: Store,
    name: str,
    params: dict[str, Any] | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> pl.DataFrame:
    """Run the named query ``name`` with ``params`` bound as query parameters; a polars DataFrame."""
    q = load_query(name)
    values = bind_params(store, q, dict(params or {}))
    own = con is None
    con = con or connect(store)
    try:
        return con.sql(q.sql, params=values).pl()
    except duckdb.Error as exc:
        raise query_error(exc) from None
    finally:
        if own:
            con.close()
