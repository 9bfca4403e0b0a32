"""Feature diff: an SAE against itself is all retained; planted changes are found; the SQL view reads the result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import actstore
from actstore import open_store
from actstore.analysis.config import DiffConfig
from actstore.analysis.diff import Correlations, diff_features, load_diff
from actstore.cli import main
from actstore.errors import ConfigError
from actstore.sae.config import SAEConfig
from actstore.sae.files import save_sae
from actstore.sae.model import SAE


def _sae(layer: int, name: str, seed: int, d_sae: int = 40) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig("relu-l1", d_in=32, d_sae=d_sae, model="tiny", layer=layer, name=name))
    with torch.no_grad():
        sae.b_enc.fill_(0.3)
    return sae


@pytest.fixture()
def store_with_saes(tiny_store) -> str:
    st = open_store(tiny_store, writable=True)
    base = _sae(2, "base", 0, d_sae=24)
    save_sae(st, base, "base")
    # 'edit': features 0-11 identical, 12-17 rotated towards a direction orthogonal to every base decoder row
    # (cosine 1/sqrt(1 + 1.2^2) ~ 0.64 with their old selves), 18-23 replaced by such orthogonal directions
    edit = _sae(2, "edit", 0, d_sae=24)
    with torch.no_grad():
        w = base.W_dec.detach().double()  # (24, 32)
        q, _ = torch.linalg.qr(
            torch.cat(
                [w.T, torch.randn(32, 8, generator=torch.Generator().manual_seed(9)).double()], 1
            )
        )
        orth = q[:, 24:].T  # (8, 32), orthogonal to every base row
        new = w.clone()
        new[12:18] = w[12:18] + 1.2 * orth[:6] * w[12:18].norm(dim=1, keepdim=True)
        new[18:24] = orth[:6]
        new = torch.nn.functional.normalize(new, dim=1).float()
        edit.W_dec.copy_(new)
        edit.W_enc.copy_(new.T)
    save_sae(st, edit, "edit")
    return tiny_store


def test_corr_accumulator_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 4)), rng.normal(size=(300, 3))
    b[:, 0] = 2 * a[:, 1] + 0.1 * b[:, 0]
    b[:, 2] = 0.0  # constant: undefined correlation
    acc = Correlations(4, 3)
    acc.add(a[:100], b[:100])
    acc.add(a[100:], b[100:])
    r = acc.corr()
    full = np.corrcoef(a.T, b.T)[:4, 4:]
    assert np.allclose(r[:, :2], full[:, :2]) and np.isnan(r[:, 2]).all()


def test_sae_against_itself_is_all_retained(store_with_saes) -> None:
    st = open_store(store_with_saes, writable=True)
    res = diff_features(st, DiffConfig("base", "base", rows=0))
    assert res.counts == {
        "a": {"retained": 24, "modified": 0, "lost": 0},
        "b": {"retained": 24, "modified": 0, "new": 0},
    }
    t = res.table.filter(res.table["side"] == "a")
    assert np.allclose(t["decoder_cos"].to_numpy(), 1.0)
    fired = t.filter(t["activation_corr"].is_not_null())
    assert fired.height > 0 and np.allclose(fired["activation_corr"].to_numpy(), 1.0)
    assert res.n_rows == len(st.activations("tiny", 2))


def test_planted_changes_are_labelled(store_with_saes, tmp_path) -> None:
    st = open_store(store_with_saes, writable=True)
    res = diff_features(st, DiffConfig("base", "edit", rows=500))
    a = res.table.filter(res.table["side"] == "a").sort("feature")
    status = a["status"].to_list()
    assert status[:12] == ["retained"] * 12 and a["match_decoder"].to_list()[:12] == list(range(12))
    assert all(s != "retained" for s in status[12:])
    assert np.allclose(a["decoder_cos"].to_numpy()[12:18], 1 / np.sqrt(1 + 1.2**2), atol=0.02)
    b = res.table.filter(res.table["side"] == "b").sort("feature")
    assert np.all(np.abs(b["decoder_cos"].to_numpy()[18:]) < 1e-5)  # the planted new directions
    corr = b["activation_corr"].to_numpy()[18:]
    assert b["status"].to_list()[18:] == ["modified" if r >= 0.4 else "new" for r in corr]
    dec_only = diff_features(st, DiffConfig("base", "edit", activation_corr=False, name="dec"))
    assert dec_only.counts["b"] == {"retained": 12, "modified": 6, "new": 6}
    assert (
        dec_only.counts["a"]["retained"] == 12
        and dec_only.counts["a"]["lost"] + dec_only.counts["a"]["modified"] == 12
    )
    # saved, reloadable, and visible to SQL
    again = load_diff(st, "base__edit")
    assert again.counts == res.counts
    df = actstore.sql(
        st,
        "SELECT side, status, count(*) AS n FROM feature_diff WHERE diff = 'base__edit' GROUP BY ALL ORDER BY ALL",
    )
    assert df.filter((df["side"] == "a") & (df["status"] == "retained"))["n"].to_list() == [
        res.counts["a"]["retained"]
    ]


def test_diff_errors(store_with_saes) -> None:
    st = open_store(store_with_saes, writable=True)
    with pytest.raises(ConfigError):
        DiffConfig("a", "b", retain=0.3, match=0.5)
    save_sae(st, SAE(SAEConfig("relu-l1", d_in=16, d_sae=8, model="tiny", layer=1)), "narrow")
    with pytest.raises(ConfigError, match="reads d_in 16 but tiny layer 1 of .* has d_model 32"):
        diff_features(st, DiffConfig("base", "narrow"))


def test_diff_cli(store_with_saes) -> None:
    r = CliRunner().invoke(
        main, ["diff-features", store_with_saes, "--sae", "base", "--sae", "edit", "--rows", "300"]
    )
    assert r.exit_code == 0, r.output
    assert "retained" in r.output and "feature_diff" in r.output
    r = CliRunner().invoke(main, ["diff-features", store_with_saes, "--sae", "base"])
    assert r.exit_code != 0 and "two" in r.output
