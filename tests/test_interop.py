"""Issue 16: SAELens and sparsify SAEs in (saved by the real libraries), delphi and Neuronpedia out, bad inputs refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.encoding.config import EncodeConfig
from actstore.encoding.encode import encode
from actstore.errors import ConfigError, NotFoundError
from actstore.query.config import FeatureExportConfig
from actstore.query.exports import export_features
from actstore.query.lookups import token_context, top_tokens
from actstore.query.tables import lazy_features
from actstore.sae.config import ImportConfig
from actstore.sae.files import sae_names
from actstore.sae.imports import import_sae

D_IN, D_SAE = 32, 64  # the tiny BERT's width; the SAEs' width


def _rows(store: str, layer: int) -> np.ndarray:
    return actstore.open_store(store).activations("tiny", layer)[:]  # (n_rows, d_in)


def _dense_features(store: str, name: str, n_rows: int) -> np.ndarray:
    """actstore's encoded feature table of SAE ``name`` as a dense ``(n_rows, d_sae)`` matrix."""
    st = actstore.open_store(store, writable=True)
    encode(st, EncodeConfig(sae=name, n_buckets=3), progress=False)
    df = lazy_features(actstore.open_store(store), name).collect()
    out = np.zeros((n_rows, D_SAE), np.float32)
    out[df["row"].to_numpy(), df["feature"].to_numpy()] = df["value"].to_numpy()
    return out


