"""``actstore effects`` and ``actstore steer``: the splice with its error term leaves the model's output as it was,
attribution equals a finite difference, a planted decision is found where it was planted (attribution, ablation,
accuracy to chance), the table equals a dense recomputation and resumes after a crash, one writer, bad inputs in one
line, and the views and the CLI on a tiny BERT classifier and a tiny GPT-2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import one_line_error

import actstore
from actstore.cli import main
from actstore.effects.config import EffectsConfig
from actstore.format import layout
from actstore.sae.config import SAEConfig
from actstore.sae.files import save_sae
from actstore.sae.model import SAE


def _copy(src: str, tmp_path: Path) -> str:
    dst = tmp_path / f"{Path(src).parent.name}.zarr"
    shutil.copytree(src, dst)
    return str(dst)


def _random_sae(
    store: str, model: str, layer: int, name: str = "rand", d_sae: int = 24, seed: int = 0
) -> SAE:
    """A random relu SAE on ``model``'s layer (most features fire on some tokens)."""
    st = actstore.open_store(store, writable=True)
    d = st.model_info(model).d_model
    torch.manual_seed(seed)
    sae = SAE(SAEConfig("relu-l1", d, d_sae, model=model, layer=layer, name=name,
                        tokenization=st.model_info(model).tokenization))  # fmt: skip
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, d_sae) / d**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d) / d**0.5)
        sae.b_enc.fill_(0.1)
        sae.b_dec.zero_()
    save_sae(st, sae, name)
    return sae


@pytest.fixture()
def clf(tmp_path, clf_store):
    """A writable copy of the tiny classifier's store (layer 2) with a random SAE ``rand`` on it."""
    store = _copy(clf_store[0], tmp_path)
    _random_sae(store, "clf", 2)
    return store


@pytest.fixture()
def lm(tmp_path, lm_store_ro):
    store = _copy(lm_store_ro[0], tmp_path)
    _random_sae(store, "lm", 1)
    return store


def _open(store: str, sae: str = "rand"):
    from actstore.effects.run import open_splice

    return open_splice(actstore.open_store(store, writable=True), sae, None, "cpu")


def _first_batch(store: str, head, n: int = 6):
    from actstore.effects.splice import make_batch

    st = actstore.open_store(store)
    tk = st.tokenization()
    first, n_tok = tk.sample_rows()
    seqs = [tk.token_ids(int(first[i]), int(first[i] + n_tok[i])) for i in range(n)]
    return make_batch(seqs, np.arange(n), head.pad_id, "cpu")


# ---------------------------------------------------------------- the splice


@pytest.mark.parametrize("kind", ["classifier", "lm"])
def test_the_splice_with_its_error_term_leaves_the_output_unchanged(kind, clf, lm, one_thread):
    from actstore.effects.splice import logits

    head, splice = _open(clf if kind == "classifier" else lm)
    batch = _first_batch(clf if kind == "classifier" else lm, head)
    with torch.no_grad():
        clean = logits(head, batch)
        with splice():
            spliced = logits(head, batch)
    real = batch.attention_mask.bool()
    diff = (clean - spliced).abs() if kind == "classifier" else (clean - spliced)[real].abs()
    assert float(diff.max()) < 1e-4
    # the SAE is really in the path: an edit changes the output
    with torch.no_grad(), splice(edit=lambda a: a * 0):
        assert float((logits(head, batch) - clean).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["classifier", "lm"])
def test_attribution_equals_a_finite_difference(kind, clf, lm, one_thread):
    """d/de of the target with feature j scaled by (1 + e), at e = 0, is sum_t a_tj * dm/da_tj (float64)."""
    from actstore.effects.attribute import attribute_batch
    from actstore.effects.splice import logits, targets

    store = clf if kind == "classifier" else lm
    head, splice = _open(store)
    head.model.double()
    splice.sae.double()
    batch = _first_batch(store, head)
    cols, _ = attribute_batch(head, splice, batch, "predicted", None)
    sample, feature = np.concatenate(cols["sample"]), np.concatenate(cols["feature"])
    attr = np.concatenate(cols["attribution"])
    with torch.no_grad():
        pred = logits(head, batch).argmax(-1)

    def target(scale: float, j: int) -> np.ndarray:  # (b,)
        def edit(a):
            out = a.clone()
            out[..., j] *= scale
            return out

        with torch.no_grad(), splice(edit=edit):
            out = logits(head, batch)
        if head.kind == "lm":
            return targets(head, out, batch, "predicted", None)[0][1].numpy()
        return out.log_softmax(-1)[torch.arange(len(pred)), pred].numpy()

    order = np.argsort(-np.abs(attr))[:8]
    eps = 1e-4
    for r in order:
        j, s = int(feature[r]), int(sample[r])
        fd = (target(1 + eps, j)[s] - target(1 - eps, j)[s]) / (2 * eps)
        assert fd == pytest.approx(attr[r], abs=1e-3, rel=1e-3)


