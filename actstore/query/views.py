"""Query stage: DuckDB views and Polars LazyFrames over a store, named SQL queries, top tokens / features.

Views (DuckDB and Polars alike)::

    samples(sample, id, label, text, n_tokens, first_row, truncated)
    tokens(row, sample, position, token_id, token)
    features(model, layer, sae, row, feature, value)        every encoded SAE (actstore encode)
    feature_stats(model, layer, sae, feature, n_active, frequency, mean, max, variance)
    saes(sae, model, layer, tokenization, d_sae, arch, n_rows, n_feature_rows)
    feature_diff(diff, side, sae, feature, match_decoder, decoder_cos, ..., status)   actstore diff-features
    crosscoder_latents(sae, source_a, source_b, latent, norm_a, norm_b, rel_norm, cosine, frequency,
                       beta_error_a, beta_error_b, nu_error, beta_recon_a, beta_recon_b, nu_recon, class, flag,
                       exclusive)                                   actstore diff-crosscoder
    feature_effects(model, layer, sae, sample, feature, class, attribution, activation)   actstore effects
    feature_ablations(model, layer, sae, feature, mode, class, delta_prob, delta_acc, delta_loss, n, attribution,
                      effect)                                       actstore effects (the top features ablated)
    feature_ablation_samples(model, layer, sae, feature, sample, delta, predicted, predicted_ablated, mode)
    sae_evals(sae, eval, task, k, accuracy, n_train, n_test, absorption_fraction, full_absorption)   actstore eval
              (sparse_probing: one row per task and k, k NULL the dense probe; absorption: one row per scored
              letter, k its main latents, accuracy their k-sparse probe's F1, n_test the words scored)

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
import tempfile
from typing import TYPE_CHECKING, Any, NamedTuple

import duckdb
import polars as pl

from actstore.errors import QueryError
from actstore.format import layout
from actstore.format.layout import name_ok
from actstore.query.tables import feature_tables

if TYPE_CHECKING:
    from actstore.store.reader import Store


def _q(s: str) -> str:
    """A SQL string literal (for names read from the store, never for user parameters)."""
    return "'" + str(s).replace("'", "''") + "'"


def _list_sql(files: list[str]) -> str:
    return "[" + ", ".join(_q(f) for f in files) + "]"


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
        cols = {  # context windows (extract --window): each row's window too ("window" is an SQL keyword: quote it)
            "tokens": "row, sample, position, token_id, token"
            + (', "window"' if tok.attrs.window else ""),
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
        stats.append(
            f"{head}, feature, n_active, frequency, mean, max, variance FROM read_parquet({_q(t.stats_file)})"
        )
        saes.append(
            f"SELECT {_q(t.sae)} AS sae, {_q(t.model)} AS model, {int(t.layer)} AS layer, "
            f"{_q(t.tokenization or '')} AS tokenization, {int(t.d_sae)} AS d_sae, {_q(t.arch or '')} AS arch, "
            f"{int(t.n_rows)}::BIGINT AS n_rows, {int(t.n_feature_rows)}::BIGINT AS n_feature_rows"
        )
    empty = "SELECT NULL::VARCHAR AS model, NULL::INTEGER AS layer, NULL::VARCHAR AS sae"
    views["features"] = (
        " UNION ALL ".join(feats)
        or f"{empty}, NULL::BIGINT AS row, NULL::INTEGER AS feature, NULL::FLOAT AS value LIMIT 0"
    )
    views["feature_stats"] = " UNION ALL ".join(stats) or (
        f"{empty}, NULL::INTEGER AS feature, NULL::BIGINT AS n_active, NULL::DOUBLE AS frequency, NULL::DOUBLE AS mean, "
        "NULL::FLOAT AS max, NULL::DOUBLE AS variance LIMIT 0"
    )
    views["saes"] = " UNION ALL ".join(saes) or (
        "SELECT NULL::VARCHAR AS sae, NULL::VARCHAR AS model, NULL::INTEGER AS layer, NULL::VARCHAR AS tokenization, "
        "NULL::INTEGER AS d_sae, NULL::VARCHAR AS arch, NULL::BIGINT AS n_rows, NULL::BIGINT AS n_feature_rows LIMIT 0"
    )
    # saved SAE feature diffs (actstore diff-features)
    views["feature_diff"], diff_keys = diff_view_sql(store)
    # saved crosscoder diffs (diff-crosscoder)
    views["crosscoder_latents"], cc_keys = crosscoder_view_sql(store)
    views["sae_evals"] = evals_view_sql(store)  # actstore eval
    # actstore effects
    fx = effects_view_sql(store)
    views["feature_effects"], views["feature_ablations"], views["feature_ablation_samples"] = fx[:3]
    fx_keys = fx[3]
    return StoreViews(views, keys + diff_keys + cc_keys + fx_keys)


def empty_view(columns: str) -> str:
    """A view with no rows and the typed ``columns`` (``"name TYPE, name TYPE, ..."``): what a view shows of a
    store that has nothing of its kind yet."""
    return (
        "SELECT "
        + ", ".join(f"NULL::{t} AS {c}" for c, t in (p.split() for p in columns.split(", ")))
        + " LIMIT 0"
    )


EVALS_COLUMNS = (
    "sae VARCHAR, eval VARCHAR, task VARCHAR, k INTEGER, accuracy DOUBLE, n_train INTEGER, n_test INTEGER, "
    "absorption_fraction DOUBLE, full_absorption DOUBLE"
)
"""The ``sae_evals`` view: one row per SAE, evaluation, task and probe (``k`` NULL: the dense probe)."""


def evals_view_sql(store: Store) -> str:
    """``SELECT ...`` of the ``sae_evals`` view: every SAE's ``evals.json`` as rows, its values inlined (numbers as
    numbers, text quoted): the view reads no file."""
    from actstore.sae.files import read_evals, sae_names

    def num(v: Any, kind: type) -> str:
        try:
            x = kind(v)
        except (TypeError, ValueError, OverflowError):
            return "NULL"
        return repr(x) if x == x and abs(x) != float("inf") else "NULL"

    rows = []
    for name in sae_names(store):
        ev = read_evals(store, name)
        sp = ev.get("sparse_probing")
        tasks = sp.get("tasks") if isinstance(sp, dict) else None
        for t in tasks if isinstance(tasks, list) else []:
            if not isinstance(t, dict) or not isinstance(t.get("sparse"), dict):
                continue
            probes = [("NULL", t.get("dense"))] + [(num(k, int), v) for k, v in t["sparse"].items()]
            for k, acc in probes:
                rows.append(f"({_q(name)}, 'sparse_probing', {_q(str(t.get('label')))}, {k}, {num(acc, float)}, "
                            f"{num(t.get('n_train'), int)}, {num(t.get('n_test'), int)}, NULL, NULL)")  # fmt: skip
        ab = ev.get("absorption")
        letters = ab.get("letters") if isinstance(ab, dict) else None
        for r in letters if isinstance(letters, list) else []:
            if not isinstance(r, dict) or r.get("scored") is not True:
                continue
            main = r.get("main_latents")
            rows.append(f"({_q(name)}, 'absorption', {_q(str(r.get('letter')))}, "
                        f"{len(main) if isinstance(main, list) else 'NULL'}, {num(r.get('sparse_f1'), float)}, NULL, "
                        f"{num(r.get('n_true_positives'), int)}, {num(r.get('absorption_fraction'), float)}, "
                        f"{num(r.get('full_absorption'), float)})")  # fmt: skip
    if not rows:
        return empty_view(EVALS_COLUMNS)
    cols = [c.split() for c in EVALS_COLUMNS.split(", ")]
    casts = ", ".join(f"{c}::{t} AS {c}" for c, t in cols)
    return f"SELECT {casts} FROM (VALUES {', '.join(rows)}) AS t({', '.join(c for c, _ in cols)})"


EFFECTS_COLUMNS = (
    "model VARCHAR, layer INTEGER, sae VARCHAR, sample BIGINT, feature INTEGER, class VARCHAR, attribution FLOAT, "
    "activation FLOAT"
)
ABLATIONS_COLUMNS = (
    "model VARCHAR, layer INTEGER, sae VARCHAR, feature INTEGER, mode VARCHAR, class VARCHAR, delta_prob DOUBLE, "
    "delta_acc DOUBLE, delta_loss DOUBLE, n BIGINT, attribution DOUBLE, effect DOUBLE"
)


ABLATION_SAMPLES_COLUMNS = (
    "model VARCHAR, layer INTEGER, sae VARCHAR, feature INTEGER, sample BIGINT, delta DOUBLE, predicted VARCHAR, "
    "predicted_ablated VARCHAR, mode VARCHAR"
)


def effects_view_sql(store: Store) -> tuple[str, str, str, list[str]]:
    """``(feature_effects SELECT, feature_ablations SELECT, feature_ablation_samples SELECT, keys)``: every SAE's
    saved effects on every model (``actstore effects``), with the model, the SAE's layer and the SAE's name."""
    from actstore.effects.attribute import read_meta
    from actstore.sae.files import sae_names

    fx: list[str] = []
    ab: list[str] = []
    per: list[str] = []
    keys: list[str] = []
    for name in sae_names(store):
        for model in store.loc.list_dirs(f"{layout.sae_dir(name)}/{layout.EFFECTS}"):
            meta = read_meta(store, name, model) if name_ok(model) else {}
            try:
                layer = int(meta["result"]["layer"]) if meta.get("complete") else None
            except (ValueError, TypeError, KeyError):
                continue
            if layer is None:
                continue
            head = f"SELECT {_q(model)} AS model, {layer} AS layer, {_q(name)} AS sae"
            for file, out, cols in (
                (layout.EFFECTS_TABLE, fx, EFFECTS_COLUMNS),
                (layout.ABLATIONS_TABLE, ab, ABLATIONS_COLUMNS),
                (layout.ABLATION_SAMPLES, per, ABLATION_SAMPLES_COLUMNS),
            ):
                key = layout.effects_file(name, model, file)
                if store.loc.exists(key):
                    keys.append(key)
                    names = ", ".join(c.split()[0] for c in cols.split(", ")[3:])
                    out.append(f"{head}, {names} FROM read_parquet({_q(store.loc.join(key))})")
    return (
        " UNION ALL ".join(fx) or empty_view(EFFECTS_COLUMNS),
        " UNION ALL ".join(ab) or empty_view(ABLATIONS_COLUMNS),
        " UNION ALL ".join(per) or empty_view(ABLATION_SAMPLES_COLUMNS),
        keys,
    )


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
    # DuckDB spells memory:// paths with three slashes
    if not store.loc.local and store.loc.url.startswith("memory://"):
        allowed += [a.replace("memory://", "memory:///", 1) for a in allowed]
    con.execute("SET allowed_paths = $p", {"p": allowed})
    for stmt in SANDBOX:
        try:
            con.execute(stmt)
        # a setting this DuckDB does not have: the others still apply
        except duckdb.CatalogException:
            if "lock_configuration" in stmt:
                raise


def connect(store: Store, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the store's views, confined to the store's own files (see module docstring).

    Every connection, local or remote, is sandboxed: the store's files are read through its read-only
    filesystem and are the only files it may open; external access, extensions and configuration changes
    are off. ``read_only`` (the default) also makes the catalog read-only; ``read_only=False`` allows
    temporary in-memory tables (nothing reaches any disk). Files are checked against the manifest first.
    """
    from actstore.storage.integrity import check_files

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
    except duckdb.Error as exc:
        raise query_error(exc) from None
    finally:
        con.close()


