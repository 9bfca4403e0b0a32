"""The demo end to end on the tiny BERT and a small corpus; the report and its CLI."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from click.testing import CliRunner

import actstore
from actstore import open_store
from actstore.analysis.config import DemoConfig
from actstore.cli import main
from actstore.errors import ConfigError
from actstore.paper.demo import default_sae_layers, run_demo


def test_default_sae_layers_follow_the_paper() -> None:
    assert default_sae_layers(12) == [3, 6, 12]
    assert default_sae_layers(6) == [2, 3, 6]
    assert default_sae_layers(3) == [1, 3]
    with pytest.raises(ConfigError):
        DemoConfig(limit=5)


class DemoRun(NamedTuple):
    res: Any
    out: Path
    store: Any
    pre: str
    ft: str
    lines: list[str]
    page: str
    rep: dict[str, Any]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, tiny_bert_dir, corpus_file) -> DemoRun:
    """The demo run once on the tiny BERT and a small corpus; each test below checks one thing about it."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    cfg = DemoConfig(
        out=str(out),
        model=tiny_bert_dir,
        data=corpus_file,
        limit=40,
        epochs=1,
        lr=1e-3,
        max_length=32,
        sae_epochs=2,
        sae_batch_size=128,
        device="cpu",
    )
    lines: list[str] = []
    res = run_demo(cfg, progress=False, log=lines.append)
    rep = json.loads((out / "report" / "report.json").read_text())
    name = Path(tiny_bert_dir).name
    return DemoRun(
        res,
        out,
        open_store(res.store),
        name,
        f"{name}-ft",
        lines,
        Path(res.report_html).read_text(),
        rep,
    )


@pytest.mark.slow
def test_demo_extracts_every_layer_of_both_models(demo_run) -> None:
    st = demo_run.store
    assert sorted(st.models) == sorted([demo_run.pre, demo_run.ft])
    assert st.layers(demo_run.pre) == st.layers(demo_run.ft) == [0, 1, 2, 3]


@pytest.mark.slow
def test_demo_trains_sparse_topk_saes_and_the_papers_contrast(demo_run) -> None:
    from actstore.sae.files import list_saes

    saes = list_saes(demo_run.store)
    # layers 1 and 3, both models, topk; and the paper's relu-l1 for contrast
    assert saes.height == 5
    main_saes = saes.filter(saes["arch"] == "topk")
    assert main_saes.height == 4 and (main_saes["l0"] <= 0.05 * main_saes["d_sae"]).all()
    assert not main_saes["dense_code"].any()
    paper = saes.filter(saes["arch"] == "relu-l1")
    assert paper["name"].to_list() == [f"paper-{demo_run.ft}-l3"]
    if paper["dense_code"][0]:  # the paper's recipe at this scale: flagged, with what it implies
        assert f"SAE {paper['name'][0]} is dense" in demo_run.page


@pytest.mark.slow
def test_demo_report_has_every_section_and_token_views(demo_run) -> None:
    for section in (
        "1. Fine-tuning",
        "2. Layer-wise similarity",
        "3. SAE metrics",
        "4. Top features",
        "5. Feature diff",
    ):
        assert section in demo_run.page, section
    assert re.findall(r'<span class="tok"', demo_run.page)
    report = demo_run.out / "report"
    assert (
        (report / "similarity.png").read_bytes()[:4]
        == (report / "feature_diff.png").read_bytes()[:4]
        == b"\x89PNG"
    )
    assert (report / "sae_curves.png").read_bytes()[
        :4
    ] == b"\x89PNG" and "sae_curves.png" in demo_run.page
    for row in demo_run.rep["sae_metrics"]:  # each SAE's held-out curve ends at its final metrics
        assert row["curves"]["eval"]["fvu"][-1] == pytest.approx(row["fvu"])


@pytest.mark.slow
def test_demo_similarity_is_the_stores(demo_run) -> None:
    """The report's similarity numbers are recomputed from the store, and high at the embeddings."""
    from actstore.analysis.compare import compare, wide
    from actstore.analysis.config import CompareConfig

    sim = demo_run.rep["similarity"]
    assert [r["layer"] for r in sim] == [0, 1, 2, 3]
    cfg = CompareConfig(models=(demo_run.pre, demo_run.ft), metrics=["mean-cosine"])
    again = wide(compare(demo_run.store, cfg, label="x", progress=False).table)
    assert [r["mean-cosine"] for r in sim] == pytest.approx(
        again["mean-cosine"].to_list(), abs=1e-9
    )
    assert sim[0]["mean-cosine"] > 0.9  # a 1-epoch fine-tune moves the embeddings at most slightly


@pytest.mark.slow
def test_demo_top_features_are_the_stores(demo_run) -> None:
    """Each SAE's top features, their top tokens and the best context shown are what the store's queries return."""
    from actstore.encoding.table import encoded_saes

    st, rep = demo_run.store, demo_run.rep
    assert {e["sae"] for e in rep["features"]} == set(encoded_saes(st)) and len(
        rep["features"]
    ) == 4
    for e in rep["features"]:
        top = actstore.top_features(st, sae=e["sae"], by="variance", n=5)
        assert [f["feature"] for f in e["features"]] == top["feature"].to_list()
        best = e["features"][0]
        tokens = actstore.top_tokens(st, int(best["feature"]), sae=e["sae"], n=8, context=6)
        assert [t["value"] for t in best["top_tokens"]] == pytest.approx(tokens["value"].to_list())
        assert html.escape(best["top_tokens"][0]["context"]) in demo_run.page