@pytest.mark.parametrize("kind", ["classifier", "lm"])
def test_ablation_replaying_the_layers_below_the_splice_equals_the_full_pass(
    kind, clf, lm, one_thread
):
    from actstore.effects.ablate import run_pass, run_passes, set_feature
    from actstore.effects.attribute import corpus

    store = clf if kind == "classifier" else lm
    st = actstore.open_store(store)
    head, splice = _open(store)
    cfg = EffectsConfig("rand", batch_size=7, target="logits")
    cp = corpus(st, splice.sae.cfg.tokenization, cfg, head)
    edits = [set_feature(2, 0.0), set_feature(5, 3.0)]
    with torch.no_grad():
        clean, *edited = run_passes(st, head, splice, cp, cfg, "cpu", edits)
        full = [run_pass(st, head, splice, cp, cfg, "cpu", e) for e in [None, *edits]]
    for got, want in zip([clean, *edited], full, strict=True):
        np.testing.assert_allclose(got.target, want.target, rtol=1e-5, atol=1e-5)
    assert np.abs(edited[1].target - clean.target).max() > 1e-4  # the edit reached the output


# ---------------------------------------------------------------- a planted decision


def _planted(tmp_path: Path, tiny_bert_dir: str, corpus_file: str) -> tuple[str, int]:
    """A tiny BERT classifier whose head reads one direction ``d`` of its last hidden state at [CLS] (pooler
    0.01 * I, so tanh is linear; class logits +-d, scaled to margins of a few units), thresholded between the two
    labels' means; and an SAE on
    that layer whose feature 0 carries ``h . d`` (shifted positive) and whose other features are orthogonal to d.
    Returns the store and the planted feature."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    torch.manual_seed(2)
    # weights larger than BERT's default init: a [CLS] state that depends on the text
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2, initializer_range=0.5,
                     id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})  # fmt: skip
    model = BertForSequenceClassification(cfg).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = [json.loads(x) for x in Path(corpus_file).read_text().splitlines()]
    y = np.asarray([t["label"] == "pos" for t in texts], dtype=float)
    with torch.no_grad():
        enc = tok([t["text"] for t in texts], padding=True, return_tensors="pt")
        cls = model.bert(**enc).last_hidden_state[:, 0].numpy().astype(np.float64)  # (n, 32)
    # the direction that separates the labels' [CLS] states (ridge regression on centred data)
    x = cls - cls.mean(0)
    w = np.linalg.solve(x.T @ x + 0.01 * len(x) * np.eye(32), x.T @ (y - y.mean()))
    d = w / np.linalg.norm(w)
    proj = cls @ d
    c = (proj[y > 0].mean() + proj[y == 0].mean()) / 2
    sign = 1.0 if proj[y > 0].mean() > c else -1.0
    assert (
        (sign * (proj - c) > 0) == (y > 0)
    ).mean() >= 0.9  # the direction does separate the labels
    scale = 2.5 / (0.01 * np.abs(proj - c).mean())  # logit margins of a few units
    with torch.no_grad():
        model.bert.pooler.dense.weight.copy_(torch.eye(32) * 0.01)
        model.bert.pooler.dense.bias.zero_()
        dt = torch.from_numpy(d).float()
        model.classifier.weight.copy_(torch.stack([-dt, dt]) * scale * sign)
        model.classifier.bias.copy_(torch.tensor([1.0, -1.0]) * scale * sign * 0.01 * c)
    model.save_pretrained(tmp_path / "planted")
    tok.save_pretrained(tmp_path / "planted")
    store = str(tmp_path / "p.zarr")
    extract(store, ExtractConfig(model=str(tmp_path / "planted"), data=DataConfig(corpus_file), layers=[1],
                                 name="clf", codec="fp32", device="cpu"), progress=False)  # fmt: skip
    st = actstore.open_store(store, writable=True)
    shift = float(np.abs(proj).max() * 4)
    rng = np.random.default_rng(0)
    others = rng.standard_normal((32, 15))
    others -= np.outer(d, d @ others)  # orthogonal to d
    others /= np.linalg.norm(others, axis=0)
    enc_w = np.concatenate([d[:, None], others], 1)  # (32, 16)
    sae = SAE(SAEConfig("relu-l1", 32, 16, model="clf", layer=1, name="planted",
                        tokenization=st.model_info("clf").tokenization))  # fmt: skip
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(enc_w).float())
        sae.W_dec.copy_(torch.from_numpy(enc_w.T).float())
        sae.b_enc.copy_(torch.tensor([shift] + [0.0] * 15))
        sae.b_dec.copy_(
            torch.from_numpy(-shift * d).float()
        )  # feature 0 fires h.d + shift, decoded less the shift
    save_sae(st, sae, "planted")
    return store, 0


def test_a_planted_decision_is_found_where_it_was_planted(
    tmp_path, tiny_bert_dir, corpus_file, one_thread
):
    store, j = _planted(tmp_path, tiny_bert_dir, corpus_file)
    r = CliRunner().invoke(main, ["effects", store, "--sae", "planted", "--ablate-top", "4", "--device", "cpu",
                                  "--quiet", "--format", "json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    st = actstore.open_store(store)
    tot = actstore.sql(st, "SELECT feature, sum(abs(attribution)) AS a FROM feature_effects GROUP BY feature "
                           "ORDER BY a DESC").rows()  # fmt: skip
    assert tot[0][0] == j and tot[0][1] >= 10 * tot[1][1]
    ab = actstore.sql(st, "SELECT feature, abs(effect) AS e, delta_acc FROM feature_ablations WHERE class = 'pos' "
                          "ORDER BY e DESC").rows()  # fmt: skip
    assert ab[0][0] == j and ab[0][1] >= 10 * ab[1][1]
    clean = json.loads(
        (Path(store) / layout.effects_file("planted", "clf", layout.EFFECTS_META)).read_text()
    )
    assert clean["ablation"]["features"][0] == j
    # the model was right on (almost) every sample; without the feature it says one class for all: chance
    from actstore.effects.ablate import run_pass, set_feature
    from actstore.effects.attribute import corpus

    head, splice = _open(store, "planted")
    cfg = EffectsConfig("planted")
    cp = corpus(st, splice.sae.cfg.tokenization, cfg, head)
    true = cp.labels
    with torch.no_grad():
        acc = (run_pass(st, head, splice, cp, cfg, "cpu", None).probs.argmax(1) == true).mean()
        ablated = run_pass(st, head, splice, cp, cfg, "cpu", set_feature(j, 0.0)).probs.argmax(1)
    assert acc >= 0.9
    assert (ablated == true).mean() == pytest.approx(0.5, abs=0.05)
    assert ab[0][2] == pytest.approx((ablated == true).mean() - acc, abs=1e-9)


# ---------------------------------------------------------------- the table


def test_the_table_equals_a_dense_recomputation_one_sample_at_a_time(clf, one_thread):
    from actstore.effects.attribute import read_effects
    from actstore.effects.run import effects

    st = actstore.open_store(clf, writable=True)
    effects(st, EffectsConfig("rand", ablate_top=0, batch_size=7, part_samples=16, device="cpu"))
    got = read_effects(st, "rand", "clf").sort("sample", "feature")
    head, splice = _open(clf)
    tk = st.tokenization()
    first, n_tok = tk.sample_rows()
    rows = []
    for s in range(len(first)):
        ids = torch.from_numpy(tk.token_ids(int(first[s]), int(first[s] + n_tok[s]))[None])
        with splice(grad=True):
            out = head.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        a = splice.acts[0]  # (seq, d_sae)
        c = int(out.argmax())
        (g,) = torch.autograd.grad(out.log_softmax(-1)[0, c], splice.acts)
        attr, act = (a * g[0]).sum(0).detach().numpy(), a.sum(0).detach().numpy()
        for f in np.flatnonzero(act > 0):
            rows.append((s, int(f), head.classes[c], float(attr[f]), float(act[f])))
    assert got.height == len(rows)
    assert got["sample"].to_list() == [r[0] for r in rows] and got["feature"].to_list() == [
        r[1] for r in rows
    ]
    assert got["class"].to_list() == [r[2] for r in rows]
    np.testing.assert_allclose(
        got["attribution"].to_numpy(), [r[3] for r in rows], rtol=1e-3, atol=1e-5
    )
    np.testing.assert_allclose(
        got["activation"].to_numpy(), [r[4] for r in rows], rtol=1e-4, atol=1e-5
    )
    # the file is clustered by feature
    assert got.height and read_effects(st, "rand", "clf")["feature"].is_sorted()


def test_a_crashed_run_resumes_from_its_parts(clf, monkeypatch, one_thread):
    import actstore.effects.attribute as attribute
    from actstore.effects.attribute import read_effects
    from actstore.effects.run import effects

    st = actstore.open_store(clf, writable=True)
    cfg = EffectsConfig("rand", ablate_top=0, part_samples=8, device="cpu")
    real, calls = attribute.attribute_block, []

    def crash_on_third(*a, **kw):
        calls.append(a[4])
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    monkeypatch.setattr(attribute, "attribute_block", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        effects(st, cfg)
    parts = [k for k in st.loc.walk(layout.effects_dir("rand", "clf")) if "/parts/part-" in k]
    assert len(parts) == 2
    calls.clear()
    monkeypatch.setattr(
        attribute, "attribute_block", lambda *a, **kw: (calls.append(a[4]), real(*a, **kw))[1]
    )
    effects(st, cfg)
    assert calls == [16, 24, 32]  # the two finished blocks are not redone
    resumed = read_effects(st, "rand", "clf")
    shutil.rmtree(Path(clf) / layout.effects_dir("rand", "clf"))
    effects(st, cfg)
    fresh = read_effects(st, "rand", "clf")
    assert resumed.equals(fresh)
    assert not any("/parts/" in k for k in st.loc.walk(layout.effects_dir("rand", "clf")))


def test_a_second_writer_is_refused(clf):
    from actstore.storage.locks import StoreLock

    st = actstore.open_store(clf, writable=True)
    lock = StoreLock(st.loc, layout.effects_dir("rand", "clf"), "someone").acquire()
    try:
        r = CliRunner().invoke(main, ["effects", clf, "--sae", "rand", "--device", "cpu"])
        assert "lock" in one_line_error(r).lower()
    finally:
        lock.release()


@pytest.mark.parametrize(
    "case",
    ["no head", "no labels", "layer", "width", "feature", "model", "patch", "patch layer"],
)
def test_bad_inputs_are_one_line_and_write_nothing(case, clf, tiny_store):
    store, args = clf, ["--sae", "rand"]
    if case == "no head":  # a base BertModel: nothing to measure an effect on
        store = tiny_store
        _random_sae(store, "tiny", 2, d_sae=8)
    elif case == "no labels":
        st = actstore.open_store(clf, writable=True)
        tk = st.tokenization()
        key = tk.parquet_keys("samples")[0]
        import io

        import polars as pl

        df = pl.read_parquet(io.BytesIO(st.loc.read_bytes(key))).with_columns(
            pl.lit(None, pl.String).alias("label")
        )
        buf = io.BytesIO()
        df.write_parquet(buf)
        st.loc.write_bytes(key, buf.getvalue())
        from actstore.storage.integrity import update_manifest

        update_manifest(st.loc)
        args += ["--target", "label"]
    elif case == "layer":  # an SAE of layer 9 of a 3-layer model
        _random_sae(clf, "clf", 2, name="deep")
        cfg_path = Path(clf) / "saes" / "deep" / "cfg.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["layer"] = 9
        cfg_path.write_text(json.dumps(cfg))
        from actstore.storage.integrity import update_manifest

        update_manifest(actstore.open_store(clf, writable=True).loc)
        args = ["--sae", "deep"]
    elif case == "width":  # the SAE is 32 wide, the model another
        st = actstore.open_store(clf, writable=True)
        sae = SAE(
            SAEConfig(
                "relu-l1",
                16,
                8,
                model="clf",
                layer=2,
                tokenization=st.model_info("clf").tokenization,
            )
        )
        save_sae(st, sae, "narrow")
        args = ["--sae", "narrow"]
    elif case == "feature":
        args += ["--ablate-features", "999"]
    elif case == "model":
        args += ["--model", "nope"]
    elif case == "patch":  # the SAE is of the model it is spliced into: patch from what?
        args += ["--ablate-mode", "patch"]
    elif case == "patch layer":  # a model the store has, but not at the SAE's layer
        _random_sae(clf, "clf", 1, name="l1")
        args = ["--sae", "l1", "--ablate-mode", "patch", "--patch-from", "clf"]
    r = CliRunner().invoke(main, ["effects", store, *args, "--device", "cpu", "--quiet"])
    msg = one_line_error(r)
    assert msg
    sae = args[1]
    folder = Path(store) / "saes" / sae / "effects"
    assert not folder.exists()


# ---------------------------------------------------------------- CLI, views, steering


def test_the_cli_on_a_tiny_gpt2_attributes_the_next_token_loss(lm, one_thread):
    r = CliRunner().invoke(
        main, ["effects", lm, "--sae", "rand", "--ablate-top", "3", "--device", "cpu", "--quiet"]
    )
    assert r.exit_code == 0, r.output
    st = actstore.open_store(lm)
    classes = actstore.sql(st, "SELECT DISTINCT class FROM feature_effects").rows()
    assert classes == [("next_token",)]
    ab = actstore.sql(
        st, "SELECT feature, delta_loss, effect, n FROM feature_ablations ORDER BY feature"
    ).rows()
    assert len(ab) == 3 and all(row[1] is not None and row[3] == 40 for row in ab)
    assert "rank correlation" in r.output


def test_views_equal_the_saved_tables(clf, one_thread):
    from actstore.effects.ablate import read_ablations
    from actstore.effects.attribute import read_effects

    r = CliRunner().invoke(main, ["effects", clf, "--sae", "rand", "--ablate-top", "2", "--target", "logits",
                                  "--device", "cpu", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    st = actstore.open_store(clf)
    view = actstore.sql(st, "SELECT sample, feature, class, attribution, activation FROM feature_effects "
                            "WHERE sae = 'rand' AND model = 'clf' AND layer = 2")  # fmt: skip
    table = read_effects(st, "rand", "clf")
    assert view.sort("feature", "class", "sample").equals(table.sort("feature", "class", "sample"))
    assert set(table["class"].unique()) == {"neg", "pos"}  # --target logits: every class
    abl = actstore.sql(
        st, "SELECT feature, class, effect FROM feature_ablations ORDER BY feature, class"
    )
    saved = (
        read_ablations(st, "rand", "clf")
        .select("feature", "class", "effect")
        .sort("feature", "class")
    )
    assert abl.equals(saved) and abl.height == 4
    # per sample: each ablated feature's change on each of the 40 samples, summing to its effects
    per = actstore.sql(st, "SELECT feature, count(*) AS n, sum(delta) AS d, count(predicted) AS p "
                           "FROM feature_ablation_samples GROUP BY feature ORDER BY feature").rows()  # fmt: skip
    eff = actstore.sql(
        st,
        "SELECT feature, sum(effect) AS e FROM feature_ablations GROUP BY feature ORDER BY feature",
    )
    assert [(f, n, p) for f, n, _, p in per] == [(f, 40, 40) for f in eff["feature"]]
    assert [d for *_, d, _ in per] == pytest.approx(eff["e"].to_list(), rel=1e-5, abs=1e-6)


def test_steering_a_classifier_moves_its_probabilities_as_the_splice_says(
    clf, tmp_path, one_thread
):
    from transformers import AutoTokenizer

    from actstore.effects.ablate import set_feature
    from actstore.effects.splice import logits, make_batch

    text, out = "great great great movie", tmp_path / "steer.json"
    r = CliRunner().invoke(main, ["steer", clf, "--sae", "rand", "--feature", "3", "--value", "50", "--text", text,
                                  "--device", "cpu", "--format", "json", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "clean:" in r.output and "feature 3 = 50" in r.output
    rows = {row["class"]: row for row in json.loads(out.read_text())}
    head, splice = _open(clf)
    path = actstore.open_store(clf).model_info("clf").path
    ids = np.asarray(AutoTokenizer.from_pretrained(path)(text)["input_ids"])
    batch = make_batch([ids], np.zeros(1, np.int64), head.pad_id, "cpu")
    with torch.no_grad():
        clean = head.model(input_ids=batch.input_ids).logits.softmax(-1)[0].numpy()
        with splice(edit=set_feature(3, 50.0)):
            steered = logits(head, batch).softmax(-1)[0].numpy()
    for i, c in enumerate(head.classes):
        assert rows[c]["p_clean"] == pytest.approx(
            clean[i], abs=1e-4
        )  # the unsteered run is the model's own
        assert rows[c]["p_steered"] == pytest.approx(steered[i], abs=1e-5)
    assert np.abs(steered - clean).max() > 1e-3


def test_steering_a_decoder_lm_continues_the_text(lm, one_thread):
    r = CliRunner().invoke(main, ["steer", lm, "--sae", "rand", "--feature", "1", "--value", "0", "--text",
                                  "the movie was", "--tokens", "3", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "clean: " in r.output and "feature 1 = 0: " in r.output


def test_steering_a_feature_the_sae_lacks_is_one_line(clf):
    r = CliRunner().invoke(
        main, ["steer", clf, "--sae", "rand", "--feature", "500", "--value", "1", "--text", "x"]
    )
    assert "not a feature" in one_line_error(r)


def test_hostile_class_names_in_a_teammates_effects_are_escaped_in_the_report(clf, one_thread):
    """A store is untrusted input: a class name with markup, written straight into its effects table, is text on
    the report's page."""
    import io

    import polars as pl

    from actstore.paper.report import effects_part
    from actstore.storage.integrity import update_manifest

    st = actstore.open_store(clf, writable=True)
    evil = "<script>alert(1)</script>"
    df = pl.DataFrame({"sample": [0, 1], "feature": [3, 3], "class": [evil, evil], "attribution": [1.0, 2.0],
                       "activation": [1.0, 1.0]}).cast({"feature": pl.Int32, "attribution": pl.Float32,
                                                         "activation": pl.Float32})  # fmt: skip
    buf = io.BytesIO()
    df.write_parquet(buf)
    st.loc.write_bytes(layout.effects_file("rand", "clf", layout.EFFECTS_TABLE), buf.getvalue())
    meta = {"identity": {}, "complete": True, "result": {"layer": 2}}
    st.loc.write_bytes(
        layout.effects_file("rand", "clf", layout.EFFECTS_META), json.dumps(meta).encode()
    )
    update_manifest(st.loc)
    part = effects_part(actstore.open_store(clf), ("other", "clf"))
    page = "".join(part.html)
    assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_the_feature_page_shows_the_features_effects(clf, one_thread):
    from starlette.testclient import TestClient

    from actstore.browse.app import create_app
    from actstore.browse.config import ServeConfig
    from actstore.browse.data import Browser
    from actstore.encoding.config import EncodeConfig
    from actstore.encoding.encode import encode

    st = actstore.open_store(clf, writable=True)
    encode(st, EncodeConfig(sae="rand", device="cpu"), progress=False)
    r = CliRunner().invoke(main, ["effects", clf, "--sae", "rand", "--ablate-top", "2", "--target", "logits",
                                  "--device", "cpu", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    top = int(actstore.sql(st, "SELECT feature FROM feature_ablations LIMIT 1")["feature"][0])
    st = actstore.open_store(clf)
    shown = Browser(st, ServeConfig()).feature_page("rand", top)["effects"]
    want = actstore.sql(st, "SELECT class, sum(attribution) AS a, count(*) AS n FROM feature_effects "
                            f"WHERE feature = {top} GROUP BY class ORDER BY class").rows()  # fmt: skip
    assert [(e["class"], e["samples"]) for e in shown] == [(c, n) for c, _, n in want]
    assert [e["attribution"] for e in shown] == pytest.approx([a for _, a, _ in want])
    assert all(e["delta_prob"] is not None for e in shown)
    page = TestClient(app=create_app(st, ServeConfig()), base_url="http://127.0.0.1").get(
        f"/sae/rand/feature/{top}"
    )
    assert page.status_code == 200 and 'id="effects"' in page.text and "pos" in page.text


def test_patching_a_feature_with_its_own_models_values_changes_nothing(clf, one_thread):
    from actstore.effects.ablate import read_ablations
    from actstore.effects.run import effects

    st = actstore.open_store(clf, writable=True)
    effects(
        st, EffectsConfig("rand", ablate_top=3, ablate_mode="patch", patch_from="clf", device="cpu")
    )
    ab = read_ablations(st, "rand", "clf")
    assert ab.height == 6 and set(ab["mode"]) == {"patch"}
    assert (
        np.abs(ab["effect"].to_numpy()).max() < 1e-4
        and np.abs(ab["delta_prob"].to_numpy()).max() < 1e-6
    )


def test_patching_from_another_model_sets_each_token_to_its_value_there(
    clf, tiny_bert_dir, corpus_file, one_thread
):
    """The pretrained-model case: a second model's rows of the same tokens (here a random BERT of the same width),
    encoded by the SAE; the effect equals the edit computed by hand one sample at a time."""
    from actstore.data.corpora import DataConfig
    from actstore.effects.ablate import read_ablations
    from actstore.effects.run import effects
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    extract(clf, ExtractConfig(model=tiny_bert_dir, data=DataConfig(corpus_file), layers=[2], name="base",
                               codec="fp32", device="cpu"), progress=False)  # fmt: skip
    st = actstore.open_store(clf, writable=True)
    effects(st, EffectsConfig("rand", ablate_top=0, ablate_features=[4], ablate_mode="patch", patch_from="base",
                              device="cpu"))  # fmt: skip
    got = read_ablations(st, "rand", "clf")
    head, splice = _open(clf)
    tk, base = st.tokenization(), st.activations("base", 2)
    first, n_tok = tk.sample_rows()
    total = 0.0
    with torch.no_grad():
        for s in range(len(first)):
            ids = torch.from_numpy(tk.token_ids(int(first[s]), int(first[s] + n_tok[s]))[None])
            other = splice.sae.encode(
                torch.from_numpy(np.asarray(base[int(first[s]) : int(first[s] + n_tok[s])]))
            )

            def edit(a, v=other[:, 4]):
                out = a.clone()
                out[0, :, 4] = v
                return out

            with splice():
                clean = head.model(input_ids=ids).logits.log_softmax(-1)[0]
            c = int(clean.argmax())
            with splice(edit=edit):
                patched = head.model(input_ids=ids).logits.log_softmax(-1)[0]
            total += float(patched[c] - clean[c])
    assert got["effect"][0] == pytest.approx(total, rel=1e-3, abs=1e-5)
    assert abs(total) > 1e-4  # the two models' values differ


def test_the_parts_sort_into_one_table_out_of_core_as_in_memory(clf, tmp_path, one_thread):
    """Parts split into feature-range buckets on disk (a few rows each here) give the same table as one in-memory
    sort."""
    import io

    import polars as pl

    from actstore.effects.attribute import sort_parts

    st = actstore.open_store(clf, writable=True)
    rng = np.random.default_rng(0)
    keys = []
    for i in range(3):
        df = pl.DataFrame({"sample": rng.integers(0, 40, 500), "feature": rng.integers(0, 24, 500).astype(np.int32),
                           "class": rng.choice(["neg", "pos"], 500), "attribution": rng.standard_normal(500),
                           "activation": rng.random(500)})  # fmt: skip
        df = df.cast({"attribution": pl.Float32, "activation": pl.Float32})
        keys.append(layout.effects_part("rand", "clf", i * 100))
        buf = io.BytesIO()
        df.write_parquet(buf)
        st.loc.write_bytes(keys[-1], buf.getvalue())
    whole = pl.concat([pl.read_parquet(Path(clf) / k) for k in keys]).sort(
        "feature", "class", "sample"
    )
    for bucket_rows, name in ((10**9, "one.parquet"), (97, "many.parquet")):
        out = f"{layout.effects_dir('rand', 'clf')}/{name}"
        assert sort_parts(st, keys, out, 24, bucket_rows=bucket_rows) == 1500
        got = pl.read_parquet(Path(clf) / out)
        assert got.sort("feature", "class", "sample", maintain_order=True).equals(
            got
        )  # written in order
        assert (
            got.select(whole.columns)
            .sort("feature", "class", "sample", "attribution")
            .equals(whole.sort("feature", "class", "sample", "attribution"))
        )


def test_effects_on_a_store_opened_by_url(s3_server, clf, one_thread):
    """A team's bucket (moto's S3 on 127.0.0.1): attribution parts, the sorted table and the ablations are written
    through the store's own filesystem and read back by SQL, as on disk."""
    from actstore.storage.config import CopyConfig
    from actstore.storage.copy import copy_store

    url = "s3://team/effects.zarr"
    assert copy_store(CopyConfig(clf, url)).ok
    r = CliRunner().invoke(main, ["effects", url, "--writable", "--sae", "rand", "--ablate-top", "2", "--part-samples",
                                  "16", "--device", "cpu", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    st = actstore.open_store(url)
    n = actstore.sql(
        st, "SELECT count(*) AS n, count(DISTINCT sample) AS s FROM feature_effects"
    ).row(0)
    assert n[0] > 0 and n[1] == 40
    assert (
        actstore.sql(st, "SELECT count(DISTINCT feature) AS f FROM feature_ablations")["f"][0] == 2
    )
    assert not any("/parts/" in k for k in st.loc.walk(layout.effects_dir("rand", "clf")))


def test_the_browsers_steering_form_runs_only_the_model_the_user_names(clf, clf_store, one_thread):
    """serve --steer-model KEY=PATH puts a form on the feature page whose result equals actstore steer's; without it
    there is no form and no model is loaded (a store's recorded path is never opened by the browser)."""
    from starlette.testclient import TestClient

    from actstore.browse.app import create_app
    from actstore.browse.config import ServeConfig
    from actstore.effects.config import SteerConfig
    from actstore.effects.steer import steer
    from actstore.encoding.config import EncodeConfig
    from actstore.encoding.encode import encode

    encode(
        actstore.open_store(clf, writable=True),
        EncodeConfig(sae="rand", device="cpu"),
        progress=False,
    )
    st = actstore.open_store(clf)
    plain = TestClient(app=create_app(st, ServeConfig()), base_url="http://127.0.0.1")
    assert 'id="steer"' not in plain.get("/sae/rand/feature/3").text
    refused = plain.get(
        "/sae/rand/feature/3/steer", params={"model": "clf", "value": "5", "text": "great"}
    )
    assert refused.status_code == 400 and "--steer-model" in refused.text
    app = create_app(st, ServeConfig(steer_models=[f"clf={clf_store[1]}"]))
    c = TestClient(app=app, base_url="http://127.0.0.1")
    assert 'id="steer"' in c.get("/sae/rand/feature/3").text
    text = "great great movie <b>bold</b>"
    r = c.get("/sae/rand/feature/3/steer", params={"model": "clf", "value": "50", "text": text})
    assert (
        r.status_code == 200 and "&lt;b&gt;bold&lt;/b&gt;" in r.text and "<b>bold</b>" not in r.text
    )
    want = steer(st, SteerConfig("rand", 3, 50.0, text, device="cpu")).table
    for cls, p_steered in zip(want["class"], want["p_steered"], strict=True):
        assert f"<td>{cls}</td>" in r.text and f"<td>{p_steered:.4g}</td>" in r.text
    assert (
        c.get(
            "/sae/rand/feature/3/steer", params={"model": "clf", "value": "1", "text": ""}
        ).status_code
        == 400
    )


def test_a_steer_model_without_a_path_is_one_line():
    from actstore.browse.config import ServeConfig
    from actstore.errors import ConfigError

    with pytest.raises(ConfigError, match="KEY=PATH"):
        ServeConfig(steer_models=["clf"])


def test_show_steer_prints_each_texts_steered_prediction(clf, tmp_path, one_thread):
    from actstore.effects.config import SteerConfig
    from actstore.effects.steer import steer

    text = "great great movie"
    r = CliRunner().invoke(main, ["show", clf, "--sae", "rand", "--feature", "3", "--text", text, "--steer", "50",
                                  "--out", str(tmp_path / "v.html")])  # fmt: skip
    assert r.exit_code == 0, r.output
    (want,) = steer(
        actstore.open_store(clf), SteerConfig("rand", 3, 50.0, text, device="cpu")
    ).lines
    assert f"'{text}' · clf · rand[3] steered: {want}" in r.output


def test_a_model_directory_outside_the_store_is_spliced_like_its_store_key(
    clf, clf_store, tmp_path, one_thread
):
    """--model PATH: a fine-tune not extracted into the store, of the same tokenizer, gives the table --model KEY
    gives for the same weights; a directory whose tokenizer gives other ids is one line, nothing written."""
    from transformers import BertForSequenceClassification, BertTokenizerFast

    from actstore.effects.attribute import read_effects
    from actstore.effects.run import effects, path_key

    st = actstore.open_store(clf, writable=True)
    by_key = effects(st, EffectsConfig("rand", ablate_top=0, device="cpu"))
    by_path = effects(st, EffectsConfig("rand", model=clf_store[1], ablate_top=0, device="cpu"))
    assert by_path.result.model == path_key(clf_store[1]) != by_key.result.model
    a, b = read_effects(st, "rand", "clf"), read_effects(st, "rand", by_path.result.model)
    assert a.select("sample", "feature", "class").equals(b.select("sample", "feature", "class"))
    np.testing.assert_allclose(
        a["attribution"].to_numpy(), b["attribution"].to_numpy(), rtol=1e-4, atol=1e-6
    )
    other = tmp_path / "other-tok"
    BertForSequenceClassification.from_pretrained(clf_store[1]).save_pretrained(other)
    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "great", "movie"])
    )
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(other)
    r = CliRunner().invoke(
        main, ["effects", clf, "--sae", "rand", "--model", str(other), "--device", "cpu"]
    )
    assert "other token ids" in one_line_error(r)
    assert not (Path(clf) / layout.effects_dir("rand", path_key(str(other)))).exists()


@pytest.fixture()
def cc_store(clf, tiny_bert_dir, corpus_file):
    """The classifier's store with a second model (a random base BERT) at layer 2 and a random crosscoder ``cc`` of
    the two."""
    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    extract(clf, ExtractConfig(model=tiny_bert_dir, data=DataConfig(corpus_file), layers=[2], name="base",
                               codec="fp32", device="cpu"), progress=False)  # fmt: skip
    st = actstore.open_store(clf, writable=True)
    torch.manual_seed(5)
    sae = SAE(SAEConfig("relu-l1", 32, 24, models=["base", "clf"], layers=[2, 2], name="cc",
                        tokenization=st.model_info("clf").tokenization))  # fmt: skip
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(64, 24) / 8)
        sae.W_dec.copy_(torch.randn(24, 64) / 8)
        sae.b_enc.fill_(0.1)
    save_sae(st, sae, "cc")
    return clf