def query_error(exc: Exception) -> QueryError:
    """A DuckDB error as actstore's QueryError: its first line, naming what DuckDB refused."""
    return QueryError(f"SQL error: {str(exc).splitlines()[0][:500]}")


def _register_fs(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    con.execute("SET parquet_metadata_cache = true")  # warm lookups skip re-reading footers
    # DuckDB reads s3:// etc. through the store's own read-only fsspec filesystem
    if not store.loc.local:
        con.register_filesystem(store.loc.read_only_fs())


# ---------------------------------------------------------------- saved feature diffs (diff-features writes them)
def diff_names(store: Store) -> list[str]:
    """Names of the saved feature diffs of a store."""
    names = store.loc.list_dirs(layout.DIFFS)
    return [
        n for n in names if name_ok(n) and store.loc.exists(layout.diff_file(n, layout.DIFF_TABLE))
    ]


def diff_view_sql(store: Store) -> tuple[str, list[str]]:
    """``(SELECT ..., store keys of its files)`` of the ``feature_diff`` view: every saved diff, with its name in ``diff``."""
    parts, keys = [], []
    for name in diff_names(store):
        keys.append(layout.diff_file(name, layout.DIFF_TABLE))
        parts.append(
            f"SELECT {_q(name)} AS diff, * FROM read_parquet({_list_sql([store.loc.join(keys[-1])])})"
        )
    if not parts:
        return (
            "SELECT NULL::VARCHAR AS diff, NULL::VARCHAR AS side, NULL::VARCHAR AS sae, NULL::INTEGER AS feature, "
            "NULL::INTEGER AS match_decoder, NULL::DOUBLE AS decoder_cos, NULL::INTEGER AS match_activation, "
            "NULL::DOUBLE AS activation_corr, NULL::DOUBLE AS frequency, NULL::VARCHAR AS status LIMIT 0",
            [],
        )
    return " UNION ALL BY NAME ".join(parts), keys


CROSSCODER_COLUMNS = (
    "latent INTEGER, norm_a DOUBLE, norm_b DOUBLE, rel_norm DOUBLE, cosine DOUBLE, frequency DOUBLE, beta_error_a DOUBLE, "
    "beta_error_b DOUBLE, nu_error DOUBLE, beta_recon_a DOUBLE, beta_recon_b DOUBLE, nu_recon DOUBLE, class VARCHAR, "
    "flag VARCHAR, exclusive BOOLEAN"
)


def crosscoder_view_sql(store: Store) -> tuple[str, list[str]]:
    """``(SELECT ..., keys)`` of the ``crosscoder_latents`` view: every crosscoder's saved diff (``diff-crosscoder``),
    with its name in ``sae`` and its two sources in ``source_a`` / ``source_b``."""
    import json

    from actstore.sae.files import sae_names

    parts, keys = [], []
    for name in sae_names(store):
        t_key, m_key = (
            layout.sae_file(name, layout.CROSSCODER_LATENTS),
            layout.sae_file(name, layout.CROSSCODER_DIFF),
        )
        if not (store.loc.exists(t_key) and store.loc.exists(m_key)):
            continue
        try:
            src = json.loads(store.loc.read_bytes(m_key))["sources"]
            src_a, src_b = str(src[0]), str(src[1])
        except (ValueError, KeyError, IndexError, TypeError):
            continue  # a damaged latents.json: the view leaves that crosscoder out (actstore verify names it)
        keys.append(t_key)
        parts.append(
            f"SELECT {_q(name)} AS sae, {_q(src_a)} AS source_a, {_q(src_b)} AS source_b, * "
            f"FROM read_parquet({_list_sql([store.loc.join(t_key)])})"
        )
    if not parts:
        return empty_view(
            f"sae VARCHAR, source_a VARCHAR, source_b VARCHAR, {CROSSCODER_COLUMNS}"
        ), []
    return " UNION ALL BY NAME ".join(parts), keys
