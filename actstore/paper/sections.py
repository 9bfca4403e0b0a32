"""The report's sections as data: the fine-tune reports, SAE metrics and curves, top features with token views, the
feature diff (``actstore.paper.report`` lays them out as HTML and Markdown)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from actstore.analysis.config import ReportConfig
from actstore.format import layout
from actstore.sae.files import read_config, sae_names
from actstore.storage.files import save_figure

if TYPE_CHECKING:
    from actstore.store.reader import Store


def stored_finetune_report(store: Store, model: str) -> dict[str, Any] | None:
    """The fine-tune report extract copied into the store for ``model`` (``models/M/finetune_report.json``), or None.

    Only the store's own copy is read: never a file at a path the store names.
    """
    key = layout.finetune_report(model)
    if not store.loc.exists(key):
        return None
    try:
        rep = json.loads(store.loc.read_bytes(key))
        for side in ("pretrained", "finetuned"):
            float(rep[side]["accuracy"])
        if not isinstance(rep["labels"], list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return None
    return rep


def finetune_section(store: Store) -> tuple[pl.DataFrame | None, list[dict[str, Any]]]:
    """Accuracy table (one row per fine-tuned model) and the raw reports."""
    rows, reports = [], []
    for m in store.models:
        rep = stored_finetune_report(store, m)
        if not rep:
            continue
        reports.append({"model": m, **rep})
        rows.append(
            {
                "model": m,
                "labels": len(rep["labels"]),
                "train / val / test": f"{rep['n_train']} / {rep['n_val']} / {rep['n_test']}",
                "pretrained accuracy": rep["pretrained"]["accuracy"],
                "fine-tuned accuracy": rep["finetuned"]["accuracy"],
                "pretrained macro F1": rep["pretrained"]["macro_f1"],
                "fine-tuned macro F1": rep["finetuned"]["macro_f1"],
                "best epoch": rep["best_epoch"],
                "epochs run": len(rep.get("history", [])),
            }
        )
    return (pl.DataFrame(rows) if rows else None), reports


def per_class_table(rep: dict[str, Any]) -> pl.DataFrame:
    rows = []
    for lab in rep["labels"]:
        p, f = rep["pretrained"]["per_class"][lab], rep["finetuned"]["per_class"][lab]
        rows.append(
            {
                "label": lab,
                "support": f["support"],
                "pretrained F1": p["f1"],
                "fine-tuned precision": f["precision"],
                "fine-tuned recall": f["recall"],
                "fine-tuned F1": f["f1"],
            }
        )
    return pl.DataFrame(rows)


def confusion_table(rep: dict[str, Any], which: str) -> pl.DataFrame:
    labs = rep["labels"]
    conf = rep[which]["confusion"]
    return pl.DataFrame(
        {"true \\ predicted": labs, **{lab: [row[j] for row in conf] for j, lab in enumerate(labs)}}
    )


def sae_pairs(store: Store, models: tuple[str, str]) -> list[tuple[int, str, str]]:
    """``(layer, sae of model A, sae of model B)`` for every layer where each model has an SAE (first by name)."""
    by: dict[tuple[str, int], str] = {}
    for name in sorted(sae_names(store)):
        c = read_config(store, name)  # cfg.json only: no weights
        if c.model in models and c.layer is not None and not c.is_crosscoder:
            by.setdefault((c.model, int(c.layer)), name)
    layers = sorted({layer for (_, layer) in by})
    return [
        (layer, by[(models[0], layer)], by[(models[1], layer)])
        for layer in layers
        if (models[0], layer) in by and (models[1], layer) in by
    ]


def sae_metrics_table(store: Store) -> pl.DataFrame | None:
    from actstore.sae.files import list_saes

    df = list_saes(store)
    if df.height == 0:
        return None
    keep = [
        c
        for c in (
            "name",
            "model",
            "layer",
            "arch",
            "d_in",
            "d_sae",
            "l1",
            "tokens",
            "mse",
            "fvu",
            "l0",
            "l0_fraction",
            "dead",
            "dead_store",
            "dense_code",
            "probe_k1",
            "probe_k5",
            "probe_dense",
            "absorption",
        )
        if c in df.columns
    ]
    out = df.select(keep).sort(["layer", "model"])
    evals = ("probe_k1", "probe_k5", "probe_dense", "absorption")
    return out.drop([c for c in evals if c in out.columns and out[c].null_count() == out.height])


def _crop_views(tv: Any, center: int, context: int) -> Any:
    from actstore.analysis.show import TokenViews

    a = max(0, center - context)
    b = center + context + 1
    return TokenViews(
        tv.views,
        tv.sentences,
        [t[a:b] for t in tv.tokens],
        [[x[a:b] for x in vs] for vs in tv.values],
    )


def features_section(
    store: Store, cfg: ReportConfig, models: tuple[str, str] | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per encoded SAE: top features by variance, their top tokens, and token views (HTML fragments)."""
    from actstore.analysis.config import ShowConfig
    from actstore.analysis.show import render_html_fragment, token_views
    from actstore.encoding.table import encoded_saes
    from actstore.query.lookups import top_features, top_tokens

    out, notes = [], []
    encoded = set(encoded_saes(store))
    order = {m: i for i, m in enumerate(models or ())}
    # cfg.json only: no weights
    cfgs = {name: read_config(store, name) for name in sae_names(store)}
    for name in sorted(
        cfgs, key=lambda n: (cfgs[n].layer or 0, order.get(str(cfgs[n].model), 99), n)
    ):
        if name not in encoded:
            notes.append(
                f"SAE {name} is not encoded, so its top features are not shown: run actstore encode {store.url} --sae {name}"
            )
            continue
        sae_cfg = cfgs[name]
        tf = top_features(store, sae=name, by="variance", n=cfg.top_features)
        feats = []
        for f in tf.iter_rows(named=True):
            tt = top_tokens(store, int(f["feature"]), sae=name, n=cfg.top_tokens, context=6)
            feats.append(
                {
                    **f,
                    "top_tokens": tt.select("value", "token", "id", "label", "context").to_dicts(),
                }
            )
        entry: dict[str, Any] = {
            "sae": name,
            "model": sae_cfg.model,
            "layer": sae_cfg.layer,
            "features": feats,
            "views_html": "",
        }
        if feats and cfg.views:
            best = feats[0]
            other = [
                m for m in (models or ()) if m != sae_cfg.model and sae_cfg.layer in store.layers(m)
            ]
            vmodels = [str(sae_cfg.model), *other]
            frags = []
            for hit in best["top_tokens"][: cfg.views]:
                tv = token_views(
                    store,
                    ShowConfig(
                        saes=[name],
                        features=[int(best["feature"])],
                        sample_ids=[hit["id"]],
                        models=vmodels,
                    ),
                )
                center = int(np.argmax(tv.values[0][0]))
                frags.append(render_html_fragment(_crop_views(tv, center, cfg.context)))
            entry["views_html"] = "\n".join(frags)
        out.append(entry)
    return out, notes