def test_a_crosscoder_spliced_into_one_model_keeps_its_output_and_attributes_exactly(
    cc_store, one_thread
):
    """The crosscoder's side of the classifier, the base model's stored rows beside it: the output is unchanged
    with the error added back, and attribution equals a finite difference (float64)."""
    from actstore.effects.attribute import attribute_batch
    from actstore.effects.run import open_splice
    from actstore.effects.splice import logits

    st = actstore.open_store(cc_store)
    head, splice = open_splice(st, "cc", "clf", "cpu")
    assert splice.sources is not None and splice.sources.own == 1
    batch = _first_batch(cc_store, head)
    with torch.no_grad():
        clean = logits(head, batch)
        with splice(batch=batch):
            assert float((logits(head, batch) - clean).abs().max()) < 1e-4
    head.model.double()
    splice.sae.double()
    cols, _ = attribute_batch(head, splice, batch, "predicted", None)
    sample, feature, attr = (np.concatenate(cols[k]) for k in ("sample", "feature", "attribution"))
    pred = logits(head, batch).argmax(-1)

    def target(scale: float, j: int) -> np.ndarray:
        def edit(a):
            out = a.clone()
            out[..., j] *= scale
            return out

        with torch.no_grad(), splice(edit=edit, batch=batch):
            return logits(head, batch).log_softmax(-1)[torch.arange(len(pred)), pred].numpy()

    for r in np.argsort(-np.abs(attr))[:5]:
        j, s = int(feature[r]), int(sample[r])
        fd = (target(1 + 1e-4, j)[s] - target(1 - 1e-4, j)[s]) / 2e-4
        assert fd == pytest.approx(attr[r], abs=1e-3, rel=1e-3)


