"""Query stage: views, named queries, top-tokens / top-features, checked against numpy over a dense re-encode."""

from __future__ import annotations

import json
import random

import duckdb
import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from helpers import dense_numpy, make_sae

import actstore
from actstore.cli import main
from actstore.encoding.config import EncodeConfig
from actstore.encoding.encode import encode
from actstore.errors import ConfigError, NotFoundError
from actstore.query import lookups, named

WORDS = [
    "the",
    "film",
    "was",
    "unwatchable",
    "wonderfully",
    "overacted",
    "cinematography",
    "soundtrack",
    "plot",
    "twists",
    "unbelievably",
    "boring",
    "great",
]


@pytest.fixture(scope="module")
def enc_store(tmp_path_factory, tiny_bert_dir) -> str:
    """A tiny-BERT store over 36 texts with sub-word pieces and 3 labels; SAEs a, b (layer 2) and c (layer 1) encoded."""
    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    d = tmp_path_factory.mktemp("enc")
    rng = random.Random(1)
    rows = [
        {
            "id": f"r{i}",
            "label": ["pos", "neg", "mixed"][i % 3],
            "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))),
        }
        for i in range(36)
    ]
    (d / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = str(d / "s.zarr")
    cfg = ExtractConfig(
        model=tiny_bert_dir,
        data=DataConfig(str(d / "c.jsonl")),
        layers=[1, 2],
        name="tiny",
        codec="fp32",
        chunk_rows=64,
    )
    extract(path, cfg, progress=False)
    st = actstore.open_store(path, writable=True)
    make_sae(st, "a", "relu-l1", layer=2, d_sae=40, seed=0)
    make_sae(st, "b", "topk", layer=2, d_sae=24, k=4, seed=1)
    make_sae(st, "c", "topk", layer=1, d_sae=32, k=6, seed=2)
    for name in ("a", "b", "c"):
        encode(
            st,
            EncodeConfig(sae=name, batch_rows=128, n_buckets=3, row_group_rows=64),
            progress=False,
        )
    return path


@pytest.fixture(scope="module")
def ref(enc_store):
    """Dense numpy activations of every SAE plus the token / sample tables."""
    st = actstore.open_store(enc_store)
    dense = {n: dense_numpy(st, actstore.load_sae(st, n)) for n in ("a", "b", "c")}
    return {"dense": dense, "tokens": st.tokens(), "samples": st.samples()}


def join_pieces(tokens: list[str], hit: int) -> str:
    out = ""
    for i, t in enumerate(tokens):
        glue = t.startswith("##")
        text = t[2:] if glue else t
        if i == hit:
            text = f"[[{text}]]"
        out += text if glue else " " + text
    return out.strip()


@pytest.mark.parametrize(("sae", "layer"), [("a", 2), ("c", 1)])
def test_top_tokens_equal_numpy(enc_store, ref, sae, layer):
    st = actstore.open_store(enc_store)
    dense, tokens, samples = ref["dense"][sae], ref["tokens"], ref["samples"]
    assert any(
        t.startswith("##") for t in tokens["token"].to_list()
    )  # sub-word pieces are exercised
    con = actstore.connect(st)
    for feature in range(0, dense.shape[1], 5):
        col = dense[:, feature]
        rows = np.lexsort((np.arange(len(col)), -col))[:7]
        rows = rows[col[rows] > 0]
        df = lookups.top_tokens(st, feature, layer=layer, sae=sae, n=7, context=3, con=con)
        assert df["row"].to_list() == rows.tolist()
        np.testing.assert_allclose(df["value"].to_numpy(), col[rows], rtol=1e-4, atol=1e-6)
        assert df["rank"].to_list() == list(range(1, len(rows) + 1))
        for r in df.iter_rows(named=True):
            tok = tokens.row(r["row"], named=True)
            smp = samples.row(tok["sample"], named=True)
            assert (r["token"], r["sample"], r["position"], r["id"], r["label"]) == (
                tok["token"],
                tok["sample"],
                tok["position"],
                smp["id"],
                smp["label"],
            )
            lo = max(smp["first_row"], r["row"] - 3)
            hi = min(smp["first_row"] + smp["n_tokens"], r["row"] + 4)
            assert r["context"] == join_pieces(tokens["token"][lo:hi].to_list(), r["row"] - lo)
    con.close()


def test_top_tokens_equals_the_named_sql_query(enc_store):
    """top_tokens (lookup + in-memory token context) returns exactly the frame of sql/top_tokens.sql (a join)."""
    st = actstore.open_store(enc_store)
    con = actstore.connect(st)
    for sae, features in (("a", range(0, 40, 3)), ("b", range(24)), ("c", range(0, 32, 4))):
        for feature in features:
            for n, context in ((5, 3), (50, 0), (3, 12)):
                want = named.run_query(
                    st,
                    "top_tokens",
                    {"sae": sae, "feature": feature, "n": n, "context": context},
                    con=con,
                )
                for c in (
                    con,
                    None,
                ):  # lookup through the connection's view / straight from the bucket file
                    got = lookups.top_tokens(st, feature, sae=sae, n=n, context=context, con=c)
                    assert got.equals(want), (sae, feature, n, context, c)
    con.close()
    assert lookups.context_string(["the", "Ġbig", "##gest", "▁cat"], 1) == "the [[big]]gest cat"


def test_named_queries_equal_numpy(enc_store, ref):
    st = actstore.open_store(enc_store)
    dense, tokens, samples = ref["dense"]["a"], ref["tokens"], ref["samples"]
    n_rows = len(dense)
    # features of one sample
    s = samples.row(7, named=True)
    block = dense[s["first_row"] : s["first_row"] + s["n_tokens"]]
    df = named.run_query(st, "sample_features", {"sample": 7, "layer": 2, "sae": "a", "n": 100})
    active = np.flatnonzero((block > 0).any(axis=0))
    assert sorted(df["feature"].to_list()) == active.tolist()
    for r in df.iter_rows(named=True):
        f = r["feature"]
        np.testing.assert_allclose(r["max_value"], block[:, f].max(), rtol=1e-4)
        np.testing.assert_allclose(r["sum_value"], block[:, f].sum(), rtol=1e-4)
        assert r["n_active"] == int((block[:, f] > 0).sum())
        assert r["top_token"] == tokens["token"][s["first_row"] + int(block[:, f].argmax())]
    # top features by variance / frequency
    for by, stat in (("variance", dense.var(axis=0)), ("frequency", (dense > 0).mean(axis=0))):
        got = lookups.top_features(st, layer=2, sae="a", by=by, n=5)
        assert got["feature"].to_list() == np.lexsort((np.arange(len(stat)), -stat))[:5].tolist()
    # label association: mean over the label's tokens minus mean over the others
    lab = np.repeat(samples["label"].to_numpy(), samples["n_tokens"].to_numpy())
    got = lookups.top_features(st, layer=2, sae="a", by="label-association", n=3, label="neg")
    diff = dense[lab == "neg"].mean(axis=0) - dense[lab != "neg"].mean(axis=0)
    assert got["label"].unique().to_list() == ["neg"]
    assert got["feature"].to_list() == np.argsort(-diff, kind="stable")[:3].tolist()
    np.testing.assert_allclose(got["mean_diff"].to_numpy(), np.sort(diff)[::-1][:3], rtol=1e-4)
    all_labels = lookups.top_features(st, layer=2, sae="a", by="label-association", n=2)
    assert (
        sorted(all_labels["label"].unique().to_list()) == ["mixed", "neg", "pos"]
        and all_labels.height == 6
    )
    # token frequency and top samples of one feature
    f = int(np.argmax((dense > 0).sum(axis=0)))
    tf = named.run_query(st, "token_frequency", {"sae": "a", "feature": f, "n": 1000})
    counts = (
        pl.DataFrame({"token": tokens["token"].to_numpy()[dense[:, f] > 0]}).group_by("token").len()
    )
    assert dict(zip(tf["token"], tf["n_active"], strict=True)) == dict(
        zip(counts["token"], counts["len"], strict=True)
    )
    ts = named.run_query(st, "top_samples", {"sae": "a", "feature": f, "n": 3})
    sample_of = tokens["sample"].to_numpy()
    best = np.array([dense[sample_of == i, f].max() for i in range(samples.height)])
    assert ts["sample"].to_list() == np.lexsort((np.arange(len(best)), -best))[:3].tolist()
    assert n_rows == tokens.height


def test_views_and_lazyframes(enc_store):
    st = actstore.open_store(enc_store)
    cols = actstore.sql(st, "SELECT * FROM features LIMIT 1").columns
    assert cols == ["model", "layer", "sae", "row", "feature", "value"]
    assert actstore.sql(st, "SELECT * FROM feature_stats LIMIT 1").columns == [
        "model",
        "layer",
        "sae",
        "feature",
        "n_active",
        "frequency",
        "mean",
        "max",
        "variance",
    ]
    assert actstore.sql(st, "SELECT * FROM samples LIMIT 1").columns[:6] == [
        "sample",
        "id",
        "label",
        "text",
        "n_tokens",
        "first_row",
    ]
    per_sae = actstore.sql(
        st, "SELECT sae, layer, count(*) AS n FROM features GROUP BY ALL ORDER BY sae"
    )
    saes = actstore.sql(st, "SELECT sae, n_feature_rows FROM saes ORDER BY sae")
    assert per_sae["n"].to_list() == saes["n_feature_rows"].to_list() and per_sae[
        "layer"
    ].to_list() == [2, 2, 1]
    lazy = actstore.features(st).group_by("sae").len().sort("sae").collect()
    assert lazy["len"].to_list() == per_sae["n"].to_list()
    assert actstore.feature_stats(st, "c").collect().height == 32
    q = "SELECT * FROM features WHERE sae = $s AND feature = $f ORDER BY value DESC, row"
    assert actstore.sql(st, q, {"s": "c", "f": 3}).equals(
        actstore.features(st, "c")
        .filter(pl.col("feature") == 3)
        .sort(["value", "row"], descending=[True, False])
        .collect()
    )


def test_read_only_connection_refuses_writes(enc_store, tmp_path):
    st = actstore.open_store(enc_store)
    con = actstore.connect(st)
    for stmt in (
        "CREATE TABLE t AS SELECT 1",
        "DROP VIEW tokens",
        "CREATE OR REPLACE VIEW tokens AS SELECT 1",
        f"COPY (SELECT * FROM samples) TO '{tmp_path / 'x.csv'}'",
        "SELECT * FROM read_csv('/etc/hostname')",
        "SET enable_external_access = true",
    ):
        with pytest.raises(duckdb.Error):
            con.execute(stmt)
    assert not (tmp_path / "x.csv").exists()
    assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] > 0
    con.close()
    rw = actstore.connect(st, read_only=False)
    rw.execute("CREATE TABLE t AS SELECT feature, count(*) AS n FROM features GROUP BY feature")
    assert rw.execute("SELECT count(*) FROM t").fetchone()[0] > 0


