"""The feature browser: ``actstore serve`` pages and the SQL console (Starlette's TestClient), a hostile store,
the static ``dashboard``; the same in a real browser in tests/test_browse_browser.py."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import actstore
from actstore.browse.app import create_app
from actstore.browse.config import DashboardConfig, ServeConfig
from actstore.browse.console import QueryRefused, run_console
from actstore.browse.dashboard import write_dashboard
from actstore.cli import main
from actstore.errors import ConfigError

XSS = [
    "<script>window.__pwned = 1</script> a review with a script tag",
    '"><img src=x onerror="window.__pwned=2"> an attribute breakout',
    "</textarea><svg onload=window.__pwned=3> and more text for tokens",
]

FORBIDDEN = [
    ("ATTACH '/tmp/x.duckdb' AS x", "only SELECT"),
    ("INSTALL httpfs", "only SELECT"),
    ("LOAD httpfs", "only SELECT"),
    ("SET threads = 1", "only SELECT"),
    ("PRAGMA version", "only SELECT"),
    ("COPY (SELECT 1) TO '/tmp/actstore-evil.csv'", "only SELECT"),
    ("CREATE TABLE t AS SELECT 1", "only SELECT"),
    ("SELECT 1; SELECT 2", "one statement"),
    ("SELECT * FROM read_text('/etc/passwd')", ""),
    ("SELECT * FROM read_csv('/etc/hostname')", ""),
]


def hostile_corpus(tmp: Path) -> str:
    rows = [
        {"id": f"x{i}", "text": t, "label": ["pos", "neg", "<b>bold</b>"][i]}
        for i, t in enumerate(XSS)
    ]
    words = [("great", "moved"), ("dull", "sagged"), ("fine", "worked"), ("bad", "failed")] * 6
    rows += [
        {
            "id": f"s{i}",
            "text": f"the film was {w} and the plot {v}",
            "label": "pos" if i % 2 else "neg",
        }
        for i, (w, v) in enumerate(words)
    ]
    path = tmp / "hostile.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def browse_store(tmp_path_factory, tiny_bert_dir) -> str:
    """A store of the tiny BERT and a second model on a corpus with hostile texts and labels, an encoded topk SAE."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from actstore.data.corpora import DataConfig
    from actstore.encoding.config import EncodeConfig
    from actstore.encoding.encode import encode
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    tmp = tmp_path_factory.mktemp("browse")
    corpus = hostile_corpus(tmp)
    other = tmp / "other"
    torch.manual_seed(2)
    BertModel(BertConfig.from_pretrained(tiny_bert_dir)).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(other)
    path = str(tmp / "b.zarr")
    for model, name in ((tiny_bert_dir, "tiny"), (str(other), "other")):
        extract(
            path,
            ExtractConfig(
                model=model,
                name=name,
                data=DataConfig(corpus),
                layers="2",
                codec="fp32",
                batch_size=8,
                device="cpu",
            ),
            progress=False,
        )
    train_sae(
        path,
        TrainConfig(
            model="tiny",
            layer=2,
            arch="topk",
            k=4,
            d_sae=48,
            epochs=2,
            batch_size=64,
            device="cpu",
            name="s",
            task_samples=0,
        ),
        progress=False,
    )
    encode(
        actstore.open_store(path, writable=True),
        EncodeConfig(sae="s", device="cpu"),
        progress=False,
    )
    # a hostile folder name under saes/ (refused by name rules, so never listed or linked)
    bad = Path(path) / "saes" / '"><img src=x onerror=window.__pwned=4>'
    bad.mkdir()
    (bad / "cfg.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def client(browse_store):
    from starlette.testclient import TestClient

    return TestClient(
        base_url="http://127.0.0.1",
        app=create_app(actstore.open_store(browse_store), ServeConfig()),
    )


def test_serve_refuses_public_hosts_unless_asked(browse_store):
    with pytest.raises(ConfigError, match="--public"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", public=True).host == "0.0.0.0"
    r = CliRunner().invoke(main, ["serve", browse_store, "--host", "0.0.0.0"])
    assert r.exit_code != 0 and "--public" in r.output
    r = CliRunner().invoke(main, ["serve", browse_store + "-missing"])
    assert r.exit_code != 0 and "Error" in r.output
    with pytest.raises(ConfigError, match="read-only"):
        create_app(actstore.open_store(browse_store, writable=True))


def test_pages_answer_and_link(client, browse_store):
    r = client.get("/")
    assert r.status_code == 200 and "tiny" in r.text and 'href="/sae/s"' in r.text
    assert "onerror" not in r.text  # the hostile folder is not listed
    assert "script-src 'self'" in r.headers["content-security-policy"]
    r = client.get("/sae/s")
    assert r.status_code == 200 and 'href="/sae/s/feature/' in r.text
    st = actstore.open_store(browse_store)
    f = int(actstore.top_features(st, sae="s", n=1)["feature"][0])
    r = client.get(f"/sae/s/feature/{f}")
    assert r.status_code == 200
    tt = actstore.top_tokens(st, f, sae="s", n=20)
    got = [float(v) for v in re.findall(r'class="ctx" data-row="\d+" data-value="([^"]+)"', r.text)]
    np.testing.assert_allclose(got, tt["value"].to_numpy(), rtol=1e-6)
    rows = [int(v) for v in re.findall(r'class="ctx" data-row="(\d+)"', r.text)]
    assert rows == tt["row"].to_list()
    counts = json.loads(re.search(r"data-counts='([^']*)'", r.text).group(1))
    vals = actstore.sql(st, f"SELECT value FROM features WHERE sae = 's' AND feature = {f}")[
        "value"
    ].to_numpy()
    assert counts == np.histogram(vals, bins=40)[0].tolist() and sum(counts) == len(vals)
    assert "/sample/" in r.text
    r = client.get("/sample/0")
    assert r.status_code == 200 and "data-feats=" in r.text


def test_hostile_strings_are_text(client):
    for url in (
        "/",
        "/sae/s",
        "/sample/0",
        "/sample/1",
        "/sample/2",
        "/sql?q=SELECT+text,+label+FROM+samples",
    ):
        body = client.get(url).text
        assert (
            "<script>window" not in body and "<img src=x" not in body and "<svg onload" not in body
        ), url
        assert "<b>bold</b>" not in body
    body = client.get("/sample/0").text
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in body


def test_path_traversal_and_bad_params(client):
    for url in (
        "/sae/..%2F..%2Fetc",
        "/sae/../../etc/passwd",
        "/static/../app.py",
        "/static/..%2Fapp.py",
        "/sae/nope",
        "/sae/s/feature/99999",
        "/sample/99999",
        "/query/..%2Fviews",
    ):
        r = client.get(url)
        assert r.status_code in (400, 404), (url, r.status_code)
        assert "def create_app" not in r.text
    assert client.get("/sae/s?limit=abc").status_code == 400
    assert client.get("/sae/s?sort=evil").status_code == 400
    assert client.get("/", headers={"host": "evil.example"}).status_code == 400  # no DNS rebinding


@pytest.mark.parametrize(("q", "msg"), FORBIDDEN)
def test_console_refuses(client, browse_store, q, msg):
    r = client.get("/sql", params={"q": q})
    assert r.status_code == 400 and 'id="error"' in r.text and msg in r.text
    with pytest.raises(QueryRefused):
        run_console(actstore.open_store(browse_store), q)
    assert not Path("/tmp/actstore-evil.csv").exists()


def test_console_bounds_rows_and_time(browse_store):
    st = actstore.open_store(browse_store)
    res = run_console(st, "SELECT * FROM range(5000)", max_rows=100)
    assert len(res.rows) == 100 and res.truncated
    with pytest.raises(QueryRefused, match="ran past"):
        run_console(st, "SELECT count(*) FROM range(100000000000) a", timeout=0.3)
    from actstore.query.views import connect

    # the server's one connection: each query on its own cursor, the sandbox intact
    base = connect(st)
    with pytest.raises(QueryRefused, match="ran past"):
        run_console(st, "SELECT count(*) FROM range(100000000000) a", timeout=0.3, base=base)
    assert run_console(st, "SELECT 41 + 1 AS x", base=base).rows == [(42,)]
    for q, _ in FORBIDDEN:
        with pytest.raises(QueryRefused):
            run_console(st, q, base=base)
    with pytest.raises(QueryRefused):
        run_console(st, "SELECT * FROM read_text('/etc/passwd')", base=base)


def test_console_csv_and_named_queries(client, browse_store):
    r = client.get(
        "/sql.csv", params={"q": "SELECT sample, id FROM samples ORDER BY sample LIMIT 3"}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.text.splitlines()[0] == "sample,id" and len(r.text.splitlines()) == 4
    r = client.get("/query/top_tokens", params={"run": "1", "sae": "s", "feature": "0", "n": "3"})
    assert r.status_code == 200 and 'id="result"' in r.text


def test_console_on_a_store_opened_by_url(s3_server, browse_store):
    """The same refusals on a bucket: nothing outside the store is read, nothing written."""
    from starlette.testclient import TestClient

    from actstore.storage.config import CopyConfig
    from actstore.storage.copy import copy_store

    url = "s3://team/browse.zarr"
    assert copy_store(CopyConfig(browse_store, url)).ok
    c = TestClient(
        base_url="http://127.0.0.1", app=create_app(actstore.open_store(url), ServeConfig())
    )
    assert c.get("/").status_code == 200 and c.get("/sae/s").status_code == 200
    for q, msg in FORBIDDEN:
        r = c.get("/sql", params={"q": q})
        assert r.status_code == 400 and msg in r.text, q
    r = c.get("/sql", params={"q": "SELECT count(*) AS n FROM samples"})
    assert r.status_code == 200 and "<td>27</td>" in r.text


def test_dashboard_static_export(browse_store, tmp_path):
    st = actstore.open_store(browse_store)
    res = write_dashboard(st, DashboardConfig(sae="s", out=str(tmp_path / "dash"), top=5))
    assert len(res.features) == 5 and Path(res.index).exists()
    f = res.features[0]
    html = (tmp_path / "dash" / f"feature-{f}.html").read_text()
    data = json.loads((tmp_path / "dash" / "data" / f"feature-{f}.json").read_text())
    tt = actstore.top_tokens(st, f, sae="s", n=20)
    np.testing.assert_allclose(
        [c["value"] for c in data["contexts"]], tt["value"].to_numpy(), rtol=1e-6
    )
    assert 'href="static/style.css"' in html and "/sample/" not in html
    r = CliRunner().invoke(
        main,
        [
            "dashboard",
            browse_store,
            "--sae",
            "s",
            "--out",
            str(tmp_path / "d2"),
            "--features",
            "0,1",
        ],
    )
    assert r.exit_code == 0 and "2 feature pages" in r.output, r.output
    r = CliRunner().invoke(
        main, ["dashboard", browse_store, "--sae", "nope", "--out", str(tmp_path / "d3")]
    )
    assert r.exit_code != 0 and "not encoded" in r.output
    # the report links into its own copy of the feature pages
    from actstore.analysis.config import ReportConfig
    from actstore.paper.report import build_report

    rep = build_report(
        st, ReportConfig(out=str(tmp_path / "rep"), models=("tiny", "other"), top_features=2)
    )
    linked = re.findall(r"href='(feature-pages/s/feature-\d+\.html)'", Path(rep.html).read_text())
    assert len(linked) == 2 and all((tmp_path / "rep" / x).exists() for x in linked)


def test_search_by_token_and_label(client, browse_store):
    st = actstore.open_store(browse_store)
    r = client.get("/sae/s", params={"token": "great", "limit": "5000"})
    assert r.status_code == 200
    feats = [int(v) for v in re.findall(r'class="feature" href="/sae/s/feature/(\d+)"', r.text)]
    assert feats
    for f in feats[:5]:  # each fires on "great" among its top activations
        tops = actstore.sql(
            st,
            f"SELECT t.token FROM (SELECT row FROM features WHERE sae = 's' AND feature = {f} "
            "ORDER BY value DESC, row LIMIT 50) AS x JOIN tokens AS t USING (row)",
        )
        assert "great" in [t.lower() for t in tops["token"].to_list()]
    r = client.get("/sae/s", params={"label": "pos", "sort": "mean_diff"})
    got = [int(v) for v in re.findall(r'class="feature" href="/sae/s/feature/(\d+)"', r.text)][:5]
    want = actstore.top_features(st, sae="s", by="label-association", label="pos", n=5)[
        "feature"
    ].to_list()
    assert got == want


def test_other_model_view_equals_a_fresh_encode(client, browse_store):
    """The feature page shows the same tokens through the other model: the SAE applied to 'other''s stored rows."""
    import torch

    st = actstore.open_store(browse_store)
    f = int(actstore.top_features(st, sae="s", n=1)["feature"][0])
    r = client.get(f"/sae/s/feature/{f}")
    ctx = r.text[r.text.index('class="ctx"') :]
    ctx = ctx[: ctx.index('<div class="ctx"', 10)] if '<div class="ctx"' in ctx[10:] else ctx
    views = ctx.split('<div class="view">')[1:]
    assert [re.search(r'class="vname">([^<]+)<', v).group(1) for v in views] == ["tiny", "other"]
    rows = [int(x) for x in re.findall(r'data-row="(\d+)"', ctx)][:1]
    tt = actstore.top_tokens(st, f, sae="s", n=1)
    c = 8
    lo = max(int(tt["row"][0]) - c, int(tt["row"][0]) - int(tt["position"][0]))
    vals_other = [float(v) for v in re.findall(r'data-v="([^"]+)"', views[1])]
    sae = actstore.load_sae(st, "s")
    x = st.activations("other", 2).take(np.arange(lo, lo + len(vals_other)))
    with torch.no_grad():
        want = sae.encode(torch.from_numpy(x))[:, f].numpy()
    np.testing.assert_allclose(vals_other, want, rtol=1e-4, atol=1e-6)
    assert rows == [int(tt["row"][0])]


def test_similarity_and_crosscoder_pages(browse_store, tmp_path):
    import shutil as sh

    from starlette.testclient import TestClient

    from actstore.analysis.compare import compare
    from actstore.analysis.config import CompareConfig, CrosscoderDiffConfig
    from actstore.analysis.crosscoder import diff_crosscoder
    from actstore.encoding.config import EncodeConfig
    from actstore.encoding.encode import encode
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae

    path = str(tmp_path / "c.zarr")
    sh.copytree(browse_store, path)
    train_sae(
        path,
        TrainConfig(
            model="tiny",
            layer=2,
            models="tiny,other",
            arch="batchtopk",
            k=4,
            d_sae=48,
            epochs=2,
            batch_size=64,
            device="cpu",
            name="cc",
            task_samples=0,
        ),
        progress=False,
    )
    w = actstore.open_store(path, writable=True)
    encode(w, EncodeConfig(sae="cc", device="cpu"), progress=False)
    d = diff_crosscoder(w, CrosscoderDiffConfig(sae="cc", device="cpu"))
    st = actstore.open_store(path)
    c = TestClient(base_url="http://127.0.0.1", app=create_app(st, ServeConfig()))
    r = c.get("/")
    assert 'id="crosscoders"' in r.text and "tiny@2" in r.text
    f = int(actstore.top_features(st, sae="cc", n=1)["feature"][0])
    r = c.get(f"/sae/cc/feature/{f}")
    row = d.table.row(f, named=True)
    assert r.status_code == 200 and f"crosscoder latent: {row['class']}" in r.text
    assert "tiny@2 (x decoder norm)" in r.text and "other@2 (x decoder norm)" in r.text
    r = c.get("/similarity")
    res = compare(st, CompareConfig(models=("tiny", "other"), metrics=["mean-cosine"]))
    assert r.status_code == 200
    assert f"{float(res.table['value'][0]):.4g}" in r.text


# ---------------------------------------------------------------- in a real browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def served(browse_store):
    """``actstore serve`` of the hostile store on a free port, in a thread."""
    from actstore.browse.app import bind

    b = bind(browse_store, ServeConfig(port=0))
    t = threading.Thread(target=b.server.run, kwargs={"sockets": [b.sock]}, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not b.server.started and time.time() < deadline:
        time.sleep(0.05)
    yield b.url.rstrip("/")
    b.server.should_exit = True
    t.join(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        br = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield br
        br.close()


def _page(browser, dialogs: list):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    return page


WIDTH_JS = "() => [document.documentElement.scrollWidth, window.innerWidth]"


@needs_chromium
def test_browser_click_through(served, browser, browse_store):
    st = actstore.open_store(browse_store)
    dialogs: list = []
    page = _page(browser, dialogs)
    page.goto(served + "/")
    assert page.locator("h1").inner_text() == "Store"
    page.click("a.sae")
    page.wait_for_selector("#features")
    assert page.locator("#sae-name").inner_text() == "s"
    page.click("th a.sort:text-is('frequency')")  # sort by frequency, strongest first
    page.wait_for_selector("#features")
    freqs = [float(x) for x in page.locator("#features tbody tr td:nth-child(3)").all_inner_texts()]
    assert freqs == sorted(freqs, reverse=True)
    page.locator("a.feature").first.click()
    page.wait_for_selector("#contexts")
    f = int(page.locator("#feature-id").inner_text())
    tt = actstore.top_tokens(st, f, sae="s", n=20)
    shown = [
        float(v) for v in page.locator(".ctx").evaluate_all("els => els.map(e => e.dataset.value)")
    ]
    np.testing.assert_allclose(shown, tt["value"].to_numpy()[: len(shown)], rtol=1e-6)
    counts = json.loads(page.locator("#histogram").get_attribute("data-counts"))
    vals = actstore.sql(st, f"SELECT value FROM features WHERE sae = 's' AND feature = {f}")[
        "value"
    ].to_numpy()
    assert counts == np.histogram(vals, bins=40)[0].tolist()
    assert page.evaluate(WIDTH_JS)[0] <= 1280
    n_act = int(page.locator("#n-active").inner_text())
    if n_act > 20:  # more contexts load on scroll, in rank order
        page.locator("#more").scroll_into_view_if_needed()
        page.wait_for_function("() => document.querySelectorAll('.ctx').length > 20")
        ranks = page.locator(".ctx .meta").evaluate_all(
            "els => els.map(e => parseInt(e.textContent.slice(1)))"
        )
        assert ranks == list(range(1, len(ranks) + 1))
        more = [
            float(v)
            for v in page.locator(".ctx").evaluate_all("els => els.map(e => e.dataset.value)")
        ]
        np.testing.assert_allclose(
            more, actstore.top_tokens(st, f, sae="s", n=len(more))["value"].to_numpy(), rtol=1e-6
        )
    page.locator(".ctx .meta a").first.click()  # a token -> its sample
    page.wait_for_selector("#sample-id")
    assert page.locator("#sample-id").inner_text() == tt["id"][0]
    page.locator(".stok").nth(int(tt["position"][0])).hover()
    panel = page.locator(".feats").first
    assert "feature" in panel.inner_text()
    page.locator(".feats a.feat").first.click()  # a feature of that token -> its page
    page.wait_for_selector("#feature-id")
    page.go_back()
    page.wait_for_selector("#sample-id")
    page.go_back()
    page.wait_for_selector("#feature-id")
    assert int(page.locator("#feature-id").inner_text()) == f
    # a teammate's link: the same URL in a fresh page shows the same feature
    other = _page(browser, dialogs)
    other.goto(f"{served}/sae/s/feature/{f}")
    assert int(other.locator("#feature-id").inner_text()) == f
    assert not dialogs


@needs_chromium
def test_browser_sql_console_and_csv(served, browser):
    dialogs: list = []
    page = _page(browser, dialogs)
    page.goto(served + "/sql")
    page.fill("#q", "SELECT sample, id, label FROM samples ORDER BY sample LIMIT 5")
    page.click("#run")
    page.wait_for_selector("#result")
    assert page.locator("#result tbody tr").count() == 5
    with page.expect_download() as dl:
        page.click("#csv")
    text = Path(dl.value.path()).read_text()
    assert text.splitlines()[0] == "sample,id,label" and len(text.splitlines()) == 6
    for q, msg in FORBIDDEN:
        page.goto(served + "/sql")
        page.fill("#q", q)
        page.click("#run")
        page.wait_for_selector("#error")
        assert msg in page.locator("#error").inner_text(), q
    page.goto(served + "/sql")
    page.click("#named a:text-is('top_tokens')")
    page.fill("input[name=sae]", "s")
    page.fill("input[name=feature]", "0")
    page.click("#run")
    page.wait_for_selector("#result, #error")
    assert page.evaluate(WIDTH_JS)[0] <= 1280
    assert not dialogs


@needs_chromium
def test_browser_hostile_store_runs_nothing(served, browser):
    dialogs: list = []
    page = _page(browser, dialogs)
    errors: list = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    for url in (
        "/",
        "/sae/s",
        "/sample/0",
        "/sample/1",
        "/sample/2",
        "/sql?q=SELECT+text,+label+FROM+samples",
        "/sae/s/feature/0",
        "/similarity",
        "/sae/..%2F..%2Fetc%2Fpasswd",
        "/sample/0/..%2F..%2F",
    ):
        page.goto(served + url)
        assert page.evaluate("() => window.__pwned") is None, url
        scripts = page.locator("script").evaluate_all("els => els.map(e => e.getAttribute('src'))")
        assert scripts == ["/static/app.js"], (url, scripts)
        assert page.locator("img[onerror], svg[onload], [onerror], [onload]").count() == 0, url
        assert page.evaluate(WIDTH_JS)[0] <= 1280, url
    page.goto(served + "/sample/0")
    assert "<script>window.__pwned = 1</script>" in page.locator("#text").inner_text()
    assert not dialogs


@needs_chromium
def test_static_dashboard_from_file_url(browse_store, browser, tmp_path):
    st = actstore.open_store(browse_store)
    res = write_dashboard(st, DashboardConfig(sae="s", out=str(tmp_path / "dash"), top=3))
    dialogs: list = []
    page = _page(browser, dialogs)
    page.goto(Path(res.index).as_uri())
    assert page.locator("a.feature").count() == 3
    page.locator("a.feature").first.click()
    page.wait_for_selector("#feature-id")
    f = int(page.locator("#feature-id").inner_text())
    tt = actstore.top_tokens(st, f, sae="s", n=20)
    shown = [
        float(v) for v in page.locator(".ctx").evaluate_all("els => els.map(e => e.dataset.value)")
    ]
    np.testing.assert_allclose(shown, tt["value"].to_numpy(), rtol=1e-6)
    vals = actstore.sql(st, f"SELECT value FROM features WHERE sae = 's' AND feature = {f}")[
        "value"
    ].to_numpy()
    assert (
        json.loads(page.locator("#histogram").get_attribute("data-counts"))
        == np.histogram(vals, bins=40)[0].tolist()
    )
    # its CSS loaded
    assert page.evaluate("() => getComputedStyle(document.body).fontFamily").startswith("system-ui")
    assert (
        page.evaluate(WIDTH_JS)[0] <= 1280
        and page.evaluate("() => window.__pwned") is None
        and not dialogs
    )