def test_crosscoder_effects_from_the_cli_and_its_refusals(cc_store, one_thread):
    r = CliRunner().invoke(main, ["effects", cc_store, "--sae", "cc", "--model", "clf", "--ablate-top", "2",
                                  "--device", "cpu", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    st = actstore.open_store(cc_store)
    assert (
        actstore.sql(
            st, "SELECT count(DISTINCT sample) AS s FROM feature_effects WHERE sae = 'cc'"
        )["s"][0]
        == 40
    )
    assert (
        actstore.sql(
            st, "SELECT count(DISTINCT feature) AS f FROM feature_ablations WHERE sae = 'cc'"
        )["f"][0]
        == 2
    )
    for args, needle in (
        (["--sae", "cc"], "pass --model"),
        (["--sae", "cc", "--model", "base"], "without a"),
    ):
        r = CliRunner().invoke(main, ["effects", cc_store, *args, "--device", "cpu"])
        assert needle in one_line_error(r)
    r = CliRunner().invoke(main, ["steer", cc_store, "--sae", "cc", "--model", "clf", "--feature", "1", "--value", "1",
                                  "--text", "x"])  # fmt: skip
    assert "crosscoder" in one_line_error(r)


def test_target_label_attributes_only_the_labelled_samples_each_to_its_own_label(clf, one_thread):
    """With some samples unlabelled, --target label attributes the others, each to its own label (the corpus once
    kept every sample id but only the labelled samples' labels, so labels were read off the wrong samples)."""
    import io

    import polars as pl

    from actstore.storage.integrity import update_manifest

    st = actstore.open_store(clf, writable=True)
    key = st.tokenization().parquet_keys("samples")[0]
    df = pl.read_parquet(io.BytesIO(st.loc.read_bytes(key)))
    df = df.with_columns(
        pl.when(pl.col("sample") < 5).then(None).otherwise(pl.col("label")).alias("label")
    )
    buf = io.BytesIO()
    df.write_parquet(buf)
    st.loc.write_bytes(key, buf.getvalue())
    update_manifest(st.loc)
    r = CliRunner().invoke(main, ["effects", clf, "--sae", "rand", "--target", "label", "--ablate-top", "0",
                                  "--device", "cpu", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    got = actstore.sql(actstore.open_store(clf), "SELECT DISTINCT e.sample, e.class, s.label FROM feature_effects e "
                                                "JOIN samples s USING (sample) ORDER BY e.sample").rows()  # fmt: skip
    assert [s for s, _, _ in got] == list(range(5, 40))
    assert all(c == lab for _, c, lab in got)
