"""Crosscoders: planted dictionaries recovered and classified, Complete Shrinkage caught by Latent Scaling, row
alignment enforced, resume after a kill, encode / SQL / diff ground truth against numpy from the weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

import actstore
from actstore.analysis.config import CrosscoderDiffConfig
from actstore.analysis.crosscoder import diff_crosscoder, load_crosscoder_diff, relative_norm
from actstore.analysis.crosscoder_reads import crosscoder_stability
from actstore.cli import main
from actstore.errors import ConfigError, NotFoundError
from actstore.sae.config import TrainConfig
from actstore.sae.files import load_sae
from actstore.sae.train import train_sae
from actstore.store.aligned import stacked_activations
from actstore.store.config import Source, parse_sources
from actstore.testing.synthetic import planted_crosscoder, write_crosscoder_store

EXPECTED = {"shared": "shared", "a_only": "a-only", "b_only": "b-only", "weak_a": "changed"}
"""The class a planted atom's latent should get: weak-in-A atoms are in both models, with another weight in A."""


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    pc = planted_crosscoder(
        d=32, n_shared=24, n_a_only=8, n_b_only=8, n_weak_a=8, weak_scale=0.3, k_active=3, seed=0
    )
    path = tmp_path_factory.mktemp("cc") / "cc.zarr"
    write_crosscoder_store(str(path), pc, 20_000, chunk_rows=512)
    return str(path), pc