def _perturb(sae: torch.nn.Module, seed: int) -> None:
    """Non-trivial biases and decoder norms, so every folded term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
            if name == "W_dec":
                p.mul_(0.5 + torch.rand(p.shape[0], 1, generator=g))


# ---------------------------------------------------------------- SAELens in
def _saelens_sae(arch: str, hook: str, seed: int = 0):
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(seed)
    meta = sae_lens.saes.sae.SAEMetadata(hook_name=hook, model_name="tiny")
    if arch == "standard":
        sae = sae_lens.StandardSAE(
            sae_lens.StandardSAEConfig(
                d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False, metadata=meta
            )
        )
    elif arch == "topk":
        sae = sae_lens.TopKSAE(
            sae_lens.TopKSAEConfig(
                d_in=D_IN, d_sae=D_SAE, k=5, rescale_acts_by_decoder_norm=True, metadata=meta
            )
        )
    elif arch == "jumprelu":
        sae = sae_lens.JumpReLUSAE(
            sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta)
        )
    elif arch == "matryoshka_batchtopk":  # saved as its BatchTopK is
        sae = sae_lens.MatryoshkaBatchTopKTrainingSAE(
            sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=D_IN, d_sae=D_SAE, k=5, matryoshka_widths=[16, 32, D_SAE], metadata=meta
            )
        )
    else:  # batchtopk, as its trainer saves it (save_model: topk_threshold, decoder norms rescaled at encode)
        sae = sae_lens.BatchTopKTrainingSAE(
            sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, metadata=meta)
        )
    _perturb(sae, seed)
    with torch.no_grad():
        if arch == "jumprelu":
            sae.threshold.copy_(0.05 + 0.2 * torch.rand(D_SAE))
        if arch in ("batchtopk", "matryoshka_batchtopk"):
            sae.topk_threshold.fill_(0.15)
    return sae


@pytest.mark.parametrize(
    "arch", ["standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk"]
)
def test_saelens_sae_saved_by_saelens_encodes_as_saelens_does(tiny_store, tmp_path, arch):
    sae = _saelens_sae(arch, "blocks.1.hook_resid_pre")
    folder = tmp_path / "sl"
    sae.save_model(folder)
    res = import_sae(
        tiny_store, ImportConfig(path=str(folder), format="saelens", name=f"sl-{arch}", force=True)
    )
    # blocks.1.hook_resid_pre = hidden_states[1]
    assert res.cfg.layer == 1 and res.cfg.model == "tiny"
    assert res.cfg.arch == {"standard": "relu-l1"}.get(arch, arch.replace("_", "-"))
    x = _rows(tiny_store, 1)
    with torch.no_grad():
        if arch in (
            "batchtopk",
            "matryoshka_batchtopk",
        ):  # its inference form: a JumpReLU at the batch threshold
            pre = sae.hook_sae_acts_pre(
                sae.process_sae_in(torch.from_numpy(x)) @ sae.W_enc + sae.b_enc
            )
            pre = pre * sae.W_dec.norm(dim=-1)
            want = torch.where(
                pre > sae.topk_threshold, torch.relu(pre), torch.zeros_like(pre)
            ).numpy()
        else:
            want = sae.encode(torch.from_numpy(x)).numpy()  # (n_rows, d_sae)
    got = _dense_features(tiny_store, f"sl-{arch}", len(x))
    assert (want > 0).sum() > 0.02 * want.size  # a real test: features fire
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    m = actstore.read_metrics(actstore.open_store(tiny_store), f"sl-{arch}")
    assert m["imported"]["format"] == "saelens" and m["eval"]["n_tokens"] == len(x)


def test_saelens_resid_post_maps_to_the_next_hidden_state_and_a_fitting_sae_is_accepted(
    tiny_store, tmp_path
):
    """An actstore SAE exported to SAELens and imported back fits (FVU < 1, no --force) with the same FVU."""
    from actstore.sae.config import TrainConfig
    from actstore.sae.export import export_sae
    from actstore.sae.metrics import evaluate
    from actstore.sae.train import train_sae

    train_sae(
        tiny_store,
        TrainConfig(
            model="tiny",
            layer=2,
            arch="topk",
            k=4,
            d_sae=D_SAE,
            epochs=2,
            batch_size=64,
            name="own",
            device="cpu",
            task_samples=0,
        ),
        progress=False,
    )
    st = actstore.open_store(tiny_store, writable=True)
    export_sae(st, "own", tmp_path / "exp", "saelens")
    cfg = json.loads((tmp_path / "exp" / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = (
        "blocks.1.hook_resid_post"  # the output of block 1 = hidden_states[2]
    )
    (tmp_path / "exp" / "cfg.json").write_text(json.dumps(cfg))
    res = import_sae(st, ImportConfig(path=str(tmp_path / "exp"), format="saelens", name="back"))
    assert res.cfg.layer == 2
    want = evaluate(actstore.load_sae(st, "own"), torch.from_numpy(_rows(tiny_store, 2)))
    assert res.eval["fvu"] == pytest.approx(want["fvu"], rel=1e-4) and res.eval["fvu"] < 1
    assert "back" in actstore.list_saes(st)["name"].to_list()


# ---------------------------------------------------------------- sparsify in and out
def test_sparsify_sae_saved_by_sparsify_encodes_as_sparsify_does(tiny_store, tmp_path):
    sparsify = pytest.importorskip("sparsify")
    torch.manual_seed(0)
    sae = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=6))
    _perturb(sae, 1)
    folder = tmp_path / "run" / "layers.1"  # sparsify names the folder after the hook point
    sae.save_to_disk(folder)
    res = import_sae(
        tiny_store, ImportConfig(path=str(folder), format="sparsify", name="sp", force=True)
    )
    assert (
        res.cfg.layer == 2 and res.cfg.arch == "topk" and res.cfg.k == 6
    )  # layers.1 output = hidden_states[2]
    x = _rows(tiny_store, 2)
    with torch.no_grad():
        out = sae.encode(torch.from_numpy(x))
    want = np.zeros((len(x), D_SAE), np.float32)
    np.put_along_axis(want, out.top_indices.numpy(), out.top_acts.numpy(), axis=1)
    np.testing.assert_allclose(
        _dense_features(tiny_store, "sp", len(x)), want, atol=1e-5, rtol=1e-5
    )

    # and back out: export-sae --format sparsify loads in sparsify with the same encoding
    runner = CliRunner()
    r = runner.invoke(
        main,
        ["export-sae", tiny_store, "sp", "--format", "sparsify", "--out", str(tmp_path / "out")],
    )
    assert r.exit_code == 0, r.output
    again = sparsify.SparseCoder.load_from_disk(tmp_path / "out")
    with torch.no_grad():
        o2 = again.encode(torch.from_numpy(x))
    assert torch.equal(o2.top_indices, out.top_indices)
    torch.testing.assert_close(o2.top_acts, out.top_acts, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bad inputs: one line, nothing written
def _saelens_folder(tmp_path: Path, **edit) -> Path:
    sae = _saelens_sae("standard", "blocks.1.hook_resid_pre")
    folder = tmp_path / "bad"
    sae.save_model(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    for k, v in edit.items():
        if v is None:
            cfg.pop(k, None)
        elif k == "hook_name":
            cfg["metadata"]["hook_name"] = v
        else:
            cfg[k] = v
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("pickle", "pickle-based weights are never loaded"),
        ("width", "reads d_in 16"),
        ("hook-past-the-model", "has 3 layers"),
        ("hook-not-residual", "not a residual-stream state"),
        ("missing-field", "has no 'd_sae'"),
        ("does-not-fit", "does not fit"),
        ("wrong-format", "pass --format saelens"),
    ],
)
def test_bad_imports_are_one_line_errors_with_nothing_written(tiny_store, tmp_path, case, message):
    if case == "pickle":
        folder = tmp_path / "pkl"
        folder.mkdir()
        torch.save({"W_enc": torch.zeros(2)}, folder / "sae_weights.pt")
        (folder / "cfg.json").write_text("{}")
    elif case == "width":
        sae_lens = pytest.importorskip("sae_lens")
        folder = tmp_path / "w16"
        meta = sae_lens.saes.sae.SAEMetadata(hook_name="blocks.1.hook_resid_pre")
        sae_lens.StandardSAE(
            sae_lens.StandardSAEConfig(d_in=16, d_sae=D_SAE, metadata=meta)
        ).save_model(folder)
    elif case == "hook-past-the-model":
        folder = _saelens_folder(tmp_path, hook_name="blocks.7.hook_resid_post")
    elif case == "hook-not-residual":
        folder = _saelens_folder(tmp_path, hook_name="blocks.1.hook_mlp_out")
    elif case == "missing-field":
        folder = _saelens_folder(tmp_path, d_sae=None)
    elif case == "does-not-fit":
        folder = _saelens_folder(tmp_path)  # random weights: FVU far above 1
    else:
        folder = _saelens_folder(tmp_path)
    before = sorted(p.relative_to(tiny_store) for p in Path(tiny_store).rglob("*"))
    fmt = "sparsify" if case == "wrong-format" else "saelens"
    r = CliRunner().invoke(main, ["import-sae", tiny_store, str(folder), "--format", fmt])
    assert r.exit_code != 0
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("Error: ") and message in line, r.output
    assert (
        sorted(p.relative_to(tiny_store) for p in Path(tiny_store).rglob("*")) == before
    )  # nothing written
    with pytest.raises((ConfigError, NotFoundError)):
        import_sae(tiny_store, ImportConfig(path=str(folder), format=fmt))
    assert sae_names(actstore.open_store(tiny_store)) == []


# ---------------------------------------------------------------- delphi and Neuronpedia out
@pytest.fixture()
def encoded(tiny_store):
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae

    train_sae(
        tiny_store,
        TrainConfig(
            model="tiny",
            layer=2,
            arch="topk",
            k=4,
            d_sae=D_SAE,
            epochs=1,
            batch_size=64,
            name="s",
            device="cpu",
            task_samples=0,
        ),
        progress=False,
    )
    encode(
        actstore.open_store(tiny_store, writable=True),
        EncodeConfig(sae="s", n_buckets=3),
        progress=False,
    )
    return tiny_store


def test_delphi_cache_points_at_the_right_tokens(encoded, tmp_path):
    from safetensors.numpy import load_file

    st = actstore.open_store(encoded)
    res = export_features(
        st, FeatureExportConfig(sae="s", format="delphi", out=str(tmp_path / "latents"), n_splits=3)
    )
    hook = tmp_path / "latents" / "layers.1"  # hidden_states[2] = output of block 1
    cfg = json.loads((hook / "config.json").read_text())
    assert (
        cfg["n_splits"] == 3
        and cfg["actstore"]["sae"] == "s"
        and {"cache_ctx_len", "model_name"} <= set(cfg)
    )
    table = lazy_features(st, "s").collect()
    ctx = token_context(st)
    ids = np.asarray(ctx.token_id[:], dtype=np.int64)
    seen = []
    files = sorted(hook.glob("*.safetensors"), key=lambda p: int(p.name.split("_")[0]))
    bounds = np.linspace(0, D_SAE, 4).astype(int)
    assert [p.name for p in files] == [
        f"{a}_{b - 1}.safetensors" for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    for f in files:
        data = load_file(str(f))  # as delphi's TensorBuffer.load reads it
        first_latent = int(f.name.split("_")[0])
        loc = data["locations"].astype(np.int64)
        loc[:, 2] += first_latent
        tokens = data["tokens"]
        assert (
            tokens.shape[0] == len(ctx.first_row) and tokens.shape[1] % 32 == 0
        )  # delphi's example length divides it
        assert int(ctx.n_tokens.max()) <= tokens.shape[1] < int(ctx.n_tokens.max()) + 32
        rows = ctx.first_row[loc[:, 0]] + loc[:, 1]  # (sample, position) -> the store's token row
        assert (loc[:, 1] < ctx.n_tokens[loc[:, 0]]).all()
        # the location's token is the row's token
        assert (tokens[loc[:, 0], loc[:, 1]] == ids[rows]).all()
        seen.append(np.stack([rows, loc[:, 2], data["activations"].astype(np.float32)], axis=1))
    got = np.concatenate(seen)
    got = got[np.lexsort((got[:, 1], got[:, 0]))]
    want = table.sort(["row", "feature"]).select("row", "feature", "value").to_numpy()
    assert got.shape == want.shape == (res.n_entries, 3)
    np.testing.assert_array_equal(got[:, :2], want[:, :2])
    np.testing.assert_allclose(got[:, 2], want[:, 2], rtol=1e-3)  # delphi stores float16


NEURONPEDIA_FEATURE_KEYS = {
    "feature_index",
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_pearson",
    "correlated_neurons_l1",
    "correlated_features_indices",
    "correlated_features_pearson",
    "correlated_features_l1",
    "neg_str",
    "neg_values",
    "pos_str",
    "pos_values",
    "frac_nonzero",
    "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values",
    "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values",
    "decoder_weights_dist",
    "activations",
}
"""Every feature field Neuronpedia's convert-saedashboard-to-neuronpedia-export.py reads."""
NEURONPEDIA_ACTIVATION_KEYS = {
    "tokens",
    "values",
    "bin_min",
    "bin_max",
    "bin_contains",
    "qualifying_token_index",
}


