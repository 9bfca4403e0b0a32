"""Token-level views: stored samples and live texts agree, HTML has one coloured span per token, PNG renders."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import actstore
from actstore import open_store
from actstore.analysis.config import ShowConfig
from actstore.analysis.show import show, token_views
from actstore.cli import main
from actstore.errors import ConfigError, NotFoundError
from actstore.sae.config import SAEConfig
from actstore.sae.files import save_sae
from actstore.sae.model import SAE


@pytest.fixture()
def store_with_sae(tiny_store) -> str:
    st = open_store(tiny_store, writable=True)
    torch.manual_seed(0)
    for layer in (1, 2):
        sae = SAE(
            SAEConfig("relu-l1", d_in=32, d_sae=48, model="tiny", layer=layer, name=f"s{layer}")
        )
        with torch.no_grad():
            sae.b_enc.fill_(0.5)  # most features fire somewhere
        save_sae(st, sae, f"s{layer}")
    return tiny_store


def test_stored_and_live_views_agree_with_the_sae(store_with_sae) -> None:
    st = open_store(store_with_sae)
    s0 = st.samples().filter(__import__("polars").col("id") == "s3").row(0, named=True)
    cfg = ShowConfig(saes=["s1", "s2"], features=[5, 7], sample_ids=["s3"], texts=[s0["text"]])
    tv = token_views(st, cfg)
    assert [v.layer for v in tv.views] == [1, 2] and tv.sentences == ["s3", s0["text"]]
    assert tv.tokens[0] == tv.tokens[1] and tv.tokens[0][0] == "[CLS]"
    r0, r1 = s0["first_row"], s0["first_row"] + s0["n_tokens"]
    sae = actstore.load_sae(st, "s2")
    expect = sae.encode(torch.from_numpy(st.activations("tiny", 2)[r0:r1]))[:, 7].detach().numpy()
    assert np.allclose(tv.values[0][1], expect, atol=1e-6)
    assert np.allclose(tv.values[1][1], expect, atol=1e-4)  # live forward pass == stored rows
    assert np.allclose(tv.values[1][0], tv.values[0][0], atol=1e-4)
    df = tv.table()
    assert df.height == 2 * 2 * len(tv.tokens[0])


def test_html_has_one_coloured_span_per_token(store_with_sae, tmp_path) -> None:
    st = open_store(store_with_sae)
    out = tmp_path / "v.html"
    tv = show(
        st,
        ShowConfig(
            saes=["s1"],
            features=[3],
            texts=["I love this movie!", "awful plot"],
            models=["tiny", "tiny"],
        ),
        str(out),
    )
    page = out.read_text()
    spans = re.findall(
        r'<span class="tok" style="background:rgba\(220, 40, 30, ([0-9.]+)\)" title="([-0-9.]+)">',
        page,
    )
    n_tok = sum(len(t) for t in tv.tokens) * 2
    assert len(spans) == n_tok
    vals = np.array([float(t) for _, t in spans])
    alphas = np.array([float(a) for a, _ in spans])
    assert alphas.max() == pytest.approx(1.0, abs=1e-3) and np.all((alphas > 0) == (vals > 0))
    assert "love" in page
    png = tmp_path / "v.png"
    show(st, ShowConfig(saes=["s1"], features=[3], texts=["I love this movie!"]), str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_show_errors(store_with_sae) -> None:
    st = open_store(store_with_sae)
    with pytest.raises(ConfigError, match="out of range"):
        token_views(st, ShowConfig(saes=["s1"], features=[480], texts=["x"]))
    with pytest.raises(NotFoundError, match="nope"):
        token_views(st, ShowConfig(saes=["s1"], features=[1], sample_ids=["nope"]))
    with pytest.raises(ConfigError, match="nothing to show"):
        ShowConfig(saes=["s1"], features=[1])


def test_show_cli(store_with_sae, tmp_path) -> None:
    out = tmp_path / "cli.html"
    r = CliRunner().invoke(
        main,
        [
            "show",
            store_with_sae,
            "--sae",
            "s1",
            "--feature",
            "2",
            "--text",
            "I love this movie!",
            "--sample-id",
            "s0",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output
    # the page shows the SAE's values of feature 2 for every token of both sentences, in order
    tv = token_views(
        open_store(store_with_sae),
        ShowConfig(saes=["s1"], features=[2], texts=["I love this movie!"], sample_ids=["s0"]),
    )
    shown = [
        float(v) for v in re.findall(r'<span class="tok" [^>]*title="([-0-9.]+)">', out.read_text())
    ]
    want = sorted(
        round(float(x), 4)
        for per_sentence in tv.values
        for per_view in per_sentence
        for x in per_view
    )
    assert len(shown) == len(want) and np.allclose(sorted(shown), want, atol=1e-4)


def test_show_cli_names_an_unknown_sae(store_with_sae, tmp_path) -> None:
    out = tmp_path / "cli.html"
    r = CliRunner().invoke(
        main,
        ["show", store_with_sae, "--sae", "zz", "--feature", "2", "--text", "x", "--out", str(out)],
    )
    assert r.exit_code != 0 and "zz" in r.output and not out.exists()


def test_live_model_loaded_once_for_many_samples(
    store_with_sae, tiny_bert_dir, corpus_file, monkeypatch
) -> None:
    """Samples of a model whose layer is not stored run live: its model is loaded once, not once per sample."""
    from actstore.data.corpora import DataConfig
    from actstore.models import loading as models
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    extract(
        store_with_sae,
        ExtractConfig(
            tiny_bert_dir, DataConfig(corpus_file), [1], name="other", codec="fp32", device="cpu"
        ),
        progress=False,
    )
    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    st = open_store(store_with_sae)
    ids = [f"s{i}" for i in range(6)]
    tv = token_views(
        st, ShowConfig(saes=["s2"], features=[3], sample_ids=ids, models=["tiny", "other"])
    )
    assert len(loads) == 1 and len(tv.sentences) == 6
    # the live pass of 'other' (same weights as tiny) equals the stored rows of tiny
    for s in range(6):
        np.testing.assert_allclose(tv.values[s][1], tv.values[s][0], atol=1e-5)
        assert (
            tv.tokens[s]
            == st.tokens().filter(__import__("polars").col("sample") == s)["token"].to_list()
        )