def _match(sae, pc) -> tuple[np.ndarray, np.ndarray]:
    """For each planted atom: the latent whose (both sources') decoder row is closest, and that cosine."""
    c = sae.cfg
    w = sae.W_dec.detach().double().numpy().reshape(c.d_sae, c.n_sources * c.d_in)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    t = np.concatenate([pc.atoms_a, pc.atoms_b], 1).astype(np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    cos = t @ w.T  # (n_atoms, d_sae)
    return cos.argmax(1), cos.max(1)


def _train(path: str, name: str, **kw):
    base = dict(
        model="a",
        layer=0,
        models="a,b",
        d_sae=96,
        batch_size=256,
        device="cpu",
        task_samples=0,
        name=name,
    )
    return train_sae(path, TrainConfig(**{**base, **kw}), progress=False)


def test_batchtopk_crosscoder_recovers_and_classifies_planted_atoms(planted, one_thread):
    path, pc = planted
    res = _train(path, "btk", arch="batchtopk", k=3, epochs=6)
    best, cos = _match(res.sae, pc)
    assert (cos >= 0.9).mean() >= 0.9, np.round(cos, 2)
    ev = res.metrics["eval"]
    assert [s["source"] for s in ev["sources"]] == ["a@0", "b@0"] and all(
        s["fvu"] < 0.2 for s in ev["sources"]
    )
    diff = diff_crosscoder(
        actstore.open_store(path, writable=True), CrosscoderDiffConfig(sae="btk", device="cpu")
    )
    cls = np.asarray(diff.table["class"].to_list(), dtype=object)[best]
    want = np.asarray([EXPECTED[k] for k in pc.kinds], dtype=object)
    assert (cls == want).mean() >= 0.9, list(zip(pc.kinds, cls, strict=True))
    # Latent Scaling on a batchtopk crosscoder: true one-model atoms are not flagged
    only = np.isin(want, ["a-only", "b-only"])
    assert np.asarray(diff.table["exclusive"].to_list())[best][only].mean() >= 0.85


def test_relu_l1_crosscoder_shows_complete_shrinkage_and_latent_scaling_flags_it(
    planted, one_thread
):
    path, pc = planted
    _train(path, "l1", arch="relu-l1", l1=3e-2, lr=3e-3, epochs=5)
    st = actstore.open_store(path, writable=True)
    sae = load_sae(st, "l1")
    best, cos = _match(sae, pc)
    diff = diff_crosscoder(st, CrosscoderDiffConfig(sae="l1", device="cpu"))
    t = diff.table
    kinds = np.asarray(pc.kinds)
    weak, b_only = best[kinds == "weak_a"], best[kinds == "b_only"]
    ratio = (t["norm_a"].to_numpy() / t["norm_b"].to_numpy())[weak]
    # Complete Shrinkage: the L1 pushes the weak-in-A atoms' A decoder below their true 0.3 share ...
    assert np.median(ratio) < 0.2, ratio
    # ... so the norms call most of them B-only, although model A carries them at 0.3
    weak_cls = np.asarray(t["class"].to_list(), dtype=object)[weak]
    assert (weak_cls == "b-only").mean() >= 0.6, weak_cls
    # Latent Scaling: nu_error measures that 0.3, and flags every one of them; the true B-only atoms stay unflagged
    nu = t["nu_error"].to_numpy()
    shrunk = weak[weak_cls == "b-only"]
    assert np.all(np.abs(nu[shrunk] - 0.3) < 0.15), nu[weak]
    flags = np.asarray(t["flag"].to_list(), dtype=object)
    assert all(
        flags[j] == "complete_shrinkage"
        for j, c in zip(weak, weak_cls, strict=True)
        if c == "b-only"
    )
    assert np.all(np.abs(nu[b_only]) < 0.1) and all(flags[j] is None for j in b_only)
    assert not t.filter(t["latent"].is_in(b_only.tolist()))["exclusive"].is_in([False]).any()


def test_sql_view_and_diff_equal_numpy_from_the_weights(planted, one_thread):
    """crosscoder_latents == decoder norms, relative norm and cosine from the safetensors file, and Latent Scaling's
    betas == a dense numpy least-squares fit over every row."""
    path, pc = planted
    _train(path, "gt", arch="batchtopk", k=3, epochs=1, d_sae=48)
    st = actstore.open_store(path, writable=True)
    diff_crosscoder(st, CrosscoderDiffConfig(sae="gt", device="cpu", batch_rows=3000))
    w = load_file(str(Path(path) / "saes/gt/sae.safetensors"))
    assert (
        w["W_enc"].shape == (2, 32, 48)
        and w["W_dec"].shape == (48, 2, 32)
        and w["b_dec"].shape == (2, 32)
    )
    na, nb = np.linalg.norm(w["W_dec"][:, 0], axis=1), np.linalg.norm(w["W_dec"][:, 1], axis=1)
    cos = (w["W_dec"][:, 0] * w["W_dec"][:, 1]).sum(1) / (na * nb)
    got = actstore.sql(
        actstore.open_store(path),
        "SELECT * FROM crosscoder_latents WHERE sae = 'gt' ORDER BY latent",
    )
    assert got["source_a"][0] == "a@0" and got["source_b"][0] == "b@0"
    np.testing.assert_allclose(got["norm_a"].to_numpy(), na, rtol=1e-5)
    np.testing.assert_allclose(got["norm_b"].to_numpy(), nb, rtol=1e-5)
    np.testing.assert_allclose(got["rel_norm"].to_numpy(), relative_norm(na, nb), rtol=1e-5)
    np.testing.assert_allclose(got["cosine"].to_numpy(), cos, rtol=1e-4, atol=1e-6)
    # Latent Scaling from scratch: every row, dense, numpy
    cfg = json.loads((Path(path) / "saes/gt/cfg.json").read_text())
    sae = load_sae(st, "gt")
    x = stacked_activations(st, [Source("a", 0), Source("b", 0)])[0:20_000]  # (n, 64)
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x)).double().numpy()  # (n, 48)
    s = np.repeat(np.asarray(cfg["norm_scales"]), 32)
    xn = (x * s).reshape(-1, 2, 32)
    x_hat = (f @ w["W_dec"].reshape(48, 64) + w["b_dec"].reshape(64)).reshape(-1, 2, 32)
    dom_b = relative_norm(na, nb) >= 0.5
    u = np.where(dom_b[:, None], w["W_dec"][:, 1], w["W_dec"][:, 0])  # (48, 32)
    f2 = np.where((f * f).sum(0) > 0, (f * f).sum(0), np.nan)  # dead latents: no beta
    for m, src in ((0, "a"), (1, "b")):
        y_err = xn[:, m] - x_hat[:, m]
        beta_err = ((f * (y_err @ u.T)).sum(0) + f2 * (u * w["W_dec"][:, m]).sum(1)) / (
            (u * u).sum(1) * f2
        )
        beta_rec = ((f * (x_hat[:, m] @ u.T)).sum(0) - f2 * (u * w["W_dec"][:, m]).sum(1)) / (
            (u * u).sum(1) * f2
        )
        live = ~np.isnan(f2)
        np.testing.assert_allclose(
            got[f"beta_error_{src}"].to_numpy()[live], beta_err[live], rtol=2e-3, atol=2e-4
        )
        np.testing.assert_allclose(
            got[f"beta_recon_{src}"].to_numpy()[live], beta_rec[live], rtol=2e-3, atol=2e-4
        )
    np.testing.assert_allclose(got["frequency"].to_numpy(), (f > 0).mean(0), rtol=1e-9)


