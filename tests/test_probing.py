"""Sparse probing (``actstore eval``): the probe is scikit-learn's logistic regression, pooling is the mean of the
SAE's features over each sample's tokens, and a feature planted to carry the label is the one a 1-sparse probe
picks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import make_sae, one_line_error

import actstore
from actstore.analysis.config import EvalConfig
from actstore.analysis.probing import fit_logistic, pool, sparse_probing, top_features
from actstore.cli import main
from actstore.sae.files import list_saes, save_sae


def test_the_probe_is_scikit_learns_logistic_regression():
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6))
    y = (x @ rng.standard_normal(6) + 0.5 * rng.standard_normal(200) > 0.3).astype(int)
    for c in (0.1, 1.0):
        ref = linear_model.LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y)
        w, b = fit_logistic(x, y, c)
        np.testing.assert_allclose(w, ref.coef_[0], rtol=1e-5, atol=1e-7)
        assert b == pytest.approx(ref.intercept_[0], rel=1e-5, abs=1e-7)


def test_top_features_are_those_whose_class_means_differ_most():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 50)
    f = rng.random((100, 8)) * 0.1
    f[y > 0, 5] += 2.0  # far apart
    f[y <= 0, 2] += 1.0  # apart, the other way
    assert list(top_features(f, y, 2)) == [5, 2]


def planted_sae(store_path: str) -> tuple[np.ndarray, int]:
    """An SAE on layer 2 whose feature 3 is the direction between the two labels' mean pooled activations (the
    others random and weak); returns the pooled raw activations it was built from and the planted feature."""
    st = actstore.open_store(store_path, writable=True)
    sae = make_sae(st, "planted", "relu-l1", d_sae=8, seed=3)
    acts = st.activations("tiny", 2)
    first, n_tok = st.tokenization().sample_rows()
    smp = st.samples()
    labels = np.asarray(smp["label"].to_list())
    pooled = np.stack(
        [acts[int(a) : int(a + n)].mean(0) for a, n in zip(first, n_tok, strict=True)]
    )  # (40, 32)
    direction = pooled[labels == "pos"].mean(0) - pooled[labels == "neg"].mean(0)
    with torch.no_grad():
        sae.W_enc.mul_(0.01)
        sae.W_enc[:, 3] = (
            torch.from_numpy(direction / np.linalg.norm(direction)).float() * 10 / sae.scale
        )
        sae.b_enc.zero_()
    save_sae(st, sae, "planted")
    return pooled, 3


def test_pooled_features_are_the_mean_of_each_samples_encoded_tokens(tiny_store):
    planted_sae(tiny_store)
    st = actstore.open_store(tiny_store, writable=True)
    pooled, sae = pool(st, EvalConfig(sae="planted", device="cpu", batch_rows=50))
    acts = st.activations("tiny", 2)
    first, n_tok = st.tokenization().sample_rows()
    with torch.no_grad():
        want = np.stack([sae.encode(torch.from_numpy(acts[int(a) : int(a + n)])).numpy().mean(0)
                         for a, n in zip(first, n_tok, strict=True)])  # fmt: skip
    np.testing.assert_allclose(pooled.features, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled.raw[0], acts[0 : int(n_tok[0])].mean(0), rtol=1e-6)
    assert list(pooled.labels[:2]) == ["pos", "neg"]


def test_a_1_sparse_probe_finds_the_planted_label_feature(tiny_store):
    planted_sae(tiny_store)
    st = actstore.open_store(tiny_store, writable=True)
    res = sparse_probing(st, EvalConfig(sae="planted", k=[1, 2], device="cpu", test_fraction=0.5))
    (task,) = res.tasks  # two labels: one task
    assert task.features[1] == [3]
    assert task.sparse[1] >= 0.85 and task.n_test >= 8


def test_eval_command_saves_evals_json_and_says_one_line_on_bad_input(tiny_store):
    planted_sae(tiny_store)
    r = CliRunner().invoke(
        main, ["eval", tiny_store, "--sae", "planted", "--k", "1,2", "--device", "cpu", "--quiet"]
    )
    assert r.exit_code == 0, r.output
    assert "mean" in r.output and "k1" in r.output and "saved" in r.output
    saved = json.loads((Path(tiny_store) / "saes" / "planted" / "evals.json").read_text())[
        "sparse_probing"
    ]
    assert saved["sae"] == "planted" and set(saved["sparse"]) == {"1", "2"}
    one_line_error(
        CliRunner().invoke(main, ["eval", tiny_store, "--sae", "planted", "--k", "0"]), "--k"
    )
    one_line_error(CliRunner().invoke(main, ["eval", tiny_store, "--sae", "nope"]), "nope")


def test_evals_reach_sql_and_the_saes_table(tiny_store):
    planted_sae(tiny_store)
    st = actstore.open_store(tiny_store, writable=True)
    from actstore.analysis.probing import save_evals

    res = sparse_probing(st, EvalConfig(sae="planted", k=[1, 5], device="cpu", test_fraction=0.5))
    save_evals(st, res)
    st = actstore.open_store(tiny_store)
    rows = actstore.sql(
        st,
        "SELECT task, k, accuracy, n_test FROM sae_evals WHERE sae = 'planted' ORDER BY k NULLS FIRST",
    )
    (task,) = res.tasks
    assert rows.rows() == [(task.label, None, task.dense, task.n_test), (task.label, 1, task.sparse[1], task.n_test),
                           (task.label, 5, task.sparse[5], task.n_test)]  # fmt: skip
    table = list_saes(st)
    row = table.filter(table["name"] == "planted").row(0, named=True)
    assert row["probe_k1"] == pytest.approx(res.sparse[1]) and row["probe_dense"] == pytest.approx(
        res.dense
    )
    assert (
        actstore.sql(
            actstore.open_store(tiny_store),
            "SELECT count(*) AS n FROM sae_evals WHERE sae <> 'planted'",
        )["n"][0]
        == 0
    )
