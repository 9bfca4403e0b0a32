"""SAE sweeps (issue 14, part 3): every (model, layer, d_sae) as its own resumable run, here or as Ray tasks."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.errors import ConfigError
from actstore.sae.combos import sweep_configs
from actstore.sae.config import TrainConfig
from actstore.sae.sweep import run_sweep
from actstore.sae.train import train_sae

BASE = TrainConfig(
    model="tiny",
    layer=1,
    arch="topk",
    k=4,
    epochs=1,
    batch_size=64,
    device="cpu",
    threads=1,
    seed=3,
    task_samples=0,
    checkpoint_every=0,
)
NAMES = ["tiny-l1-topk-16", "tiny-l1-topk-24", "tiny-l2-topk-16", "tiny-l2-topk-24"]


def _weights(store: str, name: str) -> dict[str, torch.Tensor]:
    return actstore.load_sae(actstore.open_store(store), name).state_dict()


@pytest.fixture()
def two_stores(tmp_path, tiny_store_ro) -> tuple[str, str]:
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    shutil.copytree(tiny_store_ro, a)
    shutil.copytree(tiny_store_ro, b)
    return str(a), str(b)


def test_sweep_configs_cover_every_combination_and_refuse_one_name():
    cfgs = sweep_configs(BASE, ["tiny"], [1, 2], [16, 24])
    assert [(c.model, c.layer, c.d_sae) for c in cfgs] == [
        ("tiny", 1, 16),
        ("tiny", 1, 24),
        ("tiny", 2, 16),
        ("tiny", 2, 24),
    ]
    with pytest.raises(ConfigError, match="--name names one SAE"):
        sweep_configs(TrainConfig(model="tiny", layer=1, name="x"), ["tiny"], [1, 2], [16])


def test_a_sweep_run_equals_the_same_single_train(two_stores):
    a, b = two_stores
    runs = run_sweep(
        a, sweep_configs(BASE, ["tiny"], [1, 2], [16, 24]), progress=False, log=lambda s: None
    )
    assert [r.name for r in runs] == NAMES and not any(r.skipped for r in runs)
    single = train_sae(b, sweep_configs(BASE, ["tiny"], [2], [24])[0], progress=False)
    for key, value in _weights(a, "tiny-l2-topk-24").items():
        torch.testing.assert_close(value, single.sae.state_dict()[key], rtol=0, atol=0)
    again = run_sweep(
        a, sweep_configs(BASE, ["tiny"], [1, 2], [16, 24]), progress=False, log=lambda s: None
    )
    assert all(r.skipped for r in again)  # a rerun trains nothing that is finished


def test_a_sweep_through_ray_equals_the_in_process_sweep(two_stores):
    pytest.importorskip("ray")
    a, b = two_stores
    cfgs = sweep_configs(BASE, ["tiny"], [1, 2], [16, 24])
    here = run_sweep(a, cfgs, progress=False, log=lambda s: None)
    lines: list[str] = []
    on_ray = run_sweep(b, cfgs, ray_address="local", progress=False, log=lines.append)
    assert [r.name for r in on_ray] == [r.name for r in here] == NAMES and len(lines) == 4
    for name in NAMES:  # each run in its own Ray worker process: the same weights, bit for bit
        wa, wb = _weights(a, name), _weights(b, name)
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0)


def test_cli_train_with_several_layers_and_widths_is_a_sweep(two_stores):
    a, _ = two_stores
    r = CliRunner().invoke(
        main,
        [
            "train",
            a,
            "--model",
            "tiny",
            "--layer",
            "1,2",
            "--arch",
            "topk",
            "--k",
            "4",
            "--d-sae",
            "16,24",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "sweep of 4 SAEs done (0 already trained)" in r.output
    assert sorted(actstore.sae_names(actstore.open_store(a))) == NAMES
    bad = CliRunner().invoke(
        main, ["train", a, "--model", "tiny", "--layer", "1", "--d-sae", "16,x"]
    )
    assert bad.exit_code != 0 and "--d-sae" in bad.output


def test_a_sweep_with_a_missing_layer_trains_nothing(two_stores):
    a, _ = two_stores
    with pytest.raises(actstore.ActstoreError, match="layer 9 of model 'tiny' is not in store"):
        run_sweep(
            a, sweep_configs(BASE, ["tiny"], [1, 9], [16]), progress=False, log=lambda s: None
        )
    assert actstore.sae_names(actstore.open_store(a)) == []


def test_a_sweep_over_saes_trained_with_other_options_is_refused(two_stores):
    """Issue 27: after a --k 4 sweep, the same sweep with --k 2 must not print "already trained" and succeed."""
    a, _ = two_stores
    args = [
        "train",
        a,
        "--model",
        "tiny",
        "--layer",
        "1,2",
        "--arch",
        "topk",
        "--d-sae",
        "16,24",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert CliRunner().invoke(main, [*args, "--k", "4"]).exit_code == 0
    before = {n: _weights(a, n) for n in NAMES}
    same = CliRunner().invoke(main, [*args, "--k", "4"])
    assert same.exit_code == 0 and "(4 already trained)" in same.output, same.output
    r = CliRunner().invoke(main, [*args, "--k", "2"])
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.exception
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "differs in: k" in lines[0] and "--overwrite" in lines[0], r.output
    assert all(torch.equal(_weights(a, n)[k], v) for n in NAMES for k, v in before[n].items())
    over = CliRunner().invoke(main, [*args, "--k", "2", "--overwrite"])
    assert over.exit_code == 0 and "(0 already trained)" in over.output, over.output
    from actstore.sae.files import read_config

    assert all(read_config(actstore.open_store(a), n).k == 2 for n in NAMES)


# ---------------------------------------------------------------- one read, many SAEs
ONE_LAYER = [
    "--model",
    "tiny",
    "--layer",
    "2",
    "--epochs",
    "2",
    "--batch-size",
    "32",
    "--threads",
    "1",
    "--device",
    "cpu",
    "--quiet",
]


def test_a_one_layer_sweep_is_trained_in_one_pass_and_equals_separate_runs(two_stores):
    from actstore.sae.group import stream_groups
    from actstore.sae.sweep import name_runs

    a, b = two_stores
    r = CliRunner().invoke(
        main,
        [
            "train",
            a,
            *ONE_LAYER,
            "--arch",
            "topk,batchtopk",
            "--d-sae",
            "16,24",
            "--k",
            "2,4",
            "--seed",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    assert r.output.count("trained with 7 other SAEs in one pass") == 8, r.output
    names = sorted(actstore.sae_names(actstore.open_store(a)))
    assert names == sorted(
        f"tiny-l2-{arch}-{d}-k{k}"
        for arch in ("topk", "batchtopk")
        for d in (16, 24)
        for k in (2, 4)
    )
    base = dict(model="tiny", layer=2, epochs=2, batch_size=32, threads=1, device="cpu", seed=3)
    cfgs = [
        TrainConfig(**base, arch=arch, d_sae=d, k=k)
        for arch in ("topk", "batchtopk")
        for d in (16, 24)
        for k in (2, 4)
    ]
    assert len(stream_groups(cfgs)) == 1
    # each alone, the way a single train runs it
    for cfg in name_runs(actstore.open_store(b), cfgs):
        train_sae(b, cfg, progress=False)
        want, got = _weights(b, cfg.name), _weights(a, cfg.name)
        assert all(torch.equal(want[k], got[k]) for k in want), cfg.name


def test_a_seed_sweep_shares_one_data_order(two_stores):
    a, b = two_stores
    r = CliRunner().invoke(
        main,
        ["train", a, *ONE_LAYER, "--arch", "topk", "--d-sae", "16", "--k", "4", "--seed", "0,1"],
    )
    assert r.exit_code == 0, r.output
    assert sorted(actstore.sae_names(actstore.open_store(a))) == [
        "tiny-l2-topk-16-s0",
        "tiny-l2-topk-16-s1",
    ]
    alone = TrainConfig(
        model="tiny",
        layer=2,
        epochs=2,
        batch_size=32,
        threads=1,
        device="cpu",
        arch="topk",
        d_sae=16,
        k=4,
        seed=1,
        data_seed=0,
        name="tiny-l2-topk-16-s1",
    )
    train_sae(b, alone, progress=False)
    want, got = _weights(b, alone.name), _weights(a, alone.name)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not torch.equal(got["W_dec"], _weights(a, "tiny-l2-topk-16-s0")["W_dec"])


def test_a_one_pass_sweep_killed_midway_resumes_to_the_same_weights(two_stores):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    a, b = two_stores
    args = [
        "train",
        "--arch",
        "topk",
        "--d-sae",
        "16,24",
        "--k",
        "4",
        "--model",
        "tiny",
        "--layer",
        "2",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--checkpoint-every",
        "5",
    ]
    assert CliRunner().invoke(main, [args[0], b, *args[1:]]).exit_code == 0  # uninterrupted
    proc = subprocess.Popen(
        [sys.executable, "-m", "actstore.cli", args[0], a, *args[1:]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = [Path(a) / "saes" / n / "checkpoint" for n in ("tiny-l2-topk-16", "tiny-l2-topk-24")]
    deadline = time.time() + 120
    while time.time() < deadline and not all(c.exists() for c in ckpts):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert all(c.exists() for c in ckpts), "killed before any checkpoint: nothing to resume"
    assert actstore.sae_names(actstore.open_store(a)) == []
    r = CliRunner().invoke(main, [args[0], a, *args[1:]])
    assert r.exit_code == 0, r.output
    for n in ("tiny-l2-topk-16", "tiny-l2-topk-24"):
        want, got = _weights(b, n), _weights(a, n)
        assert all(torch.equal(want[k], got[k]) for k in want), n


def test_expand_gives_an_omitted_field_its_default_not_none():
    """A library caller of ``expand`` that names no seed (the CLI always passes one) got seed None, and training
    failed deep in the split ("object of type 'NoneType' has no len()")."""
    from actstore.sae.combos import expand

    cfgs = expand(
        {"epochs": 1, "d_sae": 64, "k": 4},
        {"model": ["tiny"], "layer": [1, 2], "arch": ["topk", "relu-l1"]},
    )
    assert [(c.arch, c.layer, c.k, c.seed) for c in cfgs] == [
        ("topk", 1, 4, 0), ("topk", 2, 4, 0), ("relu-l1", 1, None, 0), ("relu-l1", 2, None, 0)
    ]  # fmt: skip
    assert {c.stream_seed() for c in cfgs} == {0}