def test_encoded_crosscoder_top_rows_equal_a_dense_numpy_encode(planted, one_thread):
    path, _ = planted
    _train(path, "enc", arch="batchtopk", k=3, epochs=1, d_sae=48)
    st = actstore.open_store(path, writable=True)
    from actstore.encoding.config import EncodeConfig
    from actstore.encoding.encode import encode

    encode(st, EncodeConfig(sae="enc", device="cpu", batch_rows=3000), progress=False)
    sae = load_sae(st, "enc")
    x = stacked_activations(st, [Source("a", 0), Source("b", 0)])[0:20_000]
    with torch.no_grad():
        dense = sae.encode(torch.from_numpy(x)).numpy()  # (n, 48)
    got = actstore.sql(
        actstore.open_store(path), "SELECT row, feature, value FROM features WHERE sae = 'enc'"
    )
    assert got.height == int((dense > 0).sum())
    np.testing.assert_allclose(
        got["value"].to_numpy(), dense[got["row"].to_numpy(), got["feature"].to_numpy()], rtol=1e-5
    )


def test_stability_of_two_seeds(planted, one_thread):
    path, _ = planted
    for seed in (0, 1):
        _train(path, f"s{seed}", arch="batchtopk", k=3, epochs=6, seed=seed)
        diff_crosscoder(
            actstore.open_store(path, writable=True),
            CrosscoderDiffConfig(sae=f"s{seed}", device="cpu"),
        )
    st = actstore.open_store(path)
    same = crosscoder_stability(st, "s0", "s0")
    assert same.matched["b-only"] == 1.0 and same.matched["a-only"] == 1.0
    res = crosscoder_stability(st, "s0", "s1")
    # by hand: B-only latents of s0 whose B decoder row has a B-only partner in s1 at cosine >= 0.7
    d0, d1 = load_crosscoder_diff(st, "s0").table, load_crosscoder_diff(st, "s1").table
    w0 = load_sae(st, "s0").W_dec.detach().view(96, 2, 32)[:, 1].double().numpy()
    w1 = load_sae(st, "s1").W_dec.detach().view(96, 2, 32)[:, 1].double().numpy()
    p0 = (d0["class"] == "b-only").to_numpy()
    p1 = (d1["class"] == "b-only").to_numpy()
    a = w0[p0] / np.linalg.norm(w0[p0], axis=1, keepdims=True)
    b = w1[p1] / np.linalg.norm(w1[p1], axis=1, keepdims=True)
    assert res.matched["b-only"] == pytest.approx(float(((a @ b.T).max(1) >= 0.7).mean()))
    assert res.matched["b-only"] >= 0.75  # planted B-only atoms are found again with another seed
    r = CliRunner().invoke(main, ["crosscoder-stability", path, "--sae", "s0", "--sae", "s1"])
    assert r.exit_code == 0 and "b-only of s0 with a b-only partner in s1" in r.output, r.output


# ---------------------------------------------------------------- resume
class Killed(Exception):
    pass