def diff_section(
    store: Store, pairs: list[tuple[int, str, str]], cfg: ReportConfig
) -> pl.DataFrame | None:
    from actstore.analysis.config import DiffConfig
    from actstore.analysis.diff import diff_features, diff_names, load_diff

    rows = []
    for layer, a, b in pairs:
        name = f"{a}__{b}"
        if name in diff_names(store):
            res = load_diff(store, name)
        else:
            res = diff_features(store, DiffConfig(a, b, rows=cfg.diff_rows), save=store.writable)
        c = res.counts
        rows.append(
            {
                "layer": layer,
                "sae A": a,
                "sae B": b,
                "retained": c["a"]["retained"],
                "modified (A)": c["a"]["modified"],
                "lost": c["a"]["lost"],
                "modified (B)": c["b"]["modified"],
                "new": c["b"]["new"],
            }
        )
    return pl.DataFrame(rows) if rows else None


def plot_diff(df: pl.DataFrame, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    x = np.arange(df.height)
    bottom = np.zeros(df.height)
    for col, colour in (("retained", "#4c72b0"), ("modified (A)", "#dd8452"), ("lost", "#c44e52")):
        v = df[col].to_numpy().astype(float)
        ax.bar(x, v, bottom=bottom, label=col, color=colour)
        bottom += v
    ax.set_xticks(x, [str(v) for v in df["layer"].to_list()])
    ax.set_xlabel("layer")
    ax.set_ylabel("features of the pretrained SAE")
    ax.set_title("feature diff, pretrained -> fine-tuned")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def sae_curves(store: Store) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Each SAE's training curves (``metrics.json``'s ``curves``, or rebuilt from the history of older runs)."""
    from actstore.sae.files import read_metrics
    from actstore.sae.metrics import training_curves

    out = {}
    for name in sae_names(store):
        m = read_metrics(store, name)
        curves = m.get("curves") or training_curves(m.get("history") or [])
        if curves["eval"]["tokens"] or curves["train"]["tokens"]:
            out[name] = curves
    return out


def plot_curves(curves: dict[str, dict[str, dict[str, list[float]]]], path: str) -> str:
    """Held-out FVU against tokens (did it converge?) and against L0 (where on the sparsity frontier), per SAE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (name, c) in enumerate(sorted(curves.items())):
        colour = f"C{i % 10}"
        ev, tr = c["eval"], c["train"]
        if tr["tokens"]:
            ax1.plot(tr["tokens"], tr["fvu"], color=colour, alpha=0.35, lw=1)
        if ev["tokens"]:
            ax1.plot(ev["tokens"], ev["fvu"], "o-", color=colour, ms=3, label=name)
            ax2.plot(ev["l0"], ev["fvu"], "-", color=colour, alpha=0.35)
            ax2.plot(ev["l0"][-1:], ev["fvu"][-1:], "o", color=colour, label=name)
    ax1.set_xlabel("training tokens")
    ax1.set_ylabel("FVU (held-out: dots; training: faint)")
    ax1.set_title("FVU vs tokens")
    ax2.set_xlabel("L0 (active features per token)")
    ax2.set_xscale("log")
    ax2.set_ylabel("held-out FVU")
    ax2.set_title("FVU vs L0 (final: dot)")
    for ax in (ax1, ax2):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles, labels = ax1.get_legend_handles_labels()
    if handles:
        fig.legend(
            handles, labels, fontsize=7, loc="lower center", ncol=min(4, len(labels)), frameon=False
        )
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 4), 1, 1))
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def effects_pairs(store: Store, models: tuple[str, str]) -> list[tuple[int, str | None, str]]:
    """``(layer, SAE of model A or None, SAE of model B)`` for every SAE of model B with effects on model B: A's SAE
    is the one of the same layer whose feature diff with it is saved (else the first with effects on B)."""
    from actstore.analysis.diff import diff_names
    from actstore.query.views import sql

    have = sql(
        store, "SELECT DISTINCT sae, layer FROM feature_effects WHERE model = $m", {"m": models[1]}
    )
    on_b = {(str(n), int(layer)) for n, layer in have.iter_rows()}
    cfgs = {name: read_config(store, name) for name in sorted(sae_names(store))}
    diffs = set(diff_names(store))
    out = []
    for name, layer in sorted(on_b, key=lambda t: (t[1], t[0])):
        if cfgs[name].model != models[1]:
            continue
        cands = [
            a
            for a, c in cfgs.items()
            if c.model == models[0] and c.layer == layer and not c.is_crosscoder
        ]
        pick = [a for a in cands if f"{a}__{name}" in diffs] or [
            a for a in cands if (a, layer) in on_b
        ]
        out.append((layer, pick[0] if pick else None, name))
    return out


