import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actstore.data.corpora import DataConfig, load_corpus
from actstore.errors import ConfigError, DataError

ROWS = [
    {"id": "a", "text": "first text", "label": "pos"},
    {"id": "b", "text": "", "label": "neg"},
    {"id": "c", "text": None, "label": "neg"},
    {"id": "d", "text": 42, "label": "neg"},
    {"id": "e", "text": "   ", "label": "pos"},
    {"id": "f", "text": "second text <br /> with ünïcode", "label": 3},
]


def _check(corpus):
    recs = list(corpus)
    assert [r.id for r in recs] == ["a", "f"]
    assert recs[1].label == "3"
    rep = corpus.report
    assert (rep.n_read, rep.n_kept, rep.n_skipped_empty, rep.n_skipped_not_text) == (6, 2, 2, 2)


def test_jsonl_and_gz(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    _check(load_corpus(DataConfig(str(p))))
    g = tmp_path / "d.jsonl.gz"
    g.write_bytes(gzip.compress(p.read_bytes()))
    _check(load_corpus(DataConfig(str(g))))


def test_csv_and_parquet(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('id,body,cls\nx1,hello there,1\nx2,,0\nx3,"quoted, comma",0\n')
    recs = list(load_corpus(DataConfig(str(p), text_field="body", label_field="cls")))
    assert [(r.id, r.text, r.label) for r in recs] == [
        ("x1", "hello there", "1"),
        ("x3", "quoted, comma", "0"),
    ]
    q = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a b", "c"], "label": [1, 2]}), q)
    recs = list(load_corpus(DataConfig(str(q), limit=1)))
    assert [(r.id, r.text, r.label) for r in recs] == [("0", "a b", "1")]


def test_shared_imdb_limit():
    from conftest import SHARED_DATA

    path = SHARED_DATA / "imdb.jsonl.gz"
    if not path.exists():
        pytest.skip("../shared/data not present")
    c = load_corpus(DataConfig(str(path), limit=5))
    recs = list(c)
    assert len(recs) == 5 and recs[0].label in ("pos", "neg") and recs[0].split in ("train", "test")


def test_bundled_bbc():
    recs = list(load_corpus(DataConfig("bundled:bbc")))
    assert len(recs) == 2225
    assert {r.label for r in recs} == {"business", "entertainment", "politics", "sports", "tech"}


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(DataConfig(str(tmp_path / "missing.jsonl")))
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="--text-field"):
        list(load_corpus(DataConfig(str(p))))
    with pytest.raises(DataError, match="format"):
        load_corpus(DataConfig(str(tmp_path / "d.txt")))
    with pytest.raises(ConfigError):
        DataConfig(str(p), limit=0)
    with pytest.raises(DataError, match="bundled"):
        load_corpus(DataConfig("bundled:nope"))


def test_label_filter_and_recipes(tmp_path):
    from actstore.data.corpora import data_config, load_recipe, recipe_names

    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS))
    c = load_corpus(DataConfig(str(p), labels=("3",)))
    assert [r.id for r in c] == ["f"] and c.report.n_skipped_label == 1
    assert {"imdb", "spotify", "app-reviews", "huffpost5", "bbc"} <= set(recipe_names())
    hp = load_recipe("recipe:huffpost5")
    assert hp.labels == ("WELLNESS", "FOOD & DRINK", "POLITICS", "ENTERTAINMENT", "SPORTS")
    cfg = data_config("recipe:huffpost5", limit=50)
    assert cfg.limit == 50 and cfg.labels == hp.labels
    if not Path(hp.source).exists():
        pytest.skip("../shared/data not present")
    recs = list(load_corpus(cfg))
    assert len(recs) == 50 and {r.label for r in recs} <= set(hp.labels)
    mine = tmp_path / "mine.recipe.json"
    mine.write_text(json.dumps({"source": str(p), "labels": ["pos"]}))
    assert [r.id for r in load_corpus(data_config(str(mine)))] == ["a"]
    with pytest.raises(DataError, match="recipe:imdb"):
        data_config("recipe:nope")


def test_an_explicit_field_overrides_a_recipe_even_when_it_is_the_default_name(tmp_path):
    """issue 30: ``--text-field text`` over a recipe whose text field is ``review`` used to be dropped (it equals the
    option's default); an option not given keeps the recipe's."""
    from actstore.data.corpora import data_config

    recipe = tmp_path / "r.recipe.json"
    recipe.write_text(
        json.dumps({"source": str(tmp_path / "c.jsonl"), "text_field": "review", "id_field": "rid"})
    )
    assert data_config(str(recipe), text_field="text").text_field == "text"
    given_none = data_config(str(recipe))
    assert (given_none.text_field, given_none.id_field, given_none.label_field) == (
        "review",
        "rid",
        "label",
    )
    # no recipe: the DataConfig defaults
    assert data_config(str(tmp_path / "c.jsonl")).text_field == "text"
