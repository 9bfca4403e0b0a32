"""The one-command lookups: ``top_tokens`` and ``top_features``, with token contexts read from the token index."""

from __future__ import annotations

from typing import TYPE_CHECKING

import duckdb
import numpy as np
import polars as pl

from actstore.errors import ConfigError, NotFoundError
from actstore.format import layout
from actstore.query.config import CONTEXT_TOKENS, RANK_BY, TOP_FEATURES_N, TOP_TOKENS_N
from actstore.query.named import run_query
from actstore.query.tables import FeatureTable, resolve_sae

if TYPE_CHECKING:
    from actstore.store.reader import Store


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
        if smp.height != self.first_row.size or (
            smp.height and smp["sample"][-1] != smp.height - 1
        ):
            raise NotFoundError(
                f"tokenization {tk.key} of {store.url}: samples table and token index disagree (re-run extract)"
            )
        self.sample_id = smp["id"].to_numpy()  # (n_samples,) object
        self.label = smp["label"].to_numpy()  # (n_samples,) object (None where unlabelled)
        if store.loc.exists(layout.vocab_file(tk.key)):  # the tokenizer's whole vocabulary
            v = tk.read_parquet([layout.vocab_file(tk.key)], ["token_id", "token"])
            self.vocab = np.empty(int(v["token_id"].to_numpy().max()) + 1, dtype=object)
            self.vocab[v["token_id"].to_numpy()] = v["token"].to_numpy()
        else:  # stores written before vocab.parquet existed: derive it from the tokens table
            from actstore.storage.integrity import check_files

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
    ident = (store.url, tk.key, tk.n_tokens, tk.attrs.created, str(tk.attrs.parts))
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


def top_rows(store: Store, t: FeatureTable, feature: int, n: int | None) -> dict[str, np.ndarray]:
    """``{"row", "value"}`` of the ``n`` highest activations of ``feature`` (value desc, then row), without DuckDB;
    ``n=None``: all of them.

    Bucket files are sorted by (feature, value desc, row) (``actstore encode``): the answer is the
    feature's first ``n`` entries, read from the first row groups whose statistics admit it.
    """
    import pyarrow.parquet as pq

    from actstore.storage.integrity import check_file

    i = next(i for i, (f0, f1) in enumerate(t.feature_ranges) if f0 <= feature < f1)
    key = t.file_keys[i]
    check_file(store.loc, key)
    pf = pq.ParquetFile(store.loc.join(key) if store.loc.local else store.loc.open_input(key))
    md = pf.metadata
    col = md.schema.names.index("feature")
    groups = []  # the row groups whose statistics admit the feature (a run of consecutive ones)
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(col).statistics
        if st is not None and st.has_min_max:
            if st.max < feature:
                continue
            if st.min > feature:
                break
        groups.append(g)
    rows, values, found = [], [], 0
    # all of them: one read; the top n: group by group until n are found
    step = len(groups) if n is None else 1
    for i in range(0, len(groups), max(step, 1)):
        # through polars: pyarrow's to_numpy imports pandas (half a second of CPU in a fresh process)
        tab = pl.DataFrame(
            pl.from_arrow(
                pf.read_row_groups(
                    groups[i : i + max(step, 1)], columns=["row", "feature", "value"]
                )
            )
        )
        feat, row, value = (tab[c].to_numpy() for c in ("feature", "row", "value"))
        keep = feat == feature
        rows.append(row[keep])
        values.append(value[keep])
        found += int(keep.sum())
        if n is not None and found >= n:
            break
    row = np.concatenate(rows) if rows else np.empty(0, np.int64)
    value = np.concatenate(values) if values else np.empty(0, np.float32)
    return {"row": row[:n].astype(np.int64), "value": value[:n].astype(np.float32)}


TOP_TOKENS_SCHEMA = {
    "rank": pl.Int64,
    "value": pl.Float32,
    "token": pl.String,
    "id": pl.String,
    "label": pl.String,
    "context": pl.String,
    "row": pl.Int64,
    "sample": pl.Int64,
    "position": pl.Int32,
}


