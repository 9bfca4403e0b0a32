"""``actstore dashboard``: an SAE's feature pages as a static folder (HTML + JSON, no server), for sharing or a paper.

The pages are the server's own templates rendered once with the same :class:`~actstore.browse.data.Browser`, so
they show the same numbers; links point at the folder's files (``index.html``, ``feature-N.html``), and each
feature's data is also written as ``data/feature-N.json``. Opened from ``file://`` they need nothing else: the
histogram is SVG, the shading CSS classes, and the script only adds hover panels.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from actstore.browse.app import HERE, Links, render, templates
from actstore.browse.config import DashboardConfig
from actstore.browse.data import Browser, PageSettings, to_json
from actstore.storage.files import write_file

if TYPE_CHECKING:
    from actstore.store.reader import Store


@dataclass
class DashboardResult:
    """What a dashboard export wrote."""

    out: str
    """The folder."""
    index: str
    """Its ``index.html``."""
    features: list[int]
    n_bytes: int
    seconds: float


def write_dashboard(store: Store, cfg: DashboardConfig) -> DashboardResult:
    """Write ``cfg.out``: ``index.html`` (the SAE's exported features), ``feature-N.html`` and
    ``data/feature-N.json`` per feature, ``static/`` (style and script)."""
    from actstore.storage.locks import output_lock

    with output_lock(cfg.out, f"dashboard of {cfg.sae} in {store.url}"):
        return _write(store, cfg)


def _write(store: Store, cfg: DashboardConfig) -> DashboardResult:
    t0 = time.perf_counter()
    browser = Browser(store, PageSettings(cfg.contexts, cfg.context, cfg.histogram_bins))
    table = browser.table(cfg.sae)  # NotFoundError unless encoded
    feats = cfg.feature_list()
    if feats is None:
        feats = browser.features_page(cfg.sae, sort="variance", limit=cfg.top)["rows"]
        feats = [int(r["feature"]) for r in feats]
    bad = [f for f in feats if f >= table.d_sae]
    if bad:
        from actstore.errors import ConfigError

        raise ConfigError(
            f"feature {bad[0]} is out of range for SAE {cfg.sae} ({table.d_sae} features)"
        )
    out = Path(cfg.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    shutil.copytree(HERE / "static", out / "static", dirs_exist_ok=True)
    env, links = templates(), Links(static=True)
    views = browser.view_names(cfg.sae)
    for f in feats:
        data = browser.feature_page(cfg.sae, f, 0)
        html = render(env, "feature.html", links, store_url=store.url, data=data, views=views)
        write_file(out / f"feature-{f}.html", html.encode("utf-8"))
        write_file(out / "data" / f"feature-{f}.json", to_json(data).encode("utf-8"))
    page = browser.features_page(cfg.sae, sort="variance", limit=table.d_sae)
    page["rows"] = [r for r in page["rows"] if int(r["feature"]) in set(feats)]
    page["total"] = len(page["rows"])
    write_file(
        out / "index.html",
        render(env, "sae.html", links, store_url=store.url, data=page, static=True).encode(),
    )
    n_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return DashboardResult(
        str(out), str(out / "index.html"), feats, n_bytes, time.perf_counter() - t0
    )