def test_parameters_are_inert(enc_store):
    st = actstore.open_store(enc_store)
    evil = ["a' OR '1'='1", "a'; DROP VIEW tokens; --", "1 UNION SELECT * FROM samples", '"a"']
    for value in evil:
        with pytest.raises(NotFoundError):
            named.run_query(st, "top_tokens", {"sae": value, "feature": 1})
        out = named.run_query(st, "feature_label_association", {"sae": "a", "label": value})
        assert out.height == 0
        # bound straight into the SQL text, a quote is only a character
        got = actstore.sql(
            st,
            named.load_query("top_tokens").sql,
            {"sae": value, "feature": 1, "n": 5, "context": 2},
        )
        assert got.height == 0
    with pytest.raises(ConfigError, match="INTEGER"):
        named.run_query(st, "top_tokens", {"sae": "a", "feature": "1; DROP VIEW tokens"})
    with pytest.raises(NotFoundError, match="no named query"):
        named.run_query(st, "../../etc/passwd", {})
    assert actstore.sql(st, "SELECT count(*) AS n FROM tokens")["n"][0] > 0


def test_sae_resolution_messages(enc_store):
    st = actstore.open_store(enc_store)
    with pytest.raises(
        ConfigError, match=r"several encoded SAEs.*a \(tiny layer 2.*b \(tiny layer 2"
    ):
        lookups.top_tokens(st, 1, layer=2)
    busy = int(
        actstore.feature_stats(st, "c").filter(pl.col("n_active") >= 2).collect()["feature"][0]
    )
    got = lookups.top_tokens(st, busy, layer=1, n=2)  # the layer's only SAE, c
    assert got.height == 2 and got.equals(lookups.top_tokens(st, busy, sae="c", n=2))
    with pytest.raises(NotFoundError, match="actstore train"):
        lookups.top_tokens(st, 1, layer=0)
    with pytest.raises(ConfigError, match="out of range"):
        lookups.top_tokens(st, 99, sae="c")
    with pytest.raises(ConfigError, match="reads tiny layer 1"):
        lookups.top_tokens(st, 1, sae="c", layer=2)
    with pytest.raises(ConfigError, match="needs --param feature"):
        named.run_query(st, "top_tokens", {"sae": "a"})


