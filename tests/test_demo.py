"""The demo end to end on the tiny BERT and a small corpus; the report and its CLI."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import actstore
from actstore import open_store
from actstore.analysis.config import DemoConfig
from actstore.analysis.demo import default_sae_layers, run_demo
from actstore.cli import main
from actstore.errors import ConfigError


def test_default_sae_layers_follow_the_paper() -> None:
    assert default_sae_layers(12) == [3, 6, 12]
    assert default_sae_layers(6) == [2, 3, 6]
    assert default_sae_layers(3) == [1, 3]
    with pytest.raises(ConfigError):
        DemoConfig(limit=5)


@pytest.mark.slow
def test_demo_end_to_end_on_tiny_model(tmp_path, tiny_bert_dir, corpus_file) -> None:
    out = tmp_path / "demo"
    cfg = DemoConfig(out=str(out), model=tiny_bert_dir, data=corpus_file, limit=40, epochs=1, lr=1e-3, max_length=32,
                     sae_epochs=2, sae_batch_size=128, device="cpu")  # fmt: skip
    lines: list[str] = []
    res = run_demo(cfg, progress=False, log=lines.append)
    st = open_store(res.store)
    pre, ft = Path(tiny_bert_dir).name, f"{Path(tiny_bert_dir).name}-ft"
    assert sorted(st.models) == sorted([pre, ft])
    assert st.layers(pre) == st.layers(ft) == [0, 1, 2, 3]
    assert len(actstore.sae_names(st)) == 5  # layers 1 and 3, both models, topk; and the paper's relu-l1 for contrast
    from actstore.sae.files import list_saes

    saes = list_saes(st)
    main_saes = saes.filter(saes["arch"] == "topk")
    assert main_saes.height == 4 and (main_saes["l0"] <= 0.05 * main_saes["d_sae"]).all()  # sparse
    assert not main_saes["dense_code"].any()
    paper = saes.filter(saes["arch"] == "relu-l1")
    assert paper["name"].to_list() == [f"paper-{Path(tiny_bert_dir).name}-ft-l3"]
    page = Path(res.report_html).read_text()
    for section in ("1. Fine-tuning", "2. Layer-wise similarity", "3. SAE metrics", "4. Top features", "5. Feature diff"):
        assert section in page, section
    if paper["dense_code"][0]:  # the paper's recipe at this scale: flagged, with what it implies
        assert f"SAE {paper['name'][0]} is dense" in page
    assert len(re.findall(r'<span class="tok"', page)) > 0
    rep = json.loads((out / "report" / "report.json").read_text())
    assert [r["layer"] for r in rep["similarity"]] == [0, 1, 2, 3]
    # the embeddings layer is untouched by a 1-epoch fine-tune at most slightly: similarity stays high there
    assert rep["similarity"][0]["mean-cosine"] > 0.9
    assert {r["layer"] for r in rep["feature_diff"]} == {1, 3}
    assert (out / "report" / "similarity.png").exists() and (out / "report" / "feature_diff.png").exists()
    assert "actstore finetune" in (out / "commands.sh").read_text()
    assert 0 <= res.accuracy["finetuned"] <= 1 and any("== 5/5" in x for x in lines)
    # the report's numbers are the store's: similarity recomputed, top features and tokens queried again
    from actstore.analysis.compare import compare, wide
    from actstore.analysis.config import CompareConfig

    again = wide(compare(st, CompareConfig(models=(pre, ft), metrics=["mean-cosine"]), label="x", progress=False).table)
    assert [r["mean-cosine"] for r in rep["similarity"]] == pytest.approx(again["mean-cosine"].to_list(), abs=1e-9)
    assert {e["sae"] for e in rep["features"]} == set(main_saes["name"].to_list()) | set(paper["name"].to_list())
    for e in rep["features"]:
        top = actstore.top_features(st, sae=e["sae"], by="variance", n=5)
        assert [f["feature"] for f in e["features"]] == top["feature"].to_list()
        best = e["features"][0]
        tokens = actstore.top_tokens(st, int(best["feature"]), sae=e["sae"], n=8, context=6)
        assert [t["value"] for t in best["top_tokens"]] == pytest.approx(tokens["value"].to_list())
        assert html.escape(best["top_tokens"][0]["context"]) in page

    # the report command on the finished store, and SQL over the saved diff
    r = CliRunner().invoke(main, ["report", res.store, "--out", str(tmp_path / "rep2"), "--top-features", "2", "--views", "1"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep2" / "index.html").exists() and (tmp_path / "rep2" / "summary.md").exists()
    n = actstore.sql(st, "SELECT count(DISTINCT diff) AS n FROM feature_diff")["n"][0]
    assert n == 2


def test_report_without_models_notes_what_is_missing(tiny_store_ro, tmp_path) -> None:
    r = CliRunner().invoke(main, ["report", tiny_store_ro, "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "note:" in r.output and (tmp_path / "r" / "index.html").exists()