@pytest.mark.slow
def test_demo_saves_a_feature_diff_per_layer(demo_run) -> None:
    assert {r["layer"] for r in demo_run.rep["feature_diff"]} == {1, 3}
    assert (
        actstore.sql(demo_run.store, "SELECT count(DISTINCT diff) AS n FROM feature_diff")["n"][0]
        == 2
    )


@pytest.mark.slow
def test_demo_report_says_what_the_decision_depends_on(demo_run) -> None:
    """Section 6: each class's top features by summed attribution (the named query's), each with the pretrained
    SAE's matched feature and that feature's own attribution in the fine-tuned model."""
    assert "6. What the decision depends on" in demo_run.page
    rows = demo_run.rep["effects"]
    assert {r["layer"] for r in rows} == {1, 3}
    by_layer = {}
    for name in actstore.sae_names(demo_run.store):
        c = actstore.load_sae(demo_run.store, name).cfg
        if c.arch == "topk":
            by_layer[(c.model, c.layer)] = name
    for layer in (1, 3):
        ft_sae, pre_sae = by_layer[(demo_run.ft, layer)], by_layer[(demo_run.pre, layer)]
        want = actstore.sql(
            demo_run.store,
            "SELECT class, feature, sum(attribution) AS a FROM feature_effects WHERE sae = $s AND model = $m "
            "GROUP BY class, feature QUALIFY row_number() OVER (PARTITION BY class ORDER BY a DESC, feature) <= 3 "
            "ORDER BY class, a DESC, feature",
            {"s": ft_sae, "m": demo_run.ft},
        )
        got = [r for r in rows if r["layer"] == layer]
        assert [(r["class"], r["feature"]) for r in got] == list(
            zip(want["class"], want["feature"], strict=True)
        )
        assert [r["attribution"] for r in got] == pytest.approx(want["a"].to_list())
        for (
            r
        ) in got:  # the matched pretrained feature's attribution to the same class, when it fired
            pre = actstore.sql(
                demo_run.store,
                "SELECT sum(attribution) AS a FROM feature_effects WHERE sae = $s AND model = $m AND class = $c "
                "AND feature = $f",
                {"s": pre_sae, "m": demo_run.ft, "c": r["class"], "f": r["pretrained feature"]},
            )["a"][0]
            assert r["pretrained attribution"] == (pytest.approx(pre) if pre is not None else None)


@pytest.mark.slow
def test_demo_logs_its_commands(demo_run) -> None:
    assert "actstore finetune" in (demo_run.out / "commands.sh").read_text()
    assert 0 <= demo_run.res.accuracy["finetuned"] <= 1 and any(
        "== 6/6" in x for x in demo_run.lines
    )


@pytest.mark.slow
def test_report_command_on_the_demo_store(demo_run, tmp_path) -> None:
    r = CliRunner().invoke(
        main,
        [
            "report",
            demo_run.res.store,
            "--out",
            str(tmp_path / "rep2"),
            "--top-features",
            "2",
            "--views",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "rep2" / "report.json").read_text())
    assert all(len(e["features"]) == 2 for e in rep["features"])
    assert "## 4. Top features" in (tmp_path / "rep2" / "summary.md").read_text()


def test_report_without_models_notes_what_is_missing(tiny_store_ro, tmp_path) -> None:
    r = CliRunner().invoke(main, ["report", tiny_store_ro, "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "note:" in r.output and (tmp_path / "r" / "index.html").exists()


def test_the_demo_reads_a_recipe_as_finetune_does() -> None:
    """`actstore demo --data recipe:imdb` once failed ("cannot tell the format of recipe:imdb"): the demo built its
    corpus without resolving recipes."""
    from actstore.data.corpora import load_recipe
    from actstore.paper.demo import demo_data

    cfg = demo_data(DemoConfig(data="recipe:imdb", limit=50))
    assert cfg.source == load_recipe("recipe:imdb").source and cfg.source.endswith("imdb.jsonl.gz")
    assert cfg.limit == 50
    assert demo_data(DemoConfig(data="x.jsonl", limit=40)).source == "x.jsonl"


@pytest.mark.slow
def test_the_feature_page_shows_the_matched_pretrained_features_effects(demo_run) -> None:
    """The browser's feature page of a fine-tuned SAE's feature: its own effects, and its feature-diff match in the
    pretrained SAE with that feature's effects in the fine-tuned classifier."""
    from actstore.browse.config import ServeConfig
    from actstore.browse.data import Browser

    row = demo_run.rep["effects"][0]
    ft_sae = next(
        n for n in actstore.sae_names(demo_run.store)
        if actstore.load_sae(demo_run.store, n).cfg.model == demo_run.ft
        and actstore.load_sae(demo_run.store, n).cfg.layer == row["layer"]
        and actstore.load_sae(demo_run.store, n).cfg.arch == "topk"
    )  # fmt: skip
    page = Browser(demo_run.store, ServeConfig()).feature_page(ft_sae, row["feature"])
    assert {e["class"] for e in page["effects"]} >= {row["class"]}
    (m,) = page["matched_effects"]
    assert m["feature"] == row["pretrained feature"] and m["status"] == row["diff"]
    got = {e["class"]: e["attribution"] for e in m["effects"]}
    if row["pretrained attribution"] is not None:
        assert got[row["class"]] == pytest.approx(row["pretrained attribution"])