CLI_CASES = {  # name: (arguments, S = the store; exit code 0?; what the output must show)
    "query-list": (["query", "--list"], True, ("top_tokens:", "feature (INTEGER, required)")),
    "top-tokens-ambiguous-layer": (
        ["top-tokens", "S", "--layer", "2", "--feature", "3"],
        False,
        ("--sae", "a (tiny layer 2"),
    ),
    "top-tokens-context": (
        ["top-tokens", "S", "--layer", "2", "--sae", "b", "--feature", "3", "-n", "3"],
        True,
        ("[[", "context"),
    ),
    "top-features-csv": (
        ["top-features", "S", "--layer", "1", "--by", "variance", "-n", "3", "--format", "csv"],
        True,
        ("rank,feature,variance",),
    ),
    "named-query-csv": (
        [
            "query",
            "S",
            "sample_features",
            "--param",
            "sample=2",
            "--param",
            "layer=1",
            "--format",
            "csv",
        ],
        True,
        ("feature,max_value",),
    ),
    "named-query-bad-param": (
        ["query", "S", "top_tokens", "--param", "feature=x", "--param", "sae=a"],
        False,
        ("must be INTEGER",),
    ),
    "sql-csv": (
        [
            "sql",
            "S",
            "SELECT sae, count(*) AS n FROM features GROUP BY sae ORDER BY sae",
            "--format",
            "csv",
        ],
        True,
        ("sae,n", "a,"),
    ),
    "top-features-unencoded-layer": (
        ["top-features", "S", "--layer", "0"],
        False,
        ("actstore train",),
    ),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_query_command(enc_store, case):
    args, ok, shown = CLI_CASES[case]
    r = CliRunner().invoke(main, [enc_store if a == "S" else a for a in args])
    assert (r.exit_code == 0) == ok, r.output
    for s in shown:
        assert s in r.output


def test_cli_top_tokens_json_is_the_numpy_order(enc_store, ref):
    r = CliRunner().invoke(
        main,
        ["top-tokens", enc_store, "--layer", "1", "--feature", "3", "-n", "4", "--format", "json"],
    )
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    col = ref["dense"]["c"][:, 3]
    assert len(rows) == 4
    assert [x["row"] for x in rows] == np.lexsort((np.arange(len(col)), -col))[:4].tolist()


def test_cli_top_features_by_label_writes_parquet(enc_store, tmp_path):
    out = tmp_path / "lab.parquet"
    args = [
        "top-features",
        enc_store,
        "--layer",
        "1",
        "--by",
        "label-association",
        "-n",
        "2",
        "--format",
        "parquet",
    ]
    r = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert pl.read_parquet(out).height == 6  # 2 features for each of the 3 labels