def test_neuronpedia_batches_follow_the_layout_and_show_top_tokens(encoded, tmp_path):
    st = actstore.open_store(encoded)
    out = tmp_path / "np"
    r = CliRunner().invoke(
        main,
        [
            "export-features",
            encoded,
            "--sae",
            "s",
            "--format",
            "neuronpedia",
            "--out",
            str(out),
            "--top-n",
            "5",
            "--context",
            "3",
            "--features-per-batch",
            "16",
        ],
    )
    assert r.exit_code == 0, r.output
    stats = {
        d["feature"]: d
        for d in actstore.sql(st, "SELECT feature, n_active FROM feature_stats").to_dicts()
    }
    n_rows = len(st.activations("tiny", 2))
    batches = sorted(out.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    features = []
    for b in batches:
        data = json.loads(b.read_text())
        assert {"model_id", "layer", "sae_set", "sae_id_suffix", "features"} <= set(data) and data[
            "layer"
        ] == 2
        assert len(data["features"]) <= 16
        features += data["features"]
    assert [f["feature_index"] for f in features] == sorted(
        k for k, v in stats.items() if v["n_active"] > 0
    )
    for f in features:
        assert set(f) >= NEURONPEDIA_FEATURE_KEYS
        assert f["frac_nonzero"] == pytest.approx(stats[f["feature_index"]]["n_active"] / n_rows)
        assert sum(f["freq_hist_data_bar_heights"]) == stats[f["feature_index"]]["n_active"]
        top = top_tokens(st, f["feature_index"], sae="s", n=5)
        assert len(f["activations"]) == top.height
        for a, want in zip(f["activations"], top.iter_rows(named=True), strict=True):
            assert (
                set(a) >= NEURONPEDIA_ACTIVATION_KEYS and len(a["tokens"]) == len(a["values"]) <= 7
            )
            i = a["qualifying_token_index"]
            assert a["tokens"][i] == want["token"] and a["values"][i] == pytest.approx(
                want["value"]
            )
            # a neighbour may fire more strongly (a higher-ranked hit in the same window), never above the top hit
            assert max(a["values"]) <= top["value"].max() + 1e-5


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("relu-l1", {}),
        ("topk", {"k": 4}),
        ("batchtopk", {"k": 4}),
        ("matryoshka-batchtopk", {"k": 4}),
    ],
)
def test_an_actstore_sae_exported_to_saelens_loads_in_saelens_and_encodes_the_same(
    tiny_store, tmp_path, arch, extra
):
    """SAELens itself loads the export (``SAE.load_from_disk``) and its ``encode`` equals actstore's to 1e-5."""
    sae_lens = pytest.importorskip("sae_lens")
    from actstore.sae.config import TrainConfig
    from actstore.sae.export import export_sae
    from actstore.sae.files import load_sae
    from actstore.sae.train import train_sae

    train_sae(tiny_store, TrainConfig(model="tiny", layer=2, arch=arch, d_sae=D_SAE, tokens=3000, batch_size=128,
                                      name="ours", device="cpu", **extra), progress=False)  # fmt: skip
    st = actstore.open_store(tiny_store)
    export_sae(st, "ours", tmp_path / "sl", "saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"), device="cpu")
    x = torch.from_numpy(_rows(tiny_store, 2))
    with torch.no_grad():
        want = load_sae(st, "ours").encode(x).numpy()
        got = theirs.encode(x).numpy()
    assert (want > 0).sum() > 0.01 * want.size
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
