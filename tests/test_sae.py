"""The SAE module: architectures, persistence, listing and SAELens export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import actstore
from actstore.errors import ConfigError, NotFoundError
from actstore.sae.config import SAEConfig
from actstore.sae.export import export_sae
from actstore.sae.files import list_saes, read_metrics, save_sae
from actstore.sae.model import SAE, check_d_in


def make(
    arch: str, d_in: int = 16, d_sae: int = 48, k: int | None = 4, scale: float = 1.0, seed: int = 0
) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(
        SAEConfig(
            arch,
            d_in,
            d_sae,
            k=None if arch == "relu-l1" else k,
            norm_scale=scale,
            model="m",
            layer=1,
            name="s",
        )
    )
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    return sae


def test_relu_l1_matches_the_formula():
    sae = make("relu-l1", scale=2.5)
    x = torch.randn(10, 16)
    out = sae(x)
    xn = x * 2.5
    h = torch.relu((xn - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(out.acts, h)
    torch.testing.assert_close(out.x_hat, (h @ sae.W_dec + sae.b_dec) / 2.5)
    assert sae.W_enc.shape == (16, 48) and sae.W_dec.shape == (48, 16)


def test_topk_keeps_exactly_k():
    sae = make("topk", k=5)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive
    acts = sae.encode(torch.randn(64, 16))
    assert ((acts > 0).sum(-1) == 5).all()
    # the kept ones are the k largest pre-activations
    pre = sae.pre_acts(torch.randn(8, 16))
    a = sae.activate(pre)
    top = pre.topk(5, dim=-1).indices
    assert torch.equal(torch.sort(a.topk(5, dim=-1).indices, -1).values, torch.sort(top, -1).values)
    # with few positive pre-activations it keeps at most k, never a negative one
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
        sae.b_enc[:2] = 100.0
    assert ((sae.encode(torch.randn(32, 16)) > 0).sum(-1) == 2).all()


def test_batchtopk_train_and_inference():
    sae = make("batchtopk", k=3)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
    x = torch.randn(20, 16)
    pre = sae.pre_acts(x)
    acts = sae.activate(pre, train=True)
    assert int((acts > 0).sum()) == 3 * 20  # k * batch over the whole batch
    # the top k * batch over the whole batch, not k per token: a token with large pre-activations takes more
    loud = pre.clone()
    loud[0] += 100.0
    per_token = (sae.activate(loud, train=True) > 0).sum(-1)
    assert (
        int(per_token[0]) == sae.cfg.d_sae
        and int(per_token.sum()) == 3 * 20
        and int(per_token[1:].min()) < 3
    )
    # inference with a learned threshold: keep pre-activations above it
    sae.threshold.fill_(10.5)
    inf = sae.activate(pre, train=False)
    torch.testing.assert_close(inf, torch.where(pre > 10.5, pre, torch.zeros_like(pre)))
    # no threshold learned yet: per-token top-k
    sae.threshold.fill_(0.0)
    assert ((sae.encode(x) > 0).sum(-1) == 3).all()


def test_decoder_norm_helpers():
    sae = make("topk")
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grads()
    dots = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert dots.abs().max() < 1e-5  # no component along the (unit) rows
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.set_decoder_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown SAE architecture"):
        SAEConfig("gated", 8, 16)
    with pytest.raises(ConfigError, match="--k between 1 and d_sae"):
        SAEConfig("topk", 8, 16, k=17)
    with pytest.raises(ConfigError, match="d_model 32"):
        check_d_in(SAEConfig("relu-l1", 16, 32, model="m", layer=2), 32, "layer 2 of model 'm'")


def test_bytes_round_trip_and_bad_shapes():
    sae = make("batchtopk", scale=1.7)
    sae.threshold.fill_(0.25)
    w, c = sae.to_bytes()
    back = SAE.from_bytes(w, c)
    x = torch.randn(5, 16)
    torch.testing.assert_close(back(x).x_hat, sae(x).x_hat)
    assert float(back.threshold) == 0.25 and back.cfg == sae.cfg
    other = make("relu-l1", d_in=8)
    with pytest.raises(ConfigError, match="W_enc should have shape"):
        SAE.from_bytes(other.to_bytes()[0], c)


def test_save_list_and_load(tiny_store):
    st = actstore.open_store(tiny_store, writable=True)
    assert actstore.sae_names(st) == [] and list_saes(st).height == 0
    sae = make("topk", d_in=32, d_sae=64)
    sae.cfg.name = "mine"
    save_sae(
        st,
        sae,
        "mine",
        metrics={
            "eval": {"fvu": 0.25, "l0": 4.0, "dead_fraction": 0.1},
            "train": {"dead_fraction": 0.3},
            "tokens": 99,
        },
    )
    assert actstore.sae_names(st) == ["mine"]
    df = list_saes(st)
    row = df.row(0, named=True)
    assert (
        row["name"],
        row["arch"],
        row["d_sae"],
        row["fvu"],
        row["l0"],
        row["dead"],
        row["tokens"],
    ) == (
        "mine",
        "topk",
        64,
        0.25,
        4.0,
        0.1,
        99,
    )
    # the trainer's window; not encoded
    assert row["dead_window"] == 0.3 and row["dead_store"] is None
    assert read_metrics(st, "mine")["tokens"] == 99
    loaded = actstore.load_sae(st, "mine")
    torch.testing.assert_close(loaded.W_dec, sae.W_dec)
    with pytest.raises(NotFoundError, match="no SAE named 'nope'.*actstore train"):
        actstore.load_sae(st, "nope")


@pytest.mark.parametrize("arch", ["relu-l1", "topk", "batchtopk"])
def test_saelens_export_round_trip(tiny_store, tmp_path, arch):
    """Exported weights, read with plain safetensors + numpy, reproduce the SAE on raw activations."""
    st = actstore.open_store(tiny_store, writable=True)
    sae = make(arch, d_in=32, d_sae=64, scale=0.37)
    if arch == "batchtopk":
        sae.threshold.fill_(0.2)
    save_sae(st, sae, "exp")
    files = export_sae(st, "exp", tmp_path / "out")
    assert sorted(f.name for f in files) == ["cfg.json", "sae_weights.safetensors"]
    t = load_file(str(tmp_path / "out" / "sae_weights.safetensors"))
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert t["W_enc"].shape == (32, 64) and t["W_dec"].shape == (64, 32)
    assert t["b_enc"].shape == (64,) and t["b_dec"].shape == (32,)
    assert (cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"]) == (32, 64, "none")
    assert (
        cfg["architecture"]
        == {"relu-l1": "standard", "topk": "topk", "batchtopk": "jumprelu"}[arch]
    )
    x = st.activations("tiny", 1)[:200]  # (200, 32) raw activations
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if arch == "relu-l1":
        h = np.maximum(pre, 0)
    elif arch == "topk":
        k = cfg["k"]
        h = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=1)[:, :k]
        np.put_along_axis(h, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
    else:
        h = np.where(pre > t["threshold"], pre, 0)
    x_hat = h @ t["W_dec"] + t["b_dec"]
    with torch.no_grad():
        out = sae(torch.from_numpy(x))
    np.testing.assert_allclose(h, out.acts.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x_hat, out.x_hat.numpy(), rtol=1e-4, atol=1e-4)
    # actstore format: a byte copy that loads back
    export_sae(st, "exp", tmp_path / "raw", fmt="actstore")
    back = SAE.from_bytes(
        (tmp_path / "raw" / "sae.safetensors").read_bytes(),
        (tmp_path / "raw" / "cfg.json").read_bytes(),
    )
    torch.testing.assert_close(back.W_enc, sae.W_enc)
    with pytest.raises(ConfigError, match="unknown export format"):
        export_sae(st, "exp", tmp_path / "x", fmt="onnx")
