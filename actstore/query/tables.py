"""Which feature tables a store holds, and lazy Polars frames over them."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import polars as pl

from actstore.errors import ConfigError, NotFoundError
from actstore.sae.files import sae_names

if TYPE_CHECKING:
    from actstore.store.reader import Store


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
    from actstore.encoding.table import encoded_saes, files_dir, read_encoding

    out = []
    for name in encoded_saes(store):
        m = read_encoding(store, name)
        if m is None:
            continue
        base = files_dir(name, m)
        out.append(
            FeatureTable(
                name,
                str(m.model),
                m.layer,
                m.tokenization,
                m.d_sae,
                m.n_rows,
                m.n_feature_rows,
                (m.sae_config or {}).get("arch"),
                [
                    store.loc.path_of(f"{base}/acts/{f['file']}") for f in m.files
                ],  # checked when opened
                store.loc.path_of(f"{base}/stats.parquet"),
                [(int(f["feature_start"]), int(f["feature_stop"])) for f in m.files],
                [f"{base}/acts/{f['file']}" for f in m.files],
                f"{base}/stats.parquet",
            )
        )
    return out


def resolve_sae(
    store: Store, layer: int | None = None, model: str | None = None, sae: str | None = None
) -> FeatureTable:
    """The encoded SAE a query is about: ``sae`` by name, else the only one of (model, layer)."""
    tables = feature_tables(store)
    if sae is not None:
        for t in tables:
            if t.sae == sae:
                if (layer is not None and t.layer != int(layer)) or (
                    model is not None and t.model != model
                ):
                    raise ConfigError(
                        f"SAE {sae!r} reads {t.model} layer {t.layer}, not {model or t.model} layer {layer}"
                    )
                return t
        if sae in sae_names(store):
            raise NotFoundError(
                f"SAE {sae!r} is not encoded yet: run actstore encode {store.url} --sae {sae}"
            )
        known = ", ".join(sae_names(store)) or "none"
        raise NotFoundError(f"no SAE named {sae!r} in {store.url} (SAEs: {known})")
    cand = [
        t
        for t in tables
        if (layer is None or t.layer == int(layer)) and (model is None or t.model == model)
    ]
    if len(cand) == 1:
        return cand[0]
    where = " ".join(
        x
        for x in (f"model {model}" if model else "", f"layer {layer}" if layer is not None else "")
        if x
    )
    where = where or "this store"
    if len(cand) > 1:
        names = ", ".join(f"{t.sae} ({t.model} layer {t.layer}, {t.d_sae} features)" for t in cand)
        raise ConfigError(f"{where} has several encoded SAEs: pick one with --sae NAME: {names}")
    unencoded = [n for n in sae_names(store) if n not in {t.sae for t in tables}]
    hint = (
        f"; SAEs not yet encoded: {', '.join(unencoded)} (run actstore encode {store.url} --sae NAME)"
        if unencoded
        else ""
    )
    raise NotFoundError(
        f"{where} has no encoded SAE: train one (actstore train {store.url} --layer L ...) "
        f"and encode it (actstore encode {store.url} --sae NAME){hint}"
    )


# ---------------------------------------------------------------- Polars
def _scan(store: Store, files: list[str]) -> pl.LazyFrame:
    return pl.scan_parquet(files, storage_options=store.loc.storage_options or None)


def _lazy_union(store: Store, sae: str | None, stats: bool) -> pl.LazyFrame:
    from actstore.storage.integrity import check_files

    tables = [resolve_sae(store, sae=sae)] if sae else feature_tables(store)
    for t in tables:
        check_files(store.loc, [t.stats_key] if stats else t.file_keys)
    cols = (
        ["feature", "n_active", "frequency", "mean", "max", "variance"]
        if stats
        else ["row", "feature", "value"]
    )
    frames = [
        _scan(store, [store.loc.join(k) for k in ([t.stats_key] if stats else t.file_keys)]).select(
            pl.lit(t.model).alias("model"),
            pl.lit(t.layer, pl.Int32).alias("layer"),
            pl.lit(t.sae).alias("sae"),
            *cols,
        )
        for t in tables
    ]
    if not frames:
        raise NotFoundError(
            f"{store.url} has no encoded SAE yet: run actstore encode {store.url} --sae NAME"
        )
    return pl.concat(frames) if len(frames) > 1 else frames[0]


def lazy_features(store: Store, sae: str | None = None) -> pl.LazyFrame:
    """``features(model, layer, sae, row, feature, value)`` of one SAE, or of all encoded SAEs."""
    return _lazy_union(store, sae, stats=False)


def lazy_feature_stats(store: Store, sae: str | None = None) -> pl.LazyFrame:
    """``feature_stats(model, layer, sae, feature, n_active, frequency, mean, max, variance)``."""
    return _lazy_union(store, sae, stats=True)
