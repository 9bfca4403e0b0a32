"""The report in a real browser (Debian's chromium, headless, driven by Playwright): nothing wider than the page,
token views wrap inside their own cells and never overlap (issue 11, item 3)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"
    ),
    pytest.mark.filterwarnings("ignore:Object at .* is not recognized"),
]

LAYOUT_JS = """() => {
  const doc = document.documentElement;
  const out = {scrollWidth: doc.scrollWidth, innerWidth: window.innerWidth, overlaps: [], escapes: [], views: 0};
  for (const table of document.querySelectorAll('table.tokview')) {
    out.views += 1;
    for (const row of table.querySelectorAll('tr')) {
      const cells = [...row.querySelectorAll('td.toks')];
      const boxes = cells.map(c => c.getBoundingClientRect());
      for (let i = 1; i < boxes.length; i++)
        if (boxes[i].left < boxes[i - 1].right - 0.5) out.overlaps.push([boxes[i - 1].right, boxes[i].left]);
      cells.forEach((c, i) => {
        for (const s of c.querySelectorAll('span.tok')) {
          const r = s.getBoundingClientRect();
          if (r.right > boxes[i].right + 0.5 || r.left < boxes[i].left - 0.5) out.escapes.push(s.textContent);
        }
      });
    }
  }
  return out;
}"""


@pytest.fixture(scope="module")
def report_page(tmp_path_factory, tiny_store_ro, tiny_bert_dir, corpus_file) -> Path:
    """A report of two models with token views side by side and wide tables."""
    import actstore
    from actstore.analysis.config import ReportConfig
    from actstore.data.corpora import DataConfig
    from actstore.encoding.config import EncodeConfig
    from actstore.encoding.encode import encode
    from actstore.paper.report import build_report
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    d = tmp_path_factory.mktemp("browser")
    path = d / "two.zarr"
    shutil.copytree(tiny_store_ro, path)
    extract(
        str(path),
        ExtractConfig(
            tiny_bert_dir, DataConfig(corpus_file), [2], name="tiny2", codec="fp32", device="cpu"
        ),
        progress=False,
    )
    st = actstore.open_store(str(path), writable=True)
    for model, seed in (("tiny", 0), ("tiny2", 1)):
        name = f"{model}-with-a-rather-long-sae-name-that-makes-the-tables-wide"
        train_sae(
            st,
            TrainConfig(
                model=model, layer=2, arch="topk", k=3, d_sae=48, tokens=2048, seed=seed, name=name
            ),
            progress=False,
        )
        encode(st, EncodeConfig(sae=name), progress=False)
    rep = build_report(
        st, ReportConfig(out=str(d / "report"), models=("tiny", "tiny2"), views=2, context=40)
    )
    return Path(rep.html)


@pytest.mark.parametrize("width", [1280, 1400])
def test_report_fits_the_page_and_token_views_do_not_overlap(report_page, width):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(report_page.as_uri())
            got = page.evaluate(LAYOUT_JS)
            similarity = page.evaluate(
                "() => { const i = document.querySelector(\"img[src='similarity.png']\"); "
                "return i ? [i.getBoundingClientRect().right, i.naturalWidth] : null; }"
            )
        finally:
            browser.close()
    assert got["views"] >= 1
    assert got["scrollWidth"] <= got["innerWidth"], (
        f"page scrolls horizontally: {got['scrollWidth']} > {got['innerWidth']}"
    )
    assert not got["overlaps"], got["overlaps"][:3]
    assert not got["escapes"], got["escapes"][:5]
    assert (
        similarity is not None and similarity[0] <= width and similarity[1] > 0
    )  # the figure is shown whole
