"""Query stage: DuckDB views and Polars LazyFrames over a store, named SQL queries, top tokens / features.

Views (DuckDB and Polars alike)::

    samples(sample, id, label, text, n_tokens, first_row, truncated)
    tokens(row, sample, position, token_id, token)
    features(model, layer, sae, row, feature, value)        every encoded SAE (actstore encode)
    feature_stats(model, layer, sae, feature, n_active, frequency, mean, max, variance)
    saes(sae, model, layer, tokenization, d_sae, arch, n_rows, n_feature_rows)

``samples`` / ``tokens`` show the store's default tokenization. A read-only
connection (the default) is a read-only DuckDB database: statements that
create, change or drop catalog objects fail, and (local stores) file access is
limited to the store's own Parquet tables, so ``COPY ... TO`` and reads of
other files fail too.

Named queries are the ``.sql`` files of ``actstore/sql/``; each starts with
comment lines declaring its parameters (``-- @param NAME TYPE [= DEFAULT]: help``),
which are always bound as DuckDB query parameters (``$NAME``), never pasted
into the SQL text.

:func:`top_tokens` returns exactly the frame of the named query ``top_tokens``
without its join against the ``tokens`` table: the top rows come from one lookup
(a query on the connection, or, without one, the feature's first row groups of
its bucket file), and token strings, samples and context windows from a
per-process :class:`TokenContext` (sample bounds, ids, labels and vocabulary in
memory; token ids read from the Zarr token index for just the rows shown).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import duckdb
import numpy as np
import polars as pl

from . import layout
from .errors import ConfigError, NotFoundError
from .location import name_ok
from .sae import sae_names

if TYPE_CHECKING:
    from .store import Store

SQL_DIR = Path(__file__).resolve().parent / "sql"
RANK_BY = ("variance", "frequency", "label-association")


def _q(s: str) -> str:
    """A SQL string literal (for names read from the store, never for user parameters)."""
    return "'" + str(s).replace("'", "''") + "'"


def _list_sql(files: list[str]) -> str:
    return "[" + ", ".join(_q(f) for f in files) + "]"


class FeatureTable(NamedTuple):
    """One encoded SAE's feature table."""

    sae: str
    model: str
    layer: int
    tokenization: str | None
    d_sae: int
    n_rows: int
    """Token rows encoded."""
    n_feature_rows: int
    arch: str | None
    files: list[str]
    """acts/*.parquet paths or URLs, by feature range."""
    stats_file: str
    feature_ranges: list[tuple[int, int]]
    """``[feature_start, feature_stop)`` of each file."""
    file_keys: list[str]
    """Store keys of ``files``."""
    stats_key: str
    """Store key of ``stats_file``."""


def feature_tables(store: Store) -> list[FeatureTable]:
    """Every completely encoded SAE of the store, by name."""
    from .encode import encoded_saes, files_dir, read_manifest

    out = []
    for name in encoded_saes(store):
        m = read_manifest(store, name) or {}
        base = files_dir(name, m)
        out.append(
            FeatureTable(
                name,
                m["model"],
                int(m["layer"]),
                m.get("tokenization"),
                int(m["d_sae"]),
                int(m["n_rows"]),
                int(m["n_feature_rows"]),
                (m.get("sae_config") or {}).get("arch"),
                [store.loc.path_of(f"{base}/acts/{f['file']}") for f in m["files"]],  # links: checked when opened
                store.loc.path_of(f"{base}/stats.parquet"),
                [(int(f["feature_start"]), int(f["feature_stop"])) for f in m["files"]],
                [f"{base}/acts/{f['file']}" for f in m["files"]],
                f"{base}/stats.parquet",
            )
        )
    return out