def effects_section(
    store: Store, pairs: list[tuple[int, str | None, str]], model: str, per_class: int = 3
) -> pl.DataFrame | None:
    """The causal counterpart of the paper's Table 1: at each layer with an SAE of both models, each class's
    ``per_class`` features of the fine-tuned model's SAE with the largest summed attribution to the fine-tuned
    model's decision (``actstore effects``), their top tokens, and the pretrained SAE's matched feature (the
    feature diff's decoder match) with its own summed attribution to the same class when that SAE is spliced into
    the fine-tuned model (``actstore effects --sae A --model B``). None when no effects were saved."""
    from actstore.errors import NotFoundError
    from actstore.query.lookups import top_tokens
    from actstore.query.views import sql

    q = ("SELECT class, feature, sum(attribution) AS attribution, count(*) AS n_samples FROM feature_effects "
         "WHERE sae = $sae AND model = $model GROUP BY class, feature")  # fmt: skip
    rows = []
    for layer, a, b in pairs:
        fx = sql(store, q, {"sae": b, "model": model})
        if fx.height == 0:
            continue
        fa = sql(store, q, {"sae": a or "", "model": model})
        pre = {(c, int(f)): float(v) for c, f, v, _ in fa.iter_rows()}
        match = {
            int(f): (int(m), float(cos), str(status))
            for f, m, cos, status in sql(
                store,
                "SELECT feature, match_decoder, decoder_cos, status FROM feature_diff WHERE diff = $d AND side = 'b'",
                {"d": f"{a}__{b}"},
            ).iter_rows()
        }
        for cls in sorted(set(fx["class"].to_list())):
            top = fx.filter(pl.col("class") == cls).sort(
                ["attribution", "feature"], descending=[True, False]
            )
            for rank, (_, f, v, n) in enumerate(top.head(per_class).iter_rows(), 1):
                try:
                    # the three most active distinct tokens
                    toks = list(
                        dict.fromkeys(top_tokens(store, int(f), sae=b, n=20, context=0)["token"])
                    )[:3]
                except NotFoundError:  # not encoded: no top tokens
                    toks = []
                m = match.get(int(f))
                rows.append({
                    "layer": layer, "class": cls, "rank": rank, "feature": int(f), "attribution": v, "samples": n,
                    "top tokens": ", ".join(map(str, toks)), "diff": m[2] if m else None,
                    "pretrained feature": m[0] if m else None, "decoder cos": m[1] if m else None,
                    "pretrained attribution": pre.get((cls, m[0])) if m else None,
                })  # fmt: skip
    return pl.DataFrame(rows) if rows else None
