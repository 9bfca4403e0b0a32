"""What each page of the feature browser shows, as plain data (no HTTP, no HTML): ``serve`` renders it per request,
``dashboard`` once per feature into static files, so both show the same numbers.

A :class:`Browser` holds one open store and what is worth keeping between requests: the token context (sample
bounds, ids, labels, vocabulary), each SAE's statistics table, its label association and token search index
(built on first use from the feature table, then answered from memory), and the SAEs loaded for live views.
Pages that read one feature read only its row groups (``query.lookups.top_rows``), so they stay fast however large
the feature table; pages that need an SAE's activations on a sample or on the other model's rows (the sample page,
the pretrained-vs-fine-tuned views) encode those few rows live with torch.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from actstore.errors import ConfigError, NotFoundError
from actstore.format import layout
from actstore.format.layout import check_name, name_ok

if TYPE_CHECKING:
    from actstore.query.tables import FeatureTable
    from actstore.store.reader import Store

TOKEN_INDEX_TOP = 50
"""Top activations per feature the token search looks at ("features that fire on token X")."""


@dataclass
class PageSettings:
    """What the pages show: the same for ``serve`` and ``dashboard``."""

    page_size: int = 20
    context: int = 8
    histogram_bins: int = 40


class Browser:
    """One store's pages (see the module docstring). Thread-safe: caches are filled under a lock."""

    def __init__(self, store: Store, settings: PageSettings | None = None) -> None:
        self.store = store
        self.settings = settings or PageSettings()
        self._lock = threading.Lock()
        self._cache: dict[Any, Any] = {}

    # ---- caches
    def _cached(self, key: Any, make: Any) -> Any:
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        val = make()
        with self._lock:
            self._cache.setdefault(key, val)
            return self._cache[key]

    def table(self, sae: str) -> FeatureTable:
        """The encoded feature table of ``sae`` (NotFoundError naming the encoded ones)."""
        from actstore.query.tables import feature_tables

        check_name(sae, "SAE")
        tables = self._cached("tables", lambda: {t.sae: t for t in feature_tables(self.store)})
        if sae not in tables:
            raise NotFoundError(
                f"SAE {sae!r} is not encoded in {self.store.url} (encoded: {', '.join(tables) or 'none'})"
            )
        return tables[sae]

    def console(self) -> Any:
        """The store's sandboxed, read-only DuckDB connection the SQL console takes cursors of (made once)."""
        from actstore.query.views import connect

        return self._cached("console", lambda: connect(self.store))

    def ctx(self, tokenization: str | None = None) -> Any:
        from actstore.query.lookups import token_context

        return token_context(self.store, tokenization)

    def stats(self, sae: str) -> pl.DataFrame:
        """``feature, n_active, frequency, mean, max, variance`` of every feature of ``sae`` (its stats.parquet, read
        through the store's own filesystem and checked against the manifest)."""
        import io

        from actstore.storage.integrity import check_file

        def make() -> pl.DataFrame:
            key = self.table(sae).stats_key
            raw = self.store.loc.read_bytes(key)
            check_file(self.store.loc, key, raw)
            cols = ["feature", "n_active", "frequency", "mean", "max", "variance"]
            return pl.read_parquet(io.BytesIO(raw), columns=cols).sort("feature")

        return self._cached(("stats", sae), make)

    def sae_config(self, sae: str) -> Any:
        from actstore.sae.files import read_config

        return self._cached(("cfg", sae), lambda: read_config(self.store, sae))

    # ---- the store page
    def store_page(self) -> dict[str, Any]:
        """Models, layers, tokenizations, SAEs and crosscoders with their metrics, saved diffs."""
        from actstore.query.info import store_info
        from actstore.sae.files import list_saes

        info = store_info(self.store)
        encoded = set(self._encoded())
        saes = list_saes(self.store).to_dicts()
        for row in saes:
            row["encoded"] = row["name"] in encoded
        models = [
            {
                "key": k,
                "source": v.get("source") or v.get("model"),
                "tokenization": v.get("tokenization"),
                "layers": [{"layer": int(layer), **la} for layer, la in v["layers"].items()],
            }
            for k, v in info["models"].items()
        ]
        toks = [
            {
                "key": k,
                "n_tokens": v.get("n_tokens"),
                "n_samples": v.get("n_samples"),
                "max_length": v.get("max_length"),
            }
            for k, v in info["tokenizations"].items()
        ]
        return {
            "url": self.store.url,
            "models": models,
            "tokenizations": toks,
            "saes": saes,
            "crosscoders": self.crosscoder_counts(),
            "pairs": self.model_pairs(),
        }

    def _encoded(self) -> list[str]:
        from actstore.encoding.table import encoded_saes

        return encoded_saes(self.store)

    def crosscoder_counts(self) -> list[dict[str, Any]]:
        """Each crosscoder with a saved diff (``diff-crosscoder``): its sources and class counts."""
        from actstore.analysis.crosscoder import load_crosscoder_diff
        from actstore.sae.files import sae_names

        out = []
        for name in sae_names(self.store):
            if self.store.loc.exists(layout.sae_file(name, layout.CROSSCODER_DIFF)):
                d = load_crosscoder_diff(self.store, name)
                out.append({"name": name, "a": d.sources[0], "b": d.sources[1], **d.counts})
        return out

    def model_pairs(self) -> list[tuple[str, str]]:
        """Pairs of models on one tokenization (row-aligned): the pretrained-vs-fine-tuned views."""
        ms = self.store.models
        tk = {m: self.store.model_info(m).tokenization for m in ms}
        return [(a, b) for i, a in enumerate(ms) for b in ms[i + 1 :] if tk[a] == tk[b]]

    def similarity(self) -> dict[str, Any]:
        """Mean-activation cosine per shared layer of each row-aligned model pair (computed once, then cached)."""
        from actstore.analysis.compare import compare
        from actstore.analysis.config import CompareConfig

        def make() -> dict[str, Any]:
            out = []
            for a, b in self.model_pairs():
                res = compare(self.store, CompareConfig(models=(a, b), metrics=["mean-cosine"]))
                out.append({"a": a, "b": b, "rows": res.table.to_dicts()})
            return {"pairs": out}

        return self._cached("similarity", make)

    # ---- the features of one SAE
    def features_page(
        self,
        sae: str,
        sort: str = "variance",
        desc: bool = True,
        token: str | None = None,
        label: str | None = None,
        min_freq: float | None = None,
        max_freq: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> dict[str, Any]:
        """Features of ``sae``, filtered (frequency range, "fires on token X", "associated with label Y") and sorted."""
        t = self.table(sae)
        df = self.stats(sae)
        cols = ["feature", "n_active", "frequency", "mean", "max", "variance"]
        extra: list[str] = []
        if token:
            hits = self.token_index(sae).get(token.strip().lower())
            tk = pl.DataFrame(
                hits or [],
                schema={"feature": pl.Int32, "token_hits": pl.Int64, "token_max": pl.Float32},
                orient="row",
            )
            df = df.join(tk, on="feature", how="inner")
            extra += ["token_hits", "token_max"]
        if label:
            la = (
                self.label_association(sae)
                .filter(pl.col("label") == label)
                .select("feature", "mean_diff", "freq_label")
            )
            df = df.join(la, on="feature", how="inner")
            extra += ["mean_diff", "freq_label"]
        if min_freq is not None:
            df = df.filter(pl.col("frequency") >= min_freq)
        if max_freq is not None:
            df = df.filter(pl.col("frequency") <= max_freq)
        allowed = cols + extra
        if sort not in allowed:
            raise ConfigError(f"sort by one of {', '.join(allowed)}, not {sort!r}")
        df = df.sort([sort, "feature"], descending=[desc, False])
        total = df.height
        labels = [
            lab for lab in self._label_codes(t.tokenization)[0] if lab is not None
        ]  # the store's, not computed
        return {
            "sae": sae,
            "model": t.model,
            "layer": t.layer,
            "d_sae": t.d_sae,
            "n_rows": t.n_rows,
            "n_feature_rows": t.n_feature_rows,
            "columns": allowed,
            "rows": df.slice(offset, limit).to_dicts(),
            "total": total,
            "sort": sort,
            "desc": desc,
            "token": token or "",
            "label": label or "",
            "min_freq": min_freq,
            "max_freq": max_freq,
            "limit": limit,
            "offset": offset,
            "labels": labels,
            "crosscoder": self.sae_config(sae).is_crosscoder,
        }

    def label_association(self, sae: str) -> pl.DataFrame:
        """Per (feature, label): mean activation on the label's tokens minus elsewhere (the named query
        ``feature_label_association``, every feature), computed once per SAE."""
        from actstore.query.lookups import top_features

        d = self.table(sae).d_sae
        return self._cached(
            ("labels", sae), lambda: top_features(self.store, sae=sae, by="label-association", n=d)
        )

    def token_index(self, sae: str) -> dict[str, list[tuple[int, int, float]]]:
        """``token (lower case) -> [(feature, hits among its top activations, max there)]``, from each feature's
        ``TOKEN_INDEX_TOP`` highest activations (the feature table is sorted by feature, then value: one pass)."""

        def make() -> dict[str, list[tuple[int, int, float]]]:
            from actstore.query.views import connect

            t = self.table(sae)
            con = connect(self.store)  # sandboxed DuckDB: local stores and buckets alike
            try:
                top = con.sql(
                    "SELECT row, feature, value FROM features WHERE sae = $sae "
                    "QUALIFY row_number() OVER (PARTITION BY feature ORDER BY value DESC, row) <= $n",
                    params={"sae": sae, "n": TOKEN_INDEX_TOP},
                ).pl()
            finally:
                con.close()
            rows = top["row"].to_numpy()
            uniq, inv = np.unique(rows, return_inverse=True)
            toks = self.ctx(t.tokenization).tokens(uniq)[inv]
            df = pl.DataFrame(
                {
                    "token": [str(x).lower() for x in toks],
                    "feature": top["feature"],
                    "value": top["value"],
                }
            )
            agg = df.group_by("token", "feature").agg(
                pl.len().alias("n"), pl.col("value").max().alias("max")
            )
            out: dict[str, list[tuple[int, int, float]]] = {}
            for tok, f, n, mx in agg.sort(["n", "max"], descending=True).iter_rows():
                out.setdefault(tok, []).append((int(f), int(n), float(mx)))
            return out

        return self._cached(("tokens", sae), make)

    # ---- one feature
    def feature_table(self, sae: str, feature: int) -> Any:
        """SAE ``sae``'s feature table; NotFoundError (a 404) when ``feature`` is not one of its features."""
        t = self.table(sae)
        if not 0 <= feature < t.d_sae:
            raise NotFoundError(
                f"feature {feature} is out of range for SAE {sae} ({t.d_sae} features: 0..{t.d_sae - 1})"
            )
        return t

    def feature_page(self, sae: str, feature: int, page: int = 0) -> dict[str, Any]:
        """A feature: statistics, activation histogram, density, top contexts (page ``page``), label breakdown,
        the other model's view of the same tokens, and for a crosscoder latent its decoder norms and class."""
        from actstore.query.lookups import top_rows

        t = self.feature_table(sae, feature)
        stats = self.stats(sae).filter(pl.col("feature") == feature).row(0, named=True)
        # every activation of the feature, strongest first
        hits = top_rows(self.store, t, feature, None)
        values = hits["value"]
        counts, edges = (
            np.histogram(values, bins=self.settings.histogram_bins)
            if len(values)
            else (np.zeros(0), np.zeros(0))
        )
        cfg = self.sae_config(sae)
        out = {
            "sae": sae,
            "feature": feature,
            "model": t.model,
            "layer": t.layer,
            "d_sae": t.d_sae,
            "n_rows": t.n_rows,
            "stats": stats,
            "density": len(values) / max(t.n_rows, 1),
            "log10_density": float(np.log10(len(values) / t.n_rows))
            if len(values) and t.n_rows
            else None,
            "histogram": {
                "counts": counts.astype(int).tolist(),
                "edges": [float(e) for e in edges],
            },
            "labels": self._label_breakdown(t, hits),
            "page": page,
            "n_pages": -(-len(values) // self.settings.page_size),
            "crosscoder": self._latent(sae, feature) if cfg.is_crosscoder else None,
            "effects": self._effects(sae, feature),
            "matched_effects": self._matched_effects(sae, feature),
        }
        out["contexts"] = self.contexts(sae, feature, page, hits)
        return out

    def contexts(
        self, sae: str, feature: int, page: int, hits: dict[str, np.ndarray] | None = None
    ) -> list[dict[str, Any]]:
        """Page ``page`` of the feature's top activating tokens, each with its neighbours and their values of the
        feature in every view (the SAE's model; the other row-aligned model; a crosscoder's models)."""
        from actstore.query.lookups import top_rows

        t = self.feature_table(sae, feature)
        hits = (
            hits
            if hits is not None
            else top_rows(self.store, t, feature, (page + 1) * self.settings.page_size)
        )
        size, c = self.settings.page_size, self.settings.context
        rows_all, vals_all = hits["row"], hits["value"]
        pick = np.arange(page * size, min((page + 1) * size, len(rows_all)))
        if not len(pick):
            return []
        ctx = self.ctx(t.tokenization)
        hit_rows = rows_all[pick]
        sample = np.searchsorted(ctx.first_row, hit_rows, side="right") - 1
        first = ctx.first_row[sample]
        lo, hi = (
            np.maximum(first, hit_rows - c),
            np.minimum(first + ctx.n_tokens[sample], hit_rows + c + 1),
        )
        shown = np.unique(np.concatenate([np.arange(a, b) for a, b in zip(lo, hi, strict=True)]))
        strings = ctx.tokens(shown)
        at = {int(r): i for i, r in enumerate(shown)}
        # the feature's values on the rows shown: one gather, not a search
        on = np.zeros(t.n_rows, dtype=bool)
        on[shown] = True
        mine = on[rows_all]
        val_of = dict(zip(rows_all[mine].tolist(), vals_all[mine].tolist(), strict=True))
        views = self._views(sae, feature, shown, val_of)
        out = []
        for i, (r, s, a, b) in enumerate(zip(hit_rows, sample, lo, hi, strict=True)):
            toks = [
                {
                    "row": int(x),
                    "token": str(strings[at[int(x)]]),
                    "values": [float(v["values"][at[int(x)]]) for v in views],
                }
                for x in range(int(a), int(b))
            ]
            out.append(
                {
                    "rank": int(pick[i]) + 1,
                    "row": int(r),
                    "value": float(vals_all[pick[i]]),
                    "sample": int(s),
                    "id": str(ctx.sample_id[s]),
                    "label": None if ctx.label[s] is None else str(ctx.label[s]),
                    "position": int(r - first[i]),
                    "hit": int(r - a),
                    "tokens": toks,
                }
            )
        return out

    def view_names(self, sae: str) -> list[str]:
        """Column names of a context's values: the SAE's own model first, then the other views."""
        cfg = self.sae_config(sae)
        if cfg.is_crosscoder:
            return [f"{lab} (x decoder norm)" for lab in cfg.source_labels()]
        return [str(cfg.model), *[m for m in self._other_models(sae)]]

    def _other_models(self, sae: str) -> list[str]:
        cfg = self.sae_config(sae)
        others = [b if a == cfg.model else a for a, b in self.model_pairs() if cfg.model in (a, b)]
        return [
            m
            for m in others
            if cfg.layer in self.store.layers(m)
            and cfg.d_in == self.store.layer_attrs(m, cfg.layer).d_model
        ]

    def _views(
        self, sae: str, feature: int, shown: np.ndarray, val_of: dict[int, float]
    ) -> list[dict[str, Any]]:
        cfg = self.sae_config(sae)
        own = np.asarray([val_of.get(int(r), 0.0) for r in shown], dtype=np.float64)
        # the latent's size in each model: activation x its decoder norm there
        if cfg.is_crosscoder:
            lat = self._latent(sae, feature)
            norms = [lat["norm_a"], lat["norm_b"]] if lat else [1.0] * cfg.n_sources
            return [
                {"name": n, "values": own * float(norms[i] if i < len(norms) else 1.0)}
                for i, n in enumerate(self.view_names(sae))
            ]
        out = [{"name": str(cfg.model), "values": own}]
        for m in self._other_models(sae):
            out.append({"name": m, "values": self._live_values(sae, m, feature, shown)})
        return out

    def _live_values(self, sae: str, model: str, feature: int, rows: np.ndarray) -> np.ndarray:
        """The SAE's feature on ``model``'s stored rows (the other model's view of the same tokens), encoded live."""
        import torch

        from actstore.sae.files import load_sae

        net = self._cached(("sae", sae), lambda: load_sae(self.store, sae).eval())
        # (n, d_model)
        x = self.store.activations(model, int(self.sae_config(sae).layer)).take(rows)
        with torch.no_grad():
            return net.encode(torch.from_numpy(x))[:, feature].double().numpy()

    def _effects(self, sae: str, feature: int) -> list[dict[str, Any]]:
        """The feature's saved effects (``actstore effects``), per model and class: summed attribution, samples it
        fired on, and its exact ablation's change of the class's probability and of accuracy where measured."""
        from actstore.query.views import sql

        def make() -> pl.DataFrame:
            fx = sql(self.store, "SELECT model, class, feature, sum(attribution) AS attribution, count(*) AS samples "
                                 "FROM feature_effects WHERE sae = $s GROUP BY ALL", {"s": sae})  # fmt: skip
            ab = sql(self.store, "SELECT model, class, feature, delta_prob, delta_acc, delta_loss FROM "
                                 "feature_ablations WHERE sae = $s", {"s": sae})  # fmt: skip
            return fx.join(ab, on=["model", "class", "feature"], how="left").sort("model", "class")

        table = self._cached(("effects", sae), make)
        return table.filter(pl.col("feature") == feature).drop("feature").to_dicts()

    def _matched_effects(self, sae: str, feature: int) -> list[dict[str, Any]]:
        """For each saved feature diff of the SAE (``diff-features``): the other SAE's matching feature (by decoder),
        the diff's verdict, and that feature's saved effects (e.g. the pretrained copy of a fine-tuned feature,
        spliced into the fine-tuned classifier); only matches with effects."""
        from actstore.query.views import sql

        rows = sql(
            self.store,
            "SELECT o.sae AS other, d.match_decoder AS feature, d.decoder_cos, d.status FROM feature_diff d "
            "JOIN (SELECT DISTINCT diff, side, sae FROM feature_diff) o ON o.diff = d.diff AND o.side <> d.side "
            "WHERE d.sae = $s AND d.feature = $f ORDER BY other",
            {"s": sae, "f": feature},
        ).to_dicts()
        out = []
        for r in rows:
            if r["feature"] is None or not name_ok(r["other"]):
                continue
            effects = self._effects(r["other"], int(r["feature"]))
            if effects:
                out.append({**r, "effects": effects})
        return out

    def _latent(self, sae: str, feature: int) -> dict[str, Any] | None:
        """A crosscoder latent's row of its saved diff (``diff-crosscoder``), None if it has none."""
        from actstore.analysis.crosscoder import load_crosscoder_diff

        if not self.store.loc.exists(layout.sae_file(sae, layout.CROSSCODER_DIFF)):
            return None
        d = self._cached(("latents", sae), lambda: load_crosscoder_diff(self.store, sae))
        return {**d.table.row(feature, named=True), "a": d.sources[0], "b": d.sources[1]}

    def _label_codes(
        self, tokenization: str | None
    ) -> tuple[list[str | None], np.ndarray, np.ndarray]:
        """``(labels, code of each sample (n_samples,), tokens per label (n_labels,))`` of a tokenization (cached)."""

        def make() -> tuple[list[str | None], np.ndarray, np.ndarray]:
            ctx = self.ctx(tokenization)
            names = [None if v is None else str(v) for v in ctx.label]
            labels = sorted({n for n in names if n is not None}) + ([None] if None in names else [])
            index = {lab: i for i, lab in enumerate(labels)}
            codes = np.fromiter((index[n] for n in names), dtype=np.int64, count=len(names))
            return labels, codes, np.bincount(codes, weights=ctx.n_tokens, minlength=len(labels))

        return self._cached(("label-codes", tokenization), make)

    def _row_codes(self, tokenization: str | None) -> np.ndarray:
        """The label code of every token row (int16 ``(n_tokens,)``, cached): a gather per page, no search."""

        def make() -> np.ndarray:
            ctx = self.ctx(tokenization)
            codes = self._label_codes(tokenization)[1].astype(np.int16)
            out = np.zeros(
                int(ctx.first_row[-1] + ctx.n_tokens[-1]) if len(ctx.first_row) else 0,
                dtype=np.int16,
            )
            for i, (a, n) in enumerate(zip(ctx.first_row, ctx.n_tokens, strict=True)):
                out[a : a + n] = codes[i]
            return out

        return self._cached(("row-codes", tokenization), make)

    def _label_breakdown(
        self, t: FeatureTable, hits: dict[str, np.ndarray]
    ) -> list[dict[str, Any]]:
        """Per label: the feature's active tokens, their share of the label's tokens, mean and max activation."""
        labels, codes, n_tok = self._label_codes(t.tokenization)
        if not labels or labels == [None]:
            return []
        # (n_hits,) label code of each activation's token
        c = self._row_codes(t.tokenization)[hits["row"]]
        n_act = np.bincount(c, minlength=len(labels))
        total = np.bincount(c, weights=hits["value"], minlength=len(labels))
        mx = np.full(len(labels), np.nan)
        # hits come strongest first: a label's first hit is its max
        first = np.unique(c, return_index=True)
        mx[first[0]] = hits["value"][first[1]]
        return [
            {
                "label": lab,
                "n": int(n_tok[i]),
                "n_active": int(n_act[i]),
                "frequency": float(n_act[i] / n_tok[i]) if n_tok[i] else None,
                "mean": float(total[i] / n_act[i]) if n_act[i] else None,
                "max": None if np.isnan(mx[i]) else float(mx[i]),
            }
            for i, lab in enumerate(labels)
        ]

    # ---- one sample
    def sample_page(self, sample: int, top: int = 3) -> dict[str, Any]:
        """A stored sample: its text and tokens, and for each SAE whose rows are stored, each token's ``top``
        features (encoded live from the stored activations)."""
        ctx = self.ctx()
        if not 0 <= sample < len(ctx.first_row):
            raise NotFoundError(
                f"sample {sample} is not in {self.store.url} (samples 0..{len(ctx.first_row) - 1})"
            )
        r0, n = int(ctx.first_row[sample]), int(ctx.n_tokens[sample])
        text = self.store.samples().filter(pl.col("sample") == sample)["text"][0]
        toks = [str(x) for x in ctx.tokens(np.arange(r0, r0 + n, dtype=np.int64))]
        saes = []
        from actstore.sae.files import sae_names

        for name in sae_names(self.store):
            cfg = self.sae_config(name)
            if cfg.tokenization and cfg.tokenization != ctx.key:
                continue
            try:
                feats = self._sample_features(name, r0, r0 + n, top)
            except (NotFoundError, ConfigError):
                continue  # its model or layer is not stored: nothing to show for it
            saes.append({"name": name, "label": ", ".join(cfg.source_labels()), "tokens": feats})
        return {
            "sample": sample,
            "id": str(ctx.sample_id[sample]),
            "text": text,
            "label": None if ctx.label[sample] is None else str(ctx.label[sample]),
            "first_row": r0,
            "tokens": toks,
            "saes": saes,
            "n_samples": len(ctx.first_row),
        }

    def _sample_features(self, name: str, r0: int, r1: int, top: int) -> list[list[list[float]]]:
        import torch

        from actstore.sae.files import load_sae
        from actstore.sae.model import check_fits

        net = self._cached(("sae", name), lambda: load_sae(self.store, name).eval())
        x = torch.from_numpy(check_fits(self.store, net.cfg, name)[r0:r1])  # (n_tokens, d_in)
        with torch.no_grad():
            h = net.encode(x)  # (n_tokens, d_sae)
            vals, idx = h.topk(min(top, h.shape[1]), dim=-1)
        return [
            [[int(i), round(float(v), 4)] for v, i in zip(vr, ir, strict=True) if v > 0]
            for vr, ir in zip(vals.tolist(), idx.tolist(), strict=True)
        ]


def to_json(obj: Any) -> str:
    """JSON for pages and the static export (numpy scalars as numbers)."""
    return json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o))