# ---------------------------------------------------------------- commands people type
def top_tokens(
    store: Store,
    feature: int,
    layer: int | None = None,
    model: str | None = None,
    sae: str | None = None,
    n: int = TOP_TOKENS_N,
    context: int = CONTEXT_TOKENS,
    con: duckdb.DuckDBPyConnection | None = None,
) -> pl.DataFrame:
    """The ``n`` highest activations of ``feature``.

    Columns: rank, value, token, id, label, context (the token in ``[[ ]]``), row, sample, position.
    The same rows as the named query ``top_tokens``: the lookup is one DuckDB query on the feature
    table; the token, sample and context come from the in-memory :class:`TokenContext`.
    """
    t = resolve_sae(store, layer=layer, model=model, sae=sae)
    if not 0 <= int(feature) < t.d_sae:
        raise ConfigError(
            f"feature {feature} is out of range for SAE {t.sae} ({t.d_sae} features: 0..{t.d_sae - 1})"
        )
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
    shown = np.unique(
        np.concatenate(
            [np.arange(a, b) for a, b in zip(lo, hi, strict=True)] or [np.empty(0, np.int64)]
        )
    )
    strings = ctx.tokens(shown)  # (len(shown),) object
    at = {int(r): i for i, r in enumerate(shown)}
    contexts = [
        context_string([strings[at[r]] for r in range(a, b)], int(h - a))
        for h, a, b in zip(rows, lo, hi, strict=True)
    ]
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
    store: Store,
    layer: int | None = None,
    model: str | None = None,
    sae: str | None = None,
    by: str = "variance",
    n: int = TOP_FEATURES_N,
    label: str | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
    cls: str | None = None,
) -> pl.DataFrame:
    """The ``n`` features ranked by variance, frequency or label association (per label, or for ``label``), or by
    effect on the model's output (per class, or for class ``cls``)."""
    if by not in RANK_BY:
        raise ConfigError(f"--by {by!r}: choose one of {', '.join(RANK_BY)}")
    if n <= 0:
        raise ConfigError(f"-n must be positive, got {n}")
    if cls is not None and by != "effect":
        raise ConfigError("--class only applies to --by effect")
    if by == "effect":
        return top_features_by_effect(store, sae, layer, model, n, cls, con)
    t = resolve_sae(store, layer=layer, model=model, sae=sae)
    if by == "label-association":
        return run_query(
            store, "feature_label_association", {"sae": t.sae, "n": n, "label": label}, con=con
        )
    if label is not None:
        raise ConfigError("--label only applies to --by label-association")
    return run_query(store, "top_features", {"sae": t.sae, "n": n, "by": by}, con=con)


def top_features_by_effect(
    store: Store,
    sae: str | None,
    layer: int | None,
    model: str | None,
    n: int,
    cls: str | None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> pl.DataFrame:
    """The named query ``features_driving_class``: each class's ``n`` features with the largest summed attribution
    (``actstore effects``), for the SAE named or the only one with effects at ``layer`` (of ``model``: the model the
    effects were measured on)."""
    from actstore.query.views import sql as run_sql

    have = run_sql(store, "SELECT DISTINCT sae, layer, model, class FROM feature_effects")
    cand = have.filter(
        (pl.col("sae") == sae) if sae is not None else pl.lit(True),
        (pl.col("layer") == layer) if layer is not None else pl.lit(True),
        (pl.col("model") == model) if model is not None else pl.lit(True),
    )
    names = sorted(set(cand["sae"].to_list()))
    if not names:
        what = f"SAE {sae!r}" if sae else f"layer {layer}" if layer is not None else "any SAE"
        raise NotFoundError(
            f"no effects of {what} in {store.url}: run actstore effects {store.url} --sae NAME"
        )
    if len(names) > 1:
        raise ConfigError(f"several SAEs have effects here ({', '.join(names)}): pass --sae NAME")
    classes = sorted(set(cand.filter(pl.col("sae") == names[0])["class"].to_list()))
    if cls is not None and cls not in classes:
        raise ConfigError(
            f"--class {cls!r} is not a class of SAE {names[0]!r}'s effects (classes: {', '.join(classes)})"
        )
    return run_query(
        store,
        "features_driving_class",
        {"sae": names[0], "n": n, "class": cls, "model": model},
        con=con,
    )
