"""Token-level views (the paper's Figs 3-5): each token coloured by one SAE feature's activation.

One row per sentence, one column per (model, SAE, feature) view, e.g. the
pretrained model beside the fine-tuned one. Stored samples (by id) are read
from the store's activations; free texts are run through the model live (the
model is loaded from the path recorded when it was extracted). Output is an
HTML page (one ``<span class="tok">`` per token, activation in its ``title``)
or a PNG.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch

from actstore.analysis.config import ShowConfig
from actstore.errors import ConfigError, ModelError, NotFoundError
from actstore.sae.files import load_sae
from actstore.storage.files import save_figure, write_file

if TYPE_CHECKING:
    from actstore.sae.model import SAE
    from actstore.store.reader import Store


@dataclass
class View:
    """One column: a model read through one SAE feature."""

    model: str
    sae: str
    feature: int
    layer: int

    @property
    def title(self) -> str:
        return f"{self.model} · {self.sae} · feature {self.feature} (layer {self.layer})"


@dataclass
class TokenViews:
    """Tokens and feature activations of every sentence under every view."""

    views: list[View]
    sentences: list[str]
    """Row labels (sample id or the text)."""
    tokens: list[list[str]]
    """``tokens[s]``: the tokens of sentence s."""
    values: list[list[np.ndarray]]
    """``values[s][v]``: float32 ``(n_tokens,)`` activations of sentence s under view v."""

    def table(self) -> pl.DataFrame:
        """Long form: sentence, view, model, sae, feature, position, token, value."""
        rows = []
        for s, (label, toks) in enumerate(zip(self.sentences, self.tokens, strict=True)):
            for v, view in enumerate(self.views):
                for p, (t, x) in enumerate(zip(toks, self.values[s][v], strict=True)):
                    rows.append(
                        {
                            "sentence": label,
                            "view": v,
                            "model": view.model,
                            "sae": view.sae,
                            "feature": view.feature,
                            "position": p,
                            "token": t,
                            "value": float(x),
                        }
                    )
        return pl.DataFrame(rows)

    def scale(self) -> list[float]:
        """Colour scale per view: the largest activation of its (SAE, feature) over everything shown."""
        peak: dict[tuple[str, int], float] = {}
        for v, view in enumerate(self.views):
            m = max((float(np.max(vals[v])) if len(vals[v]) else 0.0) for vals in self.values)
            key = (view.sae, view.feature)
            peak[key] = max(peak.get(key, 0.0), m)
        return [peak[(v.sae, v.feature)] or 1.0 for v in self.views]


class _LiveModel:
    """A store model loaded from its recorded path, tapped at one layer."""

    def __init__(self, store: Store, model: str, device: str) -> None:
        from actstore.models.loading import load_model

        info = store.model_info(model)
        path = info.path or info.source
        if not path:
            raise ModelError(
                f"store {store.url} does not record where model {model!r} came from: cannot run texts live"
            )
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a fine-tuned checkpoint's dropped head is expected
        try:
            self.loaded = load_model(str(path), device)
        except ModelError as exc:
            raise ModelError(
                f"cannot load model {model!r} of {store.url} from {path} to run texts live: {exc}"
            ) from None
        finally:
            hf_logging.set_verbosity(verbosity)
        self.device = device
        self.max_length = int(
            store.model_tokenization(model).attrs.max_length or self.loaded.max_length
        )

    def run(self, text: str, layer: int) -> tuple[list[str], torch.Tensor]:
        """Tokens of ``text`` and its hidden states ``(n_tokens, d_model)`` at ``layer``."""
        from actstore.models.taps import LayerTap

        tok = self.loaded.tokenizer
        ids = tok(text, truncation=True, max_length=self.max_length)["input_ids"]
        x = torch.tensor([ids], device=self.device)
        hs = LayerTap(self.loaded, [layer])(x, torch.ones_like(x))[layer][0]
        return tok.convert_ids_to_tokens(ids), hs.float()


def _views(store: Store, cfg: ShowConfig) -> tuple[list[View], dict[str, SAE]]:
    saes = {name: load_sae(store, name) for name in dict.fromkeys(cfg.saes)}
    models = cfg.models
    views = []
    n = len(models) if models is not None else len(cfg.saes)
    for i in range(n):
        name = cfg.saes[i if len(cfg.saes) > 1 else 0]
        sae = saes[name]
        feat = (
            cfg.features[min(i, len(cfg.features) - 1)]
            if len(cfg.features) > 1
            else cfg.features[0]
        )
        if not 0 <= feat < sae.cfg.d_sae:
            raise ConfigError(
                f"feature {feat} is out of range for SAE {name} (d_sae {sae.cfg.d_sae})"
            )
        model = models[i] if models is not None else sae.cfg.model
        if model is None or sae.cfg.layer is None:
            raise ConfigError(f"SAE {name} does not record its model and layer: pass --models")
        if model not in store.models:
            raise NotFoundError(
                f"model {model!r} is not in store {store.url} (models: {', '.join(store.models)})"
            )
        views.append(View(model, name, int(feat), int(sae.cfg.layer)))
    return views, saes


@torch.no_grad()
def token_views(store: Store, cfg: ShowConfig) -> TokenViews:
    """Feature activations per token of every requested sentence and view."""
    views, saes = _views(store, cfg)
    sentences, tokens, values = [], [], []
    if cfg.sample_ids:
        samples = store.samples()
        found = samples.filter(pl.col("id").is_in(cfg.sample_ids))
        missing = sorted(set(cfg.sample_ids) - set(found["id"].to_list()))
        if missing:
            raise NotFoundError(
                f"sample id {missing[0]!r} is not in store {store.url}: check --sample-id (see the samples view)"
            )
        from actstore.query.lookups import token_context

        ctx = token_context(store)  # token strings from the Zarr token index: no tokens-table scan
        live: dict[str, _LiveModel] = {}
        for sid in cfg.sample_ids:
            s = found.filter(pl.col("id") == sid).row(0, named=True)
            r0, r1 = int(s["first_row"]), int(s["first_row"]) + int(s["n_tokens"])
            toks = ctx.tokens(np.arange(r0, r1, dtype=np.int64)).tolist()
            vals = []
            for v in views:
                sae = saes[v.sae]
                # one latent value per token, read from every source: see _crosscoder_view
                if sae.cfg.is_crosscoder:
                    vals.append(_crosscoder_view(store, sae, v, r0, r1))
                    continue
                if (
                    v.layer in store.layers(v.model)
                    and len(store.activations(v.model, v.layer)) >= r1
                ):
                    # (n_tokens, d_model)
                    x = torch.from_numpy(store.activations(v.model, v.layer)[r0:r1])
                else:
                    if v.model not in live:  # loaded once per model, however many samples
                        live[v.model] = _LiveModel(store, v.model, cfg.device)
                    _, x = live[v.model].run(str(s["text"]), v.layer)
                vals.append(sae.encode(x.to(sae.W_enc.device))[:, v.feature].float().cpu().numpy())
            sentences.append(sid)
            tokens.append(toks)
            values.append(vals)
    if cfg.texts:
        if any(saes[v.sae].cfg.is_crosscoder for v in views):
            raise ConfigError(
                "a crosscoder's views read stored samples (each of its models' rows): pass --sample-id"
            )
        live = {m: _LiveModel(store, m, cfg.device) for m in dict.fromkeys(v.model for v in views)}
        for text in cfg.texts:
            vals, toks = [], []
            for v in views:
                sae = saes[v.sae]
                toks, x = live[v.model].run(text, v.layer)
                vals.append(sae.encode(x.to(sae.W_enc.device))[:, v.feature].float().cpu().numpy())
            sentences.append(text)
            tokens.append(toks)
            values.append(vals)
    if cfg.max_tokens:
        tokens = [t[: cfg.max_tokens] for t in tokens]
        values = [[x[: cfg.max_tokens] for x in vs] for vs in values]
    return TokenViews(views, sentences, tokens, values)


def _crosscoder_view(store: Store, sae: SAE, v: View, r0: int, r1: int) -> np.ndarray:
    """A crosscoder latent on rows ``[r0, r1)`` as model ``v.model`` sees it: its activation (from every source's
    rows) times its decoder norm in that model's source, the size of what it writes there (0 where the model lacks
    it); the plain activation for a model that is not one of its sources."""
    from actstore.sae.model import check_fits

    # (n_tokens, n_sources * d_in)
    x = torch.from_numpy(check_fits(store, sae.cfg, str(sae.cfg.name))[r0:r1])
    f = sae.encode(x.to(sae.W_enc.device))[:, v.feature].float().cpu().numpy()
    hits = [
        i
        for i, (m, lay) in enumerate(zip(sae.cfg.models or [], sae.cfg.layers or [], strict=True))
        if m == v.model and int(lay) == v.layer
    ]
    if not hits:
        return f
    return f * float(sae.decoder_norms()[v.feature, hits[0]])


# ---------------------------------------------------------------- rendering
TOKVIEW_CSS = """
table.tokview { border-collapse: collapse; margin-bottom: 1.5em; width: 100%; table-layout: fixed; }
table.tokview th, table.tokview td { border: 1px solid #ddd; padding: 6px 8px; vertical-align: top; }
table.tokview th { background: #f6f6f6; font-weight: 600; font-size: 0.9em; overflow-wrap: anywhere; }
table.tokview th:first-child, td.label { width: 14em; }
td.label { font-size: 0.85em; color: #555; overflow-wrap: anywhere; }
td.toks { line-height: 1.9; overflow-wrap: anywhere; }
span.tok { padding: 1px 2px; border-radius: 3px; font-family: ui-monospace, monospace; font-size: 0.88em; }
"""
CSS = "body { font-family: system-ui, sans-serif; margin: 1.5em; }" + TOKVIEW_CSS
"""The stand-alone page's style: the token tables' (:data:`TOKVIEW_CSS`, which a report embeds) plus a body."""


def _rgba(x: float, peak: float) -> str:
    a = 0.0 if peak <= 0 else float(np.clip(x / peak, 0.0, 1.0))
    return f"rgba(220, 40, 30, {a:.3f})"


def render_html_fragment(tv: TokenViews, caption: str | None = None) -> str:
    """The token table alone (for embedding in a report)."""
    peaks = tv.scale()
    out = ['<table class="tokview">']
    if caption:
        out.append(f"<caption>{html.escape(caption)}</caption>")
    out.append(
        "<tr><th>sentence</th>"
        + "".join(f"<th>{html.escape(v.title)}</th>" for v in tv.views)
        + "</tr>"
    )
    for s, label in enumerate(tv.sentences):
        short = label if len(label) <= 80 else label[:77] + "..."
        cells = []
        for v in range(len(tv.views)):
            spans = " ".join(  # a space between tokens: the line may wrap there
                f'<span class="tok" style="background:{_rgba(float(x), peaks[v])}" title="{float(x):.4f}">{html.escape(t)}</span>'
                for t, x in zip(tv.tokens[s], tv.values[s][v], strict=True)
            )
            cells.append(f'<td class="toks">{spans}</td>')
        out.append(f'<tr><td class="label">{html.escape(short)}</td>' + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def render_html(tv: TokenViews, path: str, title: str = "actstore token view") -> str:
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head>"
        f"<body><h2>{html.escape(title)}</h2><p>Each token is shaded by the feature's activation (darker = stronger; "
        f"hover for the value). Scale: the largest activation of each SAE feature shown.</p>"
        f"{render_html_fragment(tv)}</body></html>"
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_file(path, page.encode("utf-8"))
    return path


def render_png(tv: TokenViews, path: str, title: str | None = None, width_chars: int = 70) -> str:
    """A PNG: one row per sentence, one panel per view, tokens on a red scale (monospace layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peaks = tv.scale()
    layouts = []  # per (sentence, view): list of (line, col, token, value)
    n_lines = []
    for s in range(len(tv.sentences)):
        row_lines = 1
        per_view = []
        for v in range(len(tv.views)):
            line, col, items = 0, 0, []
            for t, x in zip(tv.tokens[s], tv.values[s][v], strict=True):
                if col + len(t) > width_chars and col > 0:
                    line, col = line + 1, 0
                items.append((line, col, t, float(x)))
                col += len(t) + 1
            per_view.append(items)
            row_lines = max(row_lines, line + 1)
        layouts.append(per_view)
        n_lines.append(row_lines + 1)  # + a label line
    total = sum(n_lines)
    nv = len(tv.views)
    fig_w, line_h = 0.068 * width_chars * nv + 0.4, 0.24  # ~0.06 in per monospace character at 7 pt
    fig = plt.figure(figsize=(fig_w, line_h * total + 0.8))
    cmap = plt.get_cmap("Reds")
    y_top = 1.0 - 0.5 / (line_h * total + 0.8)
    dy = (y_top - 0.02) / max(total, 1)
    if title:
        fig.suptitle(title, fontsize=9)
    for v, view in enumerate(tv.views):
        fig.text(
            (v + 0.02) / nv, y_top + dy * 0.6, view.title, fontsize=8, weight="bold", va="bottom"
        )
    y = y_top
    for s, label in enumerate(tv.sentences):
        fig.text(
            0.005,
            y - dy * 0.5,
            (label if len(label) <= 100 else label[:97] + "...") + ":",
            fontsize=7,
            color="#555",
        )
        for v in range(nv):
            for line, col, t, x in layouts[s][v]:
                a = float(np.clip(x / peaks[v], 0, 1)) if peaks[v] > 0 else 0.0
                fig.text(
                    (v + 0.02) / nv + col / width_chars * (0.96 / nv),
                    y - dy * (line + 1.5),
                    t,
                    fontsize=7,
                    family="monospace",
                    bbox={"facecolor": cmap(a * 0.85), "edgecolor": "none", "pad": 0.8},
                    color="white" if a > 0.6 else "black",
                )
        y -= dy * n_lines[s]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def show(store: Store, cfg: ShowConfig, out: str) -> TokenViews:
    """Compute the token views and write them to ``out`` (``.html`` or ``.png``)."""
    suffix = Path(out).suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise ConfigError(f"--out {out}: name it .html or .png")
    tv = token_views(store, cfg)
    title = "feature activations per token"
    if suffix == ".png":
        render_png(tv, out, title)
    else:
        render_html(tv, out, title)
    return tv


def show_summary(tv: TokenViews) -> list[dict[str, Any]]:
    """Per sentence and view: the token where the feature fires most, and its value."""
    out = []
    for s, label in enumerate(tv.sentences):
        for v, view in enumerate(tv.views):
            vals = tv.values[s][v]
            i = int(np.argmax(vals)) if len(vals) else 0
            out.append(
                {
                    "sentence": label,
                    "model": view.model,
                    "sae": view.sae,
                    "feature": view.feature,
                    "max": float(vals[i]) if len(vals) else 0.0,
                    "at": tv.tokens[s][i] if len(vals) else "",
                }
            )
    return out


def steer_lines(
    store: Store, views: list[View], texts: list[str], value: float, device: str
) -> list[str]:
    """``show --steer``: each text run with each view's feature clamped to ``value`` in the view's model, its
    prediction beside the unsteered one (:class:`actstore.effects.steer.Steerer`); a model without a head says so."""
    from actstore.effects.steer import Steerer

    out = []
    for v in views:
        try:
            steerer = Steerer(store, v.sae, v.model, device)
        except ConfigError as exc:
            out.append(f"{v.model} · {v.sae}[{v.feature}]: not steered ({exc})")
            continue
        for text in texts:
            label = text if len(text) <= 50 else text[:47] + "..."
            res = steerer.run(v.feature, value, text, tokens=5)
            out += [
                f"{label!r} · {v.model} · {v.sae}[{v.feature}] steered: {line}"
                for line in res.lines
            ]
    return out