def resolve_sae(store: Store, layer: int | None = None, model: str | None = None, sae: str | None = None) -> FeatureTable:
    """The encoded SAE a query is about: ``sae`` by name, else the only one of (model, layer)."""
    tables = feature_tables(store)
    if sae is not None:
        for t in tables:
            if t.sae == sae:
                if (layer is not None and t.layer != int(layer)) or (model is not None and t.model != model):
                    raise ConfigError(f"SAE {sae!r} reads {t.model} layer {t.layer}, not {model or t.model} layer {layer}")
                return t
        if sae in sae_names(store):
            raise NotFoundError(f"SAE {sae!r} is not encoded yet: run actstore encode {store.url} --sae {sae}")
        known = ", ".join(sae_names(store)) or "none"
        raise NotFoundError(f"no SAE named {sae!r} in {store.url} (SAEs: {known})")
    cand = [t for t in tables if (layer is None or t.layer == int(layer)) and (model is None or t.model == model)]
    if len(cand) == 1:
        return cand[0]
    where = " ".join(x for x in (f"model {model}" if model else "", f"layer {layer}" if layer is not None else "") if x)
    where = where or "this store"
    if len(cand) > 1:
        names = ", ".join(f"{t.sae} ({t.model} layer {t.layer}, {t.d_sae} features)" for t in cand)
        raise ConfigError(f"{where} has several encoded SAEs: pick one with --sae NAME: {names}")
    unencoded = [n for n in sae_names(store) if n not in {t.sae for t in tables}]
    hint = f"; SAEs not yet encoded: {', '.join(unencoded)} (run actstore encode {store.url} --sae NAME)" if unencoded else ""
    raise NotFoundError(
        f"{where} has no encoded SAE: train one (actstore train {store.url} --layer L ...) "
        f"and encode it (actstore encode {store.url} --sae NAME){hint}"
    )


# ---------------------------------------------------------------- views
class StoreViews(NamedTuple):
    """The store's views and the files they read."""

    sql: dict[str, str]
    """``{view name: SELECT ...}``."""
    keys: list[str]
    """Store keys of every file the views read (the only files a connection may open)."""


def view_sql(store: Store) -> StoreViews:
    """Every view of the store and the keys of the files they read, from one pass over its tables."""
    views: dict[str, str] = {}
    keys: list[str] = []
    if store.tokenization_keys():
        tok = store.tokenization()
        cols = {
            "tokens": "row, sample, position, token_id, token",
            "samples": "sample, id, label, text, n_tokens, first_row, truncated",
        }
        for table, c in cols.items():
            keys += tok.parquet_keys(table)
            files = tok.parquet_files(table)
            if files:
                views[table] = f"SELECT {c} FROM read_parquet({_list_sql(files)})"
    tables = feature_tables(store)
    feats, stats, saes = [], [], []
    for t in tables:
        keys += [*t.file_keys, t.stats_key]
        head = f"SELECT {_q(t.model)} AS model, {int(t.layer)} AS layer, {_q(t.sae)} AS sae"
        # one branch per feature-range file, its range stated: for a lookup of one feature DuckDB drops
        # the other branches at plan time and opens a single file
        for path, (f0, f1) in zip(t.files, t.feature_ranges, strict=True):
            feats.append(
                f"{head}, row, feature, value FROM read_parquet({_q(path)}) WHERE feature >= {int(f0)} AND feature < {int(f1)}"
            )
        stats.append(f"{head}, feature, n_active, frequency, mean, max, variance FROM read_parquet({_q(t.stats_file)})")
        saes.append(
            f"SELECT {_q(t.sae)} AS sae, {_q(t.model)} AS model, {int(t.layer)} AS layer, "
            f"{_q(t.tokenization or '')} AS tokenization, {int(t.d_sae)} AS d_sae, {_q(t.arch or '')} AS arch, "
            f"{int(t.n_rows)}::BIGINT AS n_rows, {int(t.n_feature_rows)}::BIGINT AS n_feature_rows"
        )
    empty = "SELECT NULL::VARCHAR AS model, NULL::INTEGER AS layer, NULL::VARCHAR AS sae"
    views["features"] = (
        " UNION ALL ".join(feats) or f"{empty}, NULL::BIGINT AS row, NULL::INTEGER AS feature, NULL::FLOAT AS value LIMIT 0"
    )
    views["feature_stats"] = " UNION ALL ".join(stats) or (
        f"{empty}, NULL::INTEGER AS feature, NULL::BIGINT AS n_active, NULL::DOUBLE AS frequency, NULL::DOUBLE AS mean, "
        "NULL::FLOAT AS max, NULL::DOUBLE AS variance LIMIT 0"
    )
    views["saes"] = " UNION ALL ".join(saes) or (
        "SELECT NULL::VARCHAR AS sae, NULL::VARCHAR AS model, NULL::INTEGER AS layer, NULL::VARCHAR AS tokenization, "
        "NULL::INTEGER AS d_sae, NULL::VARCHAR AS arch, NULL::BIGINT AS n_rows, NULL::BIGINT AS n_feature_rows LIMIT 0"
    )
    views["feature_diff"], diff_keys = diff_view_sql(store)  # saved SAE feature diffs (actstore diff-features)
    return StoreViews(views, keys + diff_keys)


