"""Matryoshka BatchTopK (``--arch matryoshka-batchtopk``): its loss is BatchTopK's plus each inner prefix's
reconstruction MSE, computed by hand here; it trains, encodes and exports as a BatchTopK SAE; its widths are
checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import one_line_error

import actstore
from actstore.cli import main
from actstore.errors import ConfigError
from actstore.sae.config import SAEConfig, TrainConfig
from actstore.sae.loss import sae_loss
from actstore.sae.model import SAE


def test_the_loss_adds_each_inner_prefixs_reconstruction():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch="matryoshka-batchtopk", d_in=8, d_sae=16, k=3))
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.3)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(6, 8)
    widths = [4, 8, 16]
    parts = sae_loss(sae, x, None, 0.0, 4, 1 / 32, {"matryoshka_widths": widths})
    # by hand, dense: the batch top-k activations, the whole reconstruction and each inner prefix's
    acts = sae.activate(sae.pre_acts(x), train=True)  # (6, 16)
    xn = x * sae.scale
    whole = ((acts @ sae.W_dec + sae.b_dec - xn) ** 2).mean()
    inner = sum(((acts[:, :w] @ sae.W_dec[:w] + sae.b_dec - xn) ** 2).mean() for w in widths[:-1])
    torch.testing.assert_close(parts.mse, whole, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts.loss, whole + inner, rtol=1e-5, atol=1e-7)
    plain = sae_loss(sae, x, None, 0.0, 4, 1 / 32, None)  # without widths: BatchTopK's loss
    torch.testing.assert_close(plain.loss, whole, rtol=1e-5, atol=1e-7)


def test_widths_are_resolved_and_checked():
    cfg = TrainConfig(model="m", layer=1, arch="matryoshka-batchtopk", d_sae=100, k=4)
    assert cfg.resolve(32).matryoshka_widths == [6, 12, 25, 50, 100]
    given = TrainConfig(
        model="m", layer=1, arch="matryoshka-batchtopk", d_sae=100, k=4, matryoshka_widths=[10, 40]
    )
    assert given.resolve(32).matryoshka_widths == [10, 40, 100]
    with pytest.raises(ConfigError, match="must increase"):
        TrainConfig(
            model="m", layer=1, arch="matryoshka-batchtopk", k=4, matryoshka_widths=[40, 10]
        )
    with pytest.raises(
        ConfigError, match="--matryoshka-widths is for --arch matryoshka-batchtopk, not topk"
    ):
        TrainConfig(model="m", layer=1, arch="topk", k=4, matryoshka_widths=[10])
    with pytest.raises(ConfigError, match="for SAEs"):
        TrainConfig(model="m", layer=1, models="a,b", arch="matryoshka-batchtopk", k=4)


def test_trains_encodes_and_exports_as_batchtopk_does(tiny_store, tmp_path):
    run = CliRunner().invoke(main, ["train", tiny_store, "--model", "tiny", "--layer", "2", "--arch",
                                    "matryoshka-batchtopk", "--d-sae", "32", "--k", "4", "--matryoshka-widths",
                                    "8,16", "--tokens", "4000", "--batch-size", "128", "--name", "m", "--device",
                                    "cpu", "--quiet"])  # fmt: skip
    assert run.exit_code == 0, run.output
    cfg = json.loads((Path(tiny_store) / "saes" / "m" / "cfg.json").read_text())
    assert cfg["arch"] == "matryoshka-batchtopk" and cfg["training"]["matryoshka_widths"] == [
        8,
        16,
        32,
    ]
    assert CliRunner().invoke(main, ["encode", tiny_store, "--sae", "m", "--quiet"]).exit_code == 0
    assert (
        actstore.sql(
            actstore.open_store(tiny_store), "SELECT count(*) AS n FROM features WHERE sae = 'm'"
        )["n"][0]
        > 0
    )
    out = tmp_path / "exp"
    r = CliRunner().invoke(
        main, ["export-sae", tiny_store, "m", "--format", "saelens", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert (
        json.loads((out / "cfg.json").read_text())["architecture"] == "jumprelu"
    )  # as SAELens saves its own
    one_line_error(
        CliRunner().invoke(
            main,
            [
                "train",
                tiny_store,
                "--model",
                "tiny",
                "--layer",
                "2",
                "--arch",
                "topk",
                "--matryoshka-widths",
                "8",
                "--k",
                "4",
            ],
        ),  # fmt: skip
        "matryoshka",
    )


def test_matryoshka_keeps_parent_latents_that_batchtopk_absorbs_into_children(tmp_path):
    """A planted hierarchy (a child fires only with its parent) under sparsity pressure (k below the active atoms):
    BatchTopK absorbs parents into their children, so no latent detects a parent well; Matryoshka, whose first
    latents must reconstruct alone, keeps better parent detectors (mean best F1 over parents, held-out rows)."""
    from actstore.sae.train import train_sae
    from actstore.testing.synthetic import parent_f1, planted_hierarchy, write_synthetic_store

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        h = planted_hierarchy(d=48, n_parents=8, n_children=4, seed=0)
        x, _ = h.rows(40_000, seed=1)
        path = str(tmp_path / "h.zarr")
        write_synthetic_store(path, [x], len(x), 48, chunk_rows=1024)
        test_x, test_active = h.rows(4000, seed=2)
        f1 = {}
        for arch, extra in (
            ("batchtopk", {}),
            ("matryoshka-batchtopk", {"matryoshka_widths": [8]}),
        ):
            cfg = TrainConfig(model="synth", layer=0, arch=arch, d_sae=40, k=2, epochs=5, batch_size=256,
                              device="cpu", name=arch, optimizer="adam", **extra)  # fmt: skip
            sae = train_sae(path, cfg, progress=False).sae
            with torch.no_grad():
                f1[arch] = float(
                    parent_f1(sae.encode(torch.from_numpy(test_x)).numpy(), test_active).mean()
                )
    finally:
        torch.set_num_threads(n)
    assert f1["batchtopk"] < 0.7, f1  # absorption is there to resist
    assert f1["matryoshka-batchtopk"] >= f1["batchtopk"] + 0.05, f1


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, one_thread):
    from actstore.sae.train import train_sae
    from actstore.testing.synthetic import planted_dictionary, write_synthetic_store

    pd = planted_dictionary(n_atoms=48, d=24, k_active=3, seed=0)
    path = str(tmp_path / "p.zarr")
    write_synthetic_store(path, pd.rows(8192), 8192, 24, chunk_rows=1024)

    def cfg(name: str) -> TrainConfig:
        return TrainConfig(model="synth", layer=0, arch="matryoshka-batchtopk", d_sae=64, k=3, epochs=2,
                           batch_size=256, checkpoint_every=9, buffer_mb=1, device="cpu", task_samples=0,
                           matryoshka_widths=[8, 32], name=name)  # fmt: skip

    full = train_sae(path, cfg("full"), progress=False)

    def die(step, _info):
        if step == 30:
            raise Killed

    with pytest.raises(Killed):
        train_sae(path, cfg("cut"), progress=False, on_step=die)
    res = train_sae(path, cfg("cut"), progress=False)
    assert res.resumed_from == 27 and res.steps == full.steps
    assert res.sae.cfg.training["matryoshka_widths"] == [8, 32, 64]
    for key in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        torch.testing.assert_close(
            getattr(res.sae, key), getattr(full.sae, key), rtol=1e-5, atol=1e-6
        )