@pytest.mark.parametrize("arch", ["batchtopk", "relu-l1"])
def test_killed_crosscoder_run_resumes_to_the_same_weights(planted, tmp_path, arch, one_thread):
    import shutil

    path = str(tmp_path / "cc.zarr")
    shutil.copytree(planted[0], path)
    kw = dict(
        arch=arch,
        epochs=2,
        checkpoint_every=9,
        buffer_mb=1,
        d_sae=48,
        **({"k": 3} if arch == "batchtopk" else {}),
    )
    full = _train(path, "full", **kw)

    def die(step, _info):
        if step == 30:
            raise Killed

    with pytest.raises(Killed):
        train_sae(
            path,
            TrainConfig(
                model="a",
                layer=0,
                models="a,b",
                batch_size=256,
                device="cpu",
                task_samples=0,
                name="cut",
                **kw,
            ),
            progress=False,
            on_step=die,
        )
    res = _train(path, "cut", **kw)
    assert res.resumed_from == 27 and res.steps == full.steps
    for key in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        torch.testing.assert_close(
            getattr(res.sae, key), getattr(full.sae, key), rtol=1e-5, atol=1e-6
        )


def test_sigkilled_train_crosscoder_resumes(planted, tmp_path):
    import shutil

    path = str(tmp_path / "cc.zarr")
    shutil.copytree(planted[0], path)
    exe = str(Path(sys.executable).with_name("actstore"))
    cmd = [
        exe,
        "train-crosscoder",
        path,
        "--models",
        "a,b",
        "--layer",
        "0",
        "--k",
        "3",
        "--d-sae",
        "64",
        "--epochs",
        "30",
        "--batch-size",
        "128",
        "--checkpoint-every",
        "10",
        "--name",
        "k",
        "--device",
        "cpu",
        "--quiet",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = Path(path) / "saes/k/checkpoint/state.safetensors"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert (
        "resumed at step" in out.stdout
        and "crosscoder k (batchtopk, 2x32->64, k 3) on a@0, b@0" in out.stdout
    )


# ---------------------------------------------------------------- refusals and sources
def test_sources_parse_and_refusals(planted, tmp_path):
    assert parse_sources("a,b", 3) == [Source("a", 3), Source("b", 3)]
    assert parse_sources("a", "2,4") == [Source("a", 2), Source("a", 4)]
    assert parse_sources("a,b", "1,2") == [Source("a", 1), Source("b", 2)]
    for models, layers, msg in (
        ("a", 3, "at least two"),
        ("a,b,c", "1,2", "3 entries"),
        ("a,a", 1, "must differ"),
    ):
        with pytest.raises(ConfigError, match=msg):
            parse_sources(models, layers)
    path, _ = planted
    st = actstore.open_store(path)
    with pytest.raises(NotFoundError, match="model 'nope'"):
        stacked_activations(st, [Source("a", 0), Source("nope", 0)])
    r = CliRunner().invoke(main, ["diff-crosscoder", path, "--sae", "nope"])
    assert r.exit_code != 0 and "no SAE named 'nope'" in r.output


def test_row_alignment_refused_when_tokenizations_differ(
    two_model_cc_store, tiny_bert_dir, corpus_file
):
    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    path = two_model_cc_store
    cfg = ExtractConfig(
        model=tiny_bert_dir,
        name="short",
        max_length=12,
        new_tokenization=True,
        data=DataConfig(corpus_file),
        layers="1",
        codec="fp32",
        batch_size=8,
        device="cpu",
    )
    extract(path, cfg, progress=False)
    r = CliRunner().invoke(
        main, ["train-crosscoder", path, "--models", "tiny,short", "--layer", "1", "--quiet"]
    )
    assert r.exit_code != 0 and "must share a tokenization" in r.output and "short" in r.output, (
        r.output
    )
    assert not (Path(path) / "saes").exists() or not list((Path(path) / "saes").iterdir())


@pytest.fixture()
def two_model_cc_store(tmp_path, tiny_store, tiny_bert_dir, corpus_file) -> str:
    """The tiny store plus a second, differently initialised model 'other' (same tokenizer) at layers 1-2."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    d = tmp_path / "other"
    torch.manual_seed(1)
    BertModel(BertConfig.from_pretrained(tiny_bert_dir)).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(d)
    extract(
        tiny_store,
        ExtractConfig(
            model=str(d),
            name="other",
            data=DataConfig(corpus_file),
            layers="1-2",
            codec="fp32",
            batch_size=8,
            device="cpu",
        ),
        progress=False,
    )
    return tiny_store


def test_cli_crosscoder_on_real_models(two_model_cc_store):
    """Two tiny real BERTs: train-crosscoder, saes, encode, diff-crosscoder, SQL; a cross-layer one of one model."""
    path = two_model_cc_store
    r = CliRunner().invoke(
        main,
        [
            "train-crosscoder",
            path,
            "--models",
            "tiny,other",
            "--layer",
            "2",
            "--k",
            "4",
            "--d-sae",
            "64",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--name",
            "cc",
            "--quiet",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (
        "crosscoder cc (batchtopk, 2x32->64, k 4) on tiny@2, other@2" in r.output
        and "tiny@2 0." in r.output
    )
    r = CliRunner().invoke(main, ["saes", path, "--format", "json"])
    row = next(x for x in json.loads(r.output) if x["name"] == "cc")
    assert row["kind"] == "crosscoder" and row["sources"] == "tiny@2,other@2"
    assert (
        CliRunner().invoke(main, ["encode", path, "--sae", "cc", "--device", "cpu"]).exit_code == 0
    )
    r = CliRunner().invoke(
        main, ["diff-crosscoder", path, "--sae", "cc", "--top", "3", "--device", "cpu"]
    )
    assert r.exit_code == 0, r.output
    assert "A = tiny@2, B = other@2" in r.output and "after Latent Scaling" in r.output
    got = actstore.sql(
        actstore.open_store(path),
        "SELECT class, count(*) AS n FROM crosscoder_latents GROUP BY class",
    )
    assert int(got["n"].sum()) == 64
    tt = actstore.top_tokens(actstore.open_store(path), 0, sae="cc", n=3)
    assert tt.height <= 3
    r = CliRunner().invoke(main, ["diff-features", path, "--sae", "cc", "--sae", "cc"])
    assert r.exit_code != 0 and "is a crosscoder" in r.output
    r = CliRunner().invoke(
        main,
        ["export-sae", path, "cc", "--format", "saelens", "--out", str(Path(path).parent / "x")],
    )
    assert r.exit_code != 0 and "crosscoder" in r.output
    # token views: a latent as each model sees it, its activation times its decoder norm there
    from actstore.analysis.config import ReportConfig, ShowConfig
    from actstore.analysis.show import token_views
    from actstore.paper.report import report

    st = actstore.open_store(path)
    sid = st.samples()["id"][0]
    feat = int(actstore.top_features(st, sae="cc", n=1)["feature"][0])
    tv = token_views(
        st, ShowConfig(saes=["cc"], features=[feat], sample_ids=[sid], models=["tiny", "other"])
    )
    sae = load_sae(st, "cc")
    s0 = st.samples().row(0, named=True)
    x = stacked_activations(st, [Source("tiny", 2), Source("other", 2)])[
        s0["first_row"] : s0["first_row"] + s0["n_tokens"]
    ]
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x))[:, feat].numpy()
    norms = sae.decoder_norms()[feat].numpy()
    np.testing.assert_allclose(tv.values[0][0], f * norms[0], rtol=1e-5)
    np.testing.assert_allclose(tv.values[0][1], f * norms[1], rtol=1e-5)
    # the report: section 6 with the saved diff's counts
    rep = report(path, ReportConfig(out=str(Path(path).parent / "rep"), models=("tiny", "other")))
    assert "crosscoders" in rep.sections
    row = next(r for r in rep.data["crosscoders"] if r["crosscoder"] == "cc")
    assert row["b-only"] == int(got.filter(got["class"] == "b-only")["n"].sum())
    assert "7. Crosscoders" in Path(rep.html).read_text()
    # cross-layer: one model, two layers, the same code
    r = CliRunner().invoke(
        main,
        [
            "train-crosscoder",
            path,
            "--models",
            "other",
            "--layers",
            "1,2",
            "--k",
            "4",
            "--d-sae",
            "48",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--quiet",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0 and "on other@1, other@2" in r.output, r.output
