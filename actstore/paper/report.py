"""Report stage: one HTML page (plus PNGs and a Markdown summary) of everything a store says about the paper.

Sections, each present when the store has what it needs:

1. fine-tune reports -- for every model extracted from a directory that ``actstore finetune`` wrote
   (its ``report.json``): accuracy of the fine-tuned and of the pretrained encoder + fresh head,
   per-class F1, confusion matrices (the paper's Table 2);
2. layer-wise similarity of the two models -- mean-cosine, token-cosine, CKA (the paper's Fig 1);
3. SAE metrics -- held-out MSE, FVU, L0, dead fraction per SAE; FVU against tokens and L0 (training curves);
4. top features by variance per SAE with their top-activating tokens in context (the paper's
   Table 1) and token views of the best one, the SAE's own model beside the other (Figs 3-5);
5. feature diff -- retained / modified / lost / new between the two models' SAEs at each layer.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import polars as pl

from actstore.analysis.config import ReportConfig
from actstore.clock import now
from actstore.paper.sections import (
    confusion_table,
    diff_section,
    effects_pairs,
    effects_section,
    features_section,
    finetune_section,
    per_class_table,
    plot_curves,
    plot_diff,
    sae_curves,
    sae_metrics_table,
    sae_pairs,
)
from actstore.sae.files import dense_notes, sae_names
from actstore.storage.files import write_file

if TYPE_CHECKING:
    from actstore.store.reader import Store


@dataclass
class ReportResult:
    """Where the report went and what it found."""

    html: str
    markdown: str
    pngs: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Sections skipped and why."""
    data: dict[str, Any] = field(default_factory=dict)
    """The numbers shown (also written as report.json)."""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "" if np.isnan(x) else f"{x:.4f}"
    return "" if x is None else str(x)


def _html_table(df: pl.DataFrame, max_rows: int = 200) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_esc(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in df.head(max_rows).iter_rows()
    )
    return f'<div class="scroll"><table class="data"><tr>{head}</tr>{body}</table></div>'