SANDBOX = (
    "SET enable_external_access = false",  # no file, URL or database outside allowed_paths
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false",
    "SET allow_unsigned_extensions = false",
    "SET lock_configuration = true",  # nothing above can be SET or RESET again
)


def _harden(con: duckdb.DuckDBPyConnection, store: Store, keys: list[str]) -> None:
    """Confine ``con`` to the store's own files: local or remote, nothing else can be read, nothing written."""
    allowed = [store.loc.join(k) for k in keys]
    if not store.loc.local and store.loc.url.startswith("memory://"):  # DuckDB spells memory:// paths with three slashes
        allowed += [a.replace("memory://", "memory:///", 1) for a in allowed]
    con.execute("SET allowed_paths = $p", {"p": allowed})
    for stmt in SANDBOX:
        try:
            con.execute(stmt)
        except duckdb.CatalogException:  # a setting this DuckDB does not have: the others still apply
            if "lock_configuration" in stmt:
                raise


def connect(store: Store, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the store's views, confined to the store's own files (see module docstring).

    Every connection, local or remote, is sandboxed: the store's files are read through its read-only
    filesystem and are the only files it may open; external access, extensions and configuration changes
    are off. ``read_only`` (the default) also makes the catalog read-only; ``read_only=False`` allows
    temporary in-memory tables (nothing reaches any disk). Files are checked against the manifest first.
    """
    from .integrity import check_files

    views, keys = view_sql(store)
    check_files(store.loc, keys)
    if not read_only:
        con = duckdb.connect(":memory:")
        _register_fs(con, store)
        for name, sql in views.items():
            con.execute(f"CREATE VIEW {name} AS {sql}")
        _harden(con, store, keys)
        return con
    tmp = tempfile.mkdtemp(prefix="actstore-sql-")
    path = os.path.join(tmp, "views.duckdb")
    try:
        con = duckdb.connect(path)
        _register_fs(con, store)
        for name, sql in views.items():
            con.execute(f"CREATE VIEW {name} AS {sql}")
        con.close()
        con = duckdb.connect(path, read_only=True)
    finally:
        for f in os.listdir(tmp):
            os.remove(os.path.join(tmp, f))
        os.rmdir(tmp)
    _register_fs(con, store)
    _harden(con, store, keys)
    return con


def sql(store: Store, query: str, params: dict[str, Any] | list[Any] | None = None) -> pl.DataFrame:
    """Run SQL over the store's views (a sandboxed, read-only connection) and return a polars DataFrame."""
    con = connect(store)
    try:
        return con.sql(query, params=params).pl() if params else con.sql(query).pl()
    finally:
        con.close()


def _register_fs(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    con.execute("SET parquet_metadata_cache = true")  # warm lookups skip re-reading footers
    if not store.loc.local:  # DuckDB reads s3:// etc. through the store's own read-only fsspec filesystem
        con.register_filesystem(store.loc.read_only_fs())


# ---------------------------------------------------------------- saved feature diffs (diff-features writes them)
def diff_names(store: Store) -> list[str]:
    """Names of the saved feature diffs of a store."""
    names = store.loc.list_dirs(layout.DIFFS)
    return [n for n in names if name_ok(n) and store.loc.exists(layout.diff_file(n, layout.DIFF_TABLE))]


def diff_view_sql(store: Store) -> tuple[str, list[str]]:
    """``(SELECT ..., store keys of its files)`` of the ``feature_diff`` view: every saved diff, with its name in ``diff``."""
    parts, keys = [], []
    for name in diff_names(store):
        keys.append(layout.diff_file(name, layout.DIFF_TABLE))
        parts.append(f"SELECT {_q(name)} AS diff, * FROM read_parquet({_list_sql([store.loc.join(keys[-1])])})")
    if not parts:
        return (
            "SELECT NULL::VARCHAR AS diff, NULL::VARCHAR AS side, NULL::VARCHAR AS sae, NULL::INTEGER AS feature, "
            "NULL::INTEGER AS match_decoder, NULL::DOUBLE AS decoder_cos, NULL::INTEGER AS match_activation, "
            "NULL::DOUBLE AS activation_corr, NULL::DOUBLE AS frequency, NULL::VARCHAR AS status LIMIT 0",
            [],
        )
    return " UNION ALL BY NAME ".join(parts), keys


# ---------------------------------------------------------------- Polars
def _scan(store: Store, files: list[str]) -> pl.LazyFrame:
    return pl.scan_parquet(files, storage_options=store.loc.storage_options or None)


def _lazy_union(store: Store, sae: str | None, stats: bool) -> pl.LazyFrame:
    from .integrity import check_files

    tables = [resolve_sae(store, sae=sae)] if sae else feature_tables(store)
    for t in tables:
        check_files(store.loc, [t.stats_key] if stats else t.file_keys)
    cols = ["feature", "n_active", "frequency", "mean", "max", "variance"] if stats else ["row", "feature", "value"]
    frames = [
        _scan(store, [store.loc.join(k) for k in ([t.stats_key] if stats else t.file_keys)]).select(
            pl.lit(t.model).alias("model"), pl.lit(t.layer, pl.Int32).alias("layer"), pl.lit(t.sae).alias("sae"), *cols
        )
        for t in tables
    ]
    if not frames:
        raise NotFoundError(f"{store.url} has no encoded SAE yet: run actstore encode {store.url} --sae NAME")
    return pl.concat(frames) if len(frames) > 1 else frames[0]


def lazy_features(store: Store, sae: str | None = None) -> pl.LazyFrame:
    """``features(model, layer, sae, row, feature, value)`` of one SAE, or of all encoded SAEs."""
    return _lazy_union(store, sae, stats=False)


def lazy_feature_stats(store: Store, sae: str | None = None) -> pl.LazyFrame:
    """``feature_stats(model, layer, sae, feature, n_active, frequency, mean, max, variance)``."""
    return _lazy_union(store, sae, stats=True)


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
    return [_parse_query(p.stem, p.read_text(encoding="utf-8")) for p in sorted(SQL_DIR.glob("*.sql"))]


def load_query(name: str) -> NamedQuery:
    """A named query by name (``top-tokens`` and ``top_tokens`` both work)."""
    key = name.replace("-", "_").removesuffix(".sql")
    path = SQL_DIR / f"{key}.sql"
    if not re.fullmatch(r"\w+", key) or not path.is_file():
        names = ", ".join(q.name for q in list_queries())
        raise NotFoundError(f"no named query {name!r}: choose one of {names} (actstore query --list)")
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
        raise ConfigError(f"query {query.name} has no parameter {', '.join(sorted(unknown))}: it takes {known}")
    out: dict[str, Any] = {}
    for p in query.params:
        if p.name == "sae":  # by name (checked against layer / model when given), else the layer's only SAE
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
    store: Store, name: str, params: dict[str, Any] | None = None, con: duckdb.DuckDBPyConnection | None = None
) -> pl.DataFrame:
    """Run the named query ``name`` with ``params`` bound as query parameters; a polars DataFrame."""
    q = load_query(name)
    values = bind_params(store, q, dict(params or {}))
    own = con is None
    con = con or connect(store)
    try:
        return con.sql(q.sql, params=values).pl()
    finally:
        if own:
            con.close()


# ---------------------------------------------------------------- token context (top_tokens)
_CTX_CACHE: dict[tuple, TokenContext] = {}
_CTX_CACHE_SIZE = 4


class TokenContext:
    """What ``top_tokens`` needs to show token rows of one tokenization, held in memory once per process.

    Sample bounds, ids and labels (``n_samples`` each) and the vocabulary (token id -> string, derived
    from the ``tokens`` table) are small; token ids are read from the Zarr token index (``token_id``,
    int32) for just the rows shown, so no ``tokens`` table scan or join is needed per lookup.
    """

    def __init__(self, store: Store, key: str | None = None) -> None:
        tk = store.tokenization(key)
        self.key = tk.key
        self.first_row, self.n_tokens = tk.sample_rows()  # (n_samples,) int64 each
        smp = tk.read_parquet(tk.parquet_keys("samples"), ["sample", "id", "label"]).sort("sample")
        if smp.height != self.first_row.size or (smp.height and smp["sample"][-1] != smp.height - 1):
            raise NotFoundError(f"tokenization {tk.key} of {store.url}: samples table and token index disagree (re-run extract)")
        self.sample_id = smp["id"].to_numpy()  # (n_samples,) object
        self.label = smp["label"].to_numpy()  # (n_samples,) object (None where unlabelled)
        if store.loc.exists(layout.vocab_file(tk.key)):  # the tokenizer's whole vocabulary
            v = tk.read_parquet([layout.vocab_file(tk.key)], ["token_id", "token"])
            self.vocab = np.empty(int(v["token_id"].max()) + 1, dtype=object)
            self.vocab[v["token_id"].to_numpy()] = v["token"].to_numpy()
        else:  # stores written before vocab.parquet existed: derive it from the tokens table
            from .integrity import check_files

            check_files(store.loc, tk.parquet_keys("tokens"))
            self.vocab = _vocab(store, tk.parquet_keys("tokens"))
        self.token_id = tk.array("token_id")  # (n_tokens,) int32 Zarr array

    def tokens(self, rows: np.ndarray) -> np.ndarray:
        """Token strings of token ``rows`` (sorted, unique), object ``(len(rows),)``."""
        if not rows.size:
            return np.empty(0, dtype=object)
        return self.vocab[np.asarray(self.token_id.get_orthogonal_selection(rows), dtype=np.int64)]


def _vocab(store: Store, keys: list[str]) -> np.ndarray:
    """``vocab[token_id]`` -> token string (object array) from the tokens table, one row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vocab = np.empty(0, dtype=object)
    known = np.zeros(0, dtype=bool)
    for key in keys:
        pf = pq.ParquetFile(store.loc.join(key) if store.loc.local else store.loc.open_input(key))
        for i in range(pf.num_row_groups):
            t = pf.read_row_group(i, columns=["token_id", "token"])
            ids = t.column("token_id").to_numpy().astype(np.int64)
            if not ids.size:
                continue
            if int(ids.max()) >= known.size:
                grow = int(ids.max()) + 1 - known.size
                known = np.concatenate([known, np.zeros(grow, dtype=bool)])
                vocab = np.concatenate([vocab, np.empty(grow, dtype=object)])
            new = np.flatnonzero(~known[ids])
            if new.size:
                uniq, first = np.unique(ids[new], return_index=True)
                vocab[uniq] = t.column("token").take(pa.array(new[first])).to_pylist()
                known[uniq] = True
    return vocab


def token_context(store: Store, key: str | None = None) -> TokenContext:
    """The (cached) :class:`TokenContext` of a tokenization (default: the store's default)."""
    tk = store.tokenization(key)
    ident = (store.url, tk.key, tk.n_tokens, tk.attrs.get("created"), str(tk.attrs.get("parts")))
    ctx = _CTX_CACHE.get(ident)
    if ctx is None:
        ctx = TokenContext(store, tk.key)
        while len(_CTX_CACHE) >= _CTX_CACHE_SIZE:
            _CTX_CACHE.pop(next(iter(_CTX_CACHE)))
        _CTX_CACHE[ident] = ctx
    return ctx


def _piece(token: str) -> tuple[bool, str]:
    """``(glued to the previous piece, text)`` of a token for display: WordPiece ``##`` pieces are glued."""
    if token.startswith("##"):
        return True, token[2:]
    if token.startswith(("Ġ", "▁")):
        return False, token[1:]
    return False, token


def context_string(tokens: list[str], hit: int) -> str:
    """Tokens joined for display with ``tokens[hit]`` in ``[[ ]]`` (same text as ``sql/top_tokens.sql``)."""
    out = []
    for i, tok in enumerate(tokens):
        glued, text = _piece(tok)
        out.append(("" if glued else " ") + (f"[[{text}]]" if i == hit else text))
    return "".join(out).lstrip(" ")


def top_rows(store: Store, t: FeatureTable, feature: int, n: int) -> dict[str, np.ndarray]:
    """``{"row", "value"}`` of the ``n`` highest activations of ``feature`` (value desc, then row), without DuckDB.

    Bucket files are sorted by (feature, value desc, row) (``actstore encode``): the answer is the
    feature's first ``n`` entries, read from the first row groups whose statistics admit it.
    """
    import pyarrow.parquet as pq

    from .integrity import check_file

    i = next(i for i, (f0, f1) in enumerate(t.feature_ranges) if f0 <= feature < f1)
    key = t.file_keys[i]
    check_file(store.loc, key)
    pf = pq.ParquetFile(store.loc.join(key) if store.loc.local else store.loc.open_input(key))
    md = pf.metadata
    col = md.schema.names.index("feature")
    rows, values, found = [], [], 0
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(col).statistics
        if st is not None and st.has_min_max:
            if st.max < feature:
                continue
            if st.min > feature:
                break
        tab = pf.read_row_group(g, columns=["row", "feature", "value"])
        keep = tab.column("feature").to_numpy() == feature
        rows.append(tab.column("row").to_numpy()[keep])
        values.append(tab.column("value").to_numpy()[keep])
        found += int(keep.sum())
        if found >= n:
            break
    row = np.concatenate(rows) if rows else np.empty(0, np.int64)
    value = np.concatenate(values) if values else np.empty(0, np.float32)
    return {"row": row[:n].astype(np.int64), "value": value[:n].astype(np.float32)}


TOP_TOKENS_SCHEMA = {
    "rank": pl.Int64, "value": pl.Float32, "token": pl.String, "id": pl.String, "label": pl.String, "context": pl.String,
    "row": pl.Int64, "sample": pl.Int64, "position": pl.Int32,
}  # fmt: skip


# ---------------------------------------------------------------- commands people type
def top_tokens(
    store: Store, feature: int, layer: int | None = None, model: str | None = None, sae: str | None = None, n: int = 20,
    context: int = 8, con: duckdb.DuckDBPyConnection | None = None,
) -> pl.DataFrame:  # fmt: skip
    """The ``n`` highest activations of ``feature``.

    Columns: rank, value, token, id, label, context (the token in ``[[ ]]``), row, sample, position.
    The same rows as the named query ``top_tokens``: the lookup is one DuckDB query on the feature
    table; the token, sample and context come from the in-memory :class:`TokenContext`.
    """
    t = resolve_sae(store, layer=layer, model=model, sae=sae)
    if not 0 <= int(feature) < t.d_sae:
        raise ConfigError(f"feature {feature} is out of range for SAE {t.sae} ({t.d_sae} features: 0..{t.d_sae - 1})")
    if n <= 0 or context < 0:
        raise ConfigError(f"-n must be positive and --context non-negative (got {n}, {context})")
    if con is None:  # no connection to make: read the feature's first row groups directly
        hits = top_rows(store, t, int(feature), int(n))
    else:
        hits = con.execute(
            "SELECT row, value FROM features WHERE sae = $sae AND feature = $feature ORDER BY value DESC, row LIMIT $n",
            {"sae": t.sae, "feature": int(feature), "n": int(n)},
        ).fetchnumpy()
    ctx = token_context(store, t.tokenization)
    rows = np.asarray(hits["row"], dtype=np.int64)  # (n_hits,)
    sample = np.searchsorted(ctx.first_row, rows, side="right") - 1  # (n_hits,)
    first = ctx.first_row[sample]
    lo = np.maximum(first, rows - context)  # window [lo, hi) clipped to the hit's sample
    hi = np.minimum(first + ctx.n_tokens[sample], rows + context + 1)
    shown = np.unique(np.concatenate([np.arange(a, b) for a, b in zip(lo, hi, strict=True)] or [np.empty(0, np.int64)]))
    strings = ctx.tokens(shown)  # (len(shown),) object
    at = {int(r): i for i, r in enumerate(shown)}
    contexts = [context_string([strings[at[r]] for r in range(a, b)], int(h - a)) for h, a, b in zip(rows, lo, hi, strict=True)]
    return pl.DataFrame(
        {
            "rank": np.arange(1, rows.size + 1),
            "value": np.asarray(hits["value"], dtype=np.float32),
            "token": [strings[at[int(r)]] for r in rows],
            "id": ctx.sample_id[sample].tolist(),
            "label": ctx.label[sample].tolist(),
            "context": contexts,
            "row": rows,
            "sample": sample.astype(np.int64),
            "position": (rows - first).astype(np.int32),
        },
        schema=TOP_TOKENS_SCHEMA,
    )


def top_features(
    store: Store, layer: int | None = None, model: str | None = None, sae: str | None = None, by: str = "variance",
    n: int = 10, label: str | None = None, con: duckdb.DuckDBPyConnection | None = None,
) -> pl.DataFrame:  # fmt: skip
    """The ``n`` features ranked by variance, frequency or label association (per label, or for ``label``)."""
    if by not in RANK_BY:
        raise ConfigError(f"--by {by!r}: choose one of {', '.join(RANK_BY)}")
    if n <= 0:
        raise ConfigError(f"-n must be positive, got {n}")
    t = resolve_sae(store, layer=layer, model=model, sae=sae)
    if by == "label-association":
        return run_query(store, "feature_label_association", {"sae": t.sae, "n": n, "label": label}, con=con)
    if label is not None:
        raise ConfigError("--label only applies to --by label-association")
    return run_query(store, "top_features", {"sae": t.sae, "n": n, "by": by}, con=con)
