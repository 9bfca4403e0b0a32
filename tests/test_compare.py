"""Compare stage: metrics against hand-computed values, CKA invariances, and the streaming pass over a real store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from actstore import open_store
from actstore.analysis.compare import (
    compare,
    linear_cka,
    mean_cosine,
    plot_similarity,
    token_cosine,
    wide,
)
from actstore.analysis.config import CompareConfig
from actstore.cli import main
from actstore.errors import ConfigError, NotFoundError


def test_mean_and_token_cosine_by_hand() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0]])
    # means (0.5, 0.5) and (1, 0): cosine 1/sqrt(2); per token cosines 1 and 0
    assert mean_cosine(a, b) == pytest.approx(1 / np.sqrt(2))
    assert token_cosine(a, b) == pytest.approx(0.5)
    assert token_cosine(a, -a) == pytest.approx(-1.0)


def test_cka_by_hand_and_invariances() -> None:
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    y = np.array([[1.0], [4.0], [9.0], [16.0]])
    # 1-d linear CKA is the squared Pearson correlation
    assert linear_cka(x, y) == pytest.approx(np.corrcoef(x[:, 0], y[:, 0])[0, 1] ** 2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(x, x @ q) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x + 5.0) == pytest.approx(1.0)
    assert linear_cka(x, x[:, :4]) < 1.0
    noise = rng.normal(size=(4000, 8))
    assert linear_cka(rng.normal(size=(4000, 8)), noise) < 0.02


@pytest.fixture()
def two_model_store(tmp_path, tiny_store, tiny_bert_dir, corpus_file) -> str:
    """The tiny store plus a second, differently initialised model 'other' (same tokenizer) and 'same' (same weights)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    d = tmp_path / "other"
    torch.manual_seed(1)
    BertModel(BertConfig.from_pretrained(tiny_bert_dir)).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(d)
    common = dict(
        data=DataConfig(corpus_file), layers="0-2", codec="fp32", batch_size=8, device="cpu"
    )
    extract(tiny_store, ExtractConfig(model=str(d), name="other", **common), progress=False)
    extract(tiny_store, ExtractConfig(model=tiny_bert_dir, name="same", **common), progress=False)
    return tiny_store


def test_compare_store_matches_full_arrays(two_model_store, tmp_path) -> None:
    st = open_store(two_model_store)
    res = compare(st, CompareConfig(models=("tiny", "other"), cka_rows=0))
    w = wide(res.table)
    assert w["layer"].to_list() == [0, 1, 2]
    for row in w.iter_rows(named=True):
        a = st.activations("tiny", row["layer"])[:]
        b = st.activations("other", row["layer"])[:]
        assert row["mean-cosine"] == pytest.approx(mean_cosine(a, b), abs=1e-6)
        assert row["token-cosine"] == pytest.approx(token_cosine(a, b), abs=1e-6)
        assert row["cka"] == pytest.approx(linear_cka(a, b), abs=1e-5)
        assert row["cka"] < 0.999
    same = wide(
        compare(
            st, CompareConfig(models=("tiny", "same"), metrics=["mean-cosine", "cka"], cka_rows=100)
        ).table
    )
    assert np.allclose(same["mean-cosine"].to_numpy(), 1.0) and np.allclose(
        same["cka"].to_numpy(), 1.0
    )
    png = plot_similarity(res.table, str(tmp_path / "sim.png"))
    assert Path(png).read_bytes()[:4] == b"\x89PNG"


def test_compare_errors(two_model_store) -> None:
    st = open_store(two_model_store)
    with pytest.raises(ConfigError, match="--models"):
        compare(st, CompareConfig())  # three models: must choose
    with pytest.raises(NotFoundError, match="layer 3"):
        compare(st, CompareConfig(models=("tiny", "other"), layers=[3]))
    with pytest.raises(ConfigError):
        CompareConfig(metrics=["euclid"])


def test_compare_cli_two_stores_one_plot(two_model_store, tmp_path) -> None:
    png = tmp_path / "fig1.png"
    r = CliRunner().invoke(
        main,
        [
            "compare",
            two_model_store,
            two_model_store,
            "--models",
            "tiny,other",
            "--label",
            "A",
            "--label",
            "B",
            "--metric",
            "mean-cosine,cka",
            "--plot",
            str(png),
            "--format",
            "csv",
        ],
    )
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert (
        lines[0].startswith("label,") and len([x for x in lines if x.startswith(("A,", "B,"))]) == 6
    )
    assert lines[0] == "label,model_a,model_b,layer,mean-cosine,cka,n_rows"
    assert png.exists()
    r = CliRunner().invoke(main, ["compare", two_model_store, "--models", "tiny,nope"])
    assert r.exit_code != 0 and "nope" in r.output