def _md_table(df: pl.DataFrame, max_rows: int = 60) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for row in df.head(max_rows).iter_rows():
        lines.append(
            "| " + " | ".join(_fmt(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- page
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; box-sizing: border-box;
       color: #222; }
.scroll { overflow-x: auto; max-width: 100%; }
img { max-width: 100%; height: auto; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table.data { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
table.data th { background: #f4f4f4; }
.note { color: #8a5a00; background: #fff6e0; padding: .4em .8em; border-radius: 4px; }
pre { background: #f7f7f7; padding: .6em; font-size: .85em; overflow-x: auto; }
"""


def build_report(store: Store, cfg: ReportConfig, progress: bool = False) -> ReportResult:
    """Write ``index.html``, ``summary.md``, PNGs and ``report.json`` into ``cfg.out`` (one writer per folder)."""
    from actstore.storage.locks import output_lock

    with output_lock(cfg.out, f"report of {store.url}"):
        return _build_report(store, cfg, progress)


class Part(NamedTuple):
    """One section of the report: its data (kept in report.json), its HTML and Markdown, and what it made."""

    key: str
    """Section name in ``ReportResult.sections`` (and, with ``-`` as ``_``, its key in report.json)."""
    data: Any
    html: list[str]
    md: list[str]
    notes: list[str] = []
    pngs: list[str] = []


def _build_report(store: Store, cfg: ReportConfig, progress: bool = False) -> ReportResult:
    from actstore.query.info import store_info

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    res = ReportResult(html=str(out / "index.html"), markdown=str(out / "summary.md"))
    intro_html, intro_md = _intro(store, store_info(store))
    h, md = [intro_html], [f"# actstore report: {store.url}", "", intro_md, ""]

    ft, reps, ft_notes = _finetune_part(store)
    models = _models_to_compare(store, cfg, reps)
    parts: list[Part | None] = [
        ft,
        _similarity_part(store, cfg, models, out, progress),
        _sae_metrics_part(store, out),
        _features_part(store, cfg, models, out),
        _diff_part(store, cfg, models, out),
        effects_part(store, models),
        _crosscoder_part(store),
    ]
    res.notes += ft_notes
    if models is None:
        res.notes.append(
            f"the store holds {len(store.models)} models: pass --models A,B for the similarity section"
        )
    for part in parts:
        if part is None:
            continue
        res.notes += part.notes
        if part.data is None:
            continue
        res.sections.append(part.key)
        res.data[part.key.replace("-", "_")] = part.data
        res.pngs += part.pngs
        h += part.html
        md += part.md
    if res.notes:
        h.append("<h2>Notes</h2>" + "".join(f"<p class='note'>{_esc(n)}</p>" for n in res.notes))
        md += ["## Notes", "", *[f"- {n}" for n in res.notes], ""]
    write_file(res.html, _page(h).encode("utf-8"))
    write_file(res.markdown, ("\n".join(md) + "\n").encode("utf-8"))
    write_file(out / "report.json", json.dumps(res.data, indent=2, default=str).encode())
    return res


def _page(body: list[str]) -> str:
    from actstore.analysis.show import TOKVIEW_CSS

    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>actstore report</title><style>{CSS}{TOKVIEW_CSS}"
        f"</style></head><body><h1>actstore report</h1>{''.join(body)}<p style='color:#888'>made {now()} by actstore "
        "report</p></body></html>"
    )


def _intro(store: Store, info: dict[str, Any]) -> tuple[str, str]:
    """One sentence on what the store holds, as HTML (every string from the store escaped) and Markdown."""
    tok = next(iter(info["tokenizations"].values()), {})
    data = tok.get("data") if isinstance(tok.get("data"), dict) else {}
    facts = (
        tok.get("n_samples"),
        tok.get("n_tokens"),
        tok.get("max_length"),
        data.get("source"),
        ", ".join(store.models) or "none",
        len(sae_names(store)),
    )
    intro = "Store {}: {} samples, {} tokens (max length {}) from {}; models: {}; SAEs: {}."
    # every string read from the store is escaped: a model key or attribute may hold markup
    html_ = (
        "<p>"
        + intro.format(
            f"<code>{_esc(store.url)}</code>",
            *map(_esc, facts[:3]),
            f"<code>{_esc(facts[3])}</code>",
            *map(_esc, facts[4:]),
        )
        + "</p>"
    )
    return html_, intro.format(f"`{store.url}`", *facts[:3], f"`{facts[3]}`", *facts[4:])


def _models_to_compare(
    store: Store, cfg: ReportConfig, reps: list[dict[str, Any]]
) -> tuple[str, str] | None:
    """``--models``, else the store's two models with the pretrained one (not made by a fine-tune) first."""
    if cfg.models is not None or len(store.models) != 2:
        return cfg.models
    models = (store.models[0], store.models[1])
    return (models[1], models[0]) if models[0] in {r["model"] for r in reps} else models


def _finetune_part(store: Store) -> tuple[Part | None, list[dict[str, Any]], list[str]]:
    """1. The fine-tune reports (paper Table 2); also returns the reports, which say which model is fine-tuned."""
    ft, reps = finetune_section(store)
    if ft is None:
        return (
            None,
            reps,
            [
                "no model of this store was extracted from an actstore finetune directory: no fine-tune report"
            ],
        )
    h = [
        "<h2>1. Fine-tuning (paper Table 2)</h2>",
        "<p>Test-split accuracy of the fine-tuned model and of the untouched pretrained encoder with the same freshly "
        "initialised head (the paper's 'pre-trained' column).</p>" + _html_table(ft),
    ]
    for rep in reps:
        hist = pl.DataFrame(
            rep.get("history") or [{"epoch": 0, "train_loss": None, "val_accuracy": None}]
        )
        h += [
            f"<h3>{_esc(rep['model'])}: per class</h3>" + _html_table(per_class_table(rep)),
            "<p>Confusion matrix, fine-tuned (rows: true):</p>"
            + _html_table(confusion_table(rep, "finetuned")),
            "<p>Confusion matrix, pretrained + fresh head:</p>"
            + _html_table(confusion_table(rep, "pretrained")),
            "<p>Training history:</p>" + _html_table(hist),
        ]
    md = ["## 1. Fine-tuning (paper Table 2)", "", _md_table(ft), ""]
    return Part("finetune", ft.to_dicts(), h, md), reps, []


def _similarity_part(
    store: Store, cfg: ReportConfig, models: tuple[str, str] | None, out: Path, progress: bool
) -> Part | None:
    """2. Layer-wise similarity of the two models (paper Fig 1)."""
    from actstore.analysis.compare import compare, plot_similarity, wide
    from actstore.analysis.config import CompareConfig

    if models is None:
        return None
    cmp = compare(
        store,
        CompareConfig(models=models, cka_rows=cfg.cka_rows),
        label=f"{models[0]} vs {models[1]}",
        progress=progress,
    )
    png = plot_similarity(
        cmp.table, str(out / "similarity.png"), title=f"{models[0]} vs {models[1]}"
    )
    w = wide(cmp.table).drop("label", "model_a", "model_b")
    h = [
        "<h2>2. Layer-wise similarity (paper Fig 1)</h2>",
        f"<p>{_esc(models[0])} vs {_esc(models[1])} over {cmp.n_rows:d} row-aligned tokens. mean-cosine is the paper's "
        "metric (cosine of the mean activation vectors); token-cosine averages per-token cosines; CKA is linear CKA "
        "on token rows.</p><img src='similarity.png'>" + _html_table(w),
    ]
    md = [
        "## 2. Layer-wise similarity (paper Fig 1)",
        "",
        "![similarity](similarity.png)",
        "",
        _md_table(w),
        "",
    ]
    return Part("similarity", w.to_dicts(), h, md, pngs=[png])


def _sae_metrics_part(store: Store, out: Path) -> Part | None:
    """3. Every SAE's held-out metrics and training curves, with a note for each dense one."""
    sm = sae_metrics_table(store)
    if sm is None:
        return None
    h = [
        "<h2>3. SAE metrics</h2><p>Held-out metrics from training: MSE, fraction of variance unexplained (FVU), "
        "mean active features per token (L0) and dead fraction: <em>dead</em>, the features that never fire on the "
        "held-out tokens; <em>dead_store</em>, those that never fire on any token of the store (counted by encode; "
        "empty for SAEs not encoded).</p>" + _html_table(sm)
    ]
    md = ["## 3. SAE metrics", "", _md_table(sm), ""]
    curves = sae_curves(store)
    pngs = []
    if curves:
        pngs.append(plot_curves(curves, str(out / "sae_curves.png")))
        h.append(
            "<p>Training curves: held-out FVU against training tokens (a run that converged flattens out) and "
            "against L0 (lower and further left is better).</p><img src='sae_curves.png'>"
        )
        md += ["![SAE training curves](sae_curves.png)", ""]
    notes = dense_notes(sm)
    for note in notes:
        h.append(f"<p class='note'>{_esc(note)}</p>")
        md += [f"> {note}", ""]
    data = [{**row, "curves": curves.get(row["name"])} for row in sm.to_dicts()]
    return Part("sae-metrics", data, h, md, notes=notes, pngs=pngs)


def _feature_pages(store: Store, sae: str, features: list[int], out: Path) -> str:
    """The dashboard pages of ``features`` under ``out/feature-pages/<sae>/`` and the HTML line linking them."""
    from actstore.browse.config import DashboardConfig
    from actstore.browse.dashboard import write_dashboard

    write_dashboard(
        store,
        DashboardConfig(
            sae=sae, out=str(out / "feature-pages" / sae), features=",".join(map(str, features))
        ),
    )
    links = " · ".join(
        f"<a href='feature-pages/{_esc(sae)}/feature-{int(f)}.html'>feature {int(f)}</a>"
        for f in features
    )
    return (
        f"<p class='note'>Feature pages (histogram, contexts, labels, the other model): {links}</p>"
    )


def _features_part(
    store: Store, cfg: ReportConfig, models: tuple[str, str] | None, out: Path
) -> Part:
    """4. Top features by variance with their top tokens and token views (paper Table 1, Figs 3-5)."""
    feats, notes = features_section(store, cfg, models)
    if not feats:
        return Part("features", None, [], [], notes=notes)
    h = [
        "<h2>4. Top features by variance (paper Table 1, Figs 3-5)</h2><p>For each SAE, the features with the largest "
        "activation variance over all tokens, with their top-activating tokens (the token in [[ ]]). Below each SAE, "
        "token views of its best feature on its top samples: the SAE's own model beside the other model read through "
        "the same SAE.</p>"
    ]
    md = ["## 4. Top features by variance (paper Table 1)", ""]
    for e in feats:
        h.append(f"<h3>{_esc(e['sae'])} ({_esc(e['model'])}, layer {_esc(e['layer'])})</h3>")
        md += [f"### {e['sae']} ({e['model']}, layer {e['layer']})", ""]
        rows = []
        for f in e["features"]:
            toks = ", ".join(dict.fromkeys(t["token"] for t in f["top_tokens"]))
            ctx = f["top_tokens"][0]["context"] if f["top_tokens"] else ""
            rows.append(
                {
                    "feature": f["feature"],
                    "variance": f["variance"],
                    "frequency": f["frequency"],
                    "top tokens": toks,
                    "best context": ctx,
                }
            )
        t = pl.DataFrame(rows) if rows else pl.DataFrame()
        pages = (
            _feature_pages(store, e["sae"], [int(f["feature"]) for f in e["features"]], out)
            if cfg.dashboard and rows
            else ""
        )
        h.append(_html_table(t) + pages + e["views_html"])
        md += [_md_table(t), ""]
    data = [{k: v for k, v in e.items() if k != "views_html"} for e in feats]
    return Part("features", data, h, md, notes=notes)


def _diff_part(
    store: Store, cfg: ReportConfig, models: tuple[str, str] | None, out: Path
) -> Part | None:
    """5. Feature diff of the two models' SAEs at each layer that has one for both."""
    if models is None:
        return None
    pairs = sae_pairs(store, models)
    df = diff_section(store, pairs, cfg) if pairs else None
    if df is None:
        return Part(
            "feature-diff",
            None,
            [],
            [],
            notes=["no layer has an SAE for both models: no feature diff"],
        )
    png = plot_diff(df, str(out / "feature_diff.png"))
    h = [
        "<h2>5. Feature diff, pretrained vs fine-tuned</h2><p>Features of the two models' SAEs at the same layer "
        "matched by decoder cosine and activation correlation on the shared tokens: retained (both >= 0.7), "
        "modified (either >= 0.4), lost (features of A with no counterpart) and new (features of B with none). "
        f'Query the details with <code>actstore sql {_esc(store.url)} "SELECT * FROM feature_diff"</code>.</p>'
        "<img src='feature_diff.png'>" + _html_table(df)
    ]
    md = ["## 5. Feature diff", "", "![feature diff](feature_diff.png)", "", _md_table(df), ""]
    return Part("feature-diff", df.to_dicts(), h, md, pngs=[png])


def effects_part(store: Store, models: tuple[str, str] | None) -> Part | None:
    """6. What the fine-tuned model's decision depends on (saved ``actstore effects``), beside the pretrained SAE's
    matched features."""
    if models is None:
        return None
    pairs = effects_pairs(store, models)
    df = effects_section(store, pairs, models[1]) if pairs else None
    if df is None:
        return Part("effects", None, [], [], notes=[
            f"no saved effects on {models[1]}: run actstore effects {store.url} --sae NAME (and --sae A --model "
            f"{models[1]} for the pretrained SAE) for the decision's features"])  # fmt: skip
    h = [
        "<h2>6. What the decision depends on</h2><p>Per layer and class, the fine-tuned model's SAE features with "
        "the largest summed attribution to its decision (activation x gradient of the predicted class's "
        "log-probability, the SAE spliced into the fine-tuned model with its error added back), their top tokens, "
        "and the pretrained SAE's matched feature (feature diff, decoder match) with its own attribution to the same "
        "class when spliced into the fine-tuned model (empty: not computed). Query them with <code>actstore sql "
        f'{_esc(store.url)} "SELECT * FROM feature_effects"</code>; docs/EFFECTS.md.</p>'
        + _html_table(df)
    ]
    md = ["## 6. What the decision depends on", "", _md_table(df), ""]
    return Part("effects", df.to_dicts(), h, md)


def _crosscoder_part(store: Store) -> Part | None:
    """6. Crosscoders: each latent shared / changed / A-only / B-only (diff-crosscoder), beside the feature diff."""
    from actstore.analysis.crosscoder_reads import crosscoder_summary

    df, notes = crosscoder_summary(store)
    if df is None:
        return Part("crosscoders", None, [], [], notes=notes) if notes else None
    h = [
        "<h2>7. Crosscoders, pretrained vs fine-tuned</h2><p>One dictionary trained on both models' activations of the "
        "same tokens, a decoder per model: each latent is shared, changed, A-only or B-only by its decoder norms "
        "(relative norm, Minder et al. 2025); <i>b-only exclusive</i> counts the B-only latents that Latent Scaling "
        "does not flag as present in A after all. Where the same layer has a feature diff of two SAEs (section 5), "
        "<i>b-only matched new</i> is the fraction of exclusive B-only latents whose closest SAE-B feature the feature "
        "diff calls new, and <i>shared matched retained</i> the same for shared latents and retained features: how far "
        f'the two methods agree. Query the latents with <code>actstore sql {_esc(store.url)} "SELECT * FROM '
        'crosscoder_latents"</code>.</p>' + _html_table(df)
    ]
    md = ["## 7. Crosscoders", "", _md_table(df), ""]
    from actstore.analysis.crosscoder import load_crosscoder_diff
    from actstore.analysis.crosscoder_reads import top_latents

    tops = {}
    for name in df["crosscoder"].to_list():
        res = load_crosscoder_diff(store, name)
        tl = top_latents(store, res, "b-only", n=5)
        what = f"B-only latents of {name} ({res.sources[1]} only)"
        if tl.height == 0:
            tl = top_latents(store, res, None, n=5)
            what = (
                f"{name}: no latent is B-only; the five leaning furthest towards {res.sources[1]}"
            )
        keep = tl.select(
            "latent", "class", "frequency", "rel_norm", "cosine", "nu_error", "top_tokens"
        )
        tops[name] = keep.to_dicts()
        h.append(f"<h3>{_esc(what)}</h3>" + _html_table(keep))
        md += [f"### {what}", "", _md_table(keep), ""]
    data = [{**row, "top_latents": tops.get(row["crosscoder"])} for row in df.to_dicts()]
    return Part("crosscoders", data, h, md, notes=notes)


def report(
    store_path: str,
    cfg: ReportConfig,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
    writable: bool = False,
) -> ReportResult:
    """Open the store (read-only unless ``writable``: then a computed feature diff is saved in it) and build the report."""
    from actstore.store.reader import open_store

    st = open_store(store_path, writable=writable, storage_options=storage_options)
    return build_report(st, cfg, progress=progress)
