"""Dead latents counted honestly (held-out rows, a full pass over the store) and a run that gets worse with more data
said so (issue 28, items 2 and 3)."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.encoding.config import EncodeConfig
from actstore.encoding.encode import encode
from actstore.sae.config import TrainConfig
from actstore.sae.metrics import RisingFVUWarning, TrainTracker, rising_fvu
from actstore.sae.train import train_sae

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized")

RUN = TrainConfig(
    model="tiny",
    layer=2,
    arch="topk",
    k=4,
    d_sae=96,
    epochs=1,
    batch_size=64,
    device="cpu",
    task_samples=0,
    seed=1,
)


def never_firing(sae, x: np.ndarray) -> float:
    """Hand count: the fraction of features with no positive activation on any row of ``x (n, d_in)``."""
    with torch.no_grad():
        acts = sae.eval()(torch.from_numpy(x)).acts  # (n, d_sae)
    return float(((acts > 0).sum(0) == 0).double().mean())


def test_held_out_dead_equals_a_hand_count_and_the_summary_line(tiny_store):
    res = train_sae(tiny_store, RUN, progress=False)
    st = actstore.open_store(tiny_store)
    held = st.activations("tiny", 2).take(res.split.eval_rows)
    want = never_firing(res.sae, held)
    assert res.metrics["eval"]["dead_fraction"] == pytest.approx(want)
    assert 0 < want < 1, "the test needs some features that never fire on the held-out rows"
    r = CliRunner().invoke(
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
            "--k",
            "4",
            "--d-sae",
            "96",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--seed",
            "1",
            "--name",
            "cli",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    shown = float(re.search(r"dead ([0-9.]+) \(never fired on them\)", r.output).group(1))
    m = json.loads((Path(tiny_store) / "saes" / "cli" / "metrics.json").read_text())
    assert shown == pytest.approx(m["eval"]["dead_fraction"], abs=5e-4)
    saes = CliRunner().invoke(main, ["saes", tiny_store, "--format", "json"])
    row = next(x for x in json.loads(saes.output) if x["name"] == "cli")
    assert row["dead"] == pytest.approx(m["eval"]["dead_fraction"])


def test_encode_counts_the_features_that_never_fire_on_the_whole_store(tiny_store):
    res = train_sae(tiny_store, RUN, progress=False)
    st = actstore.open_store(tiny_store, writable=True)
    enc = encode(st, EncodeConfig(sae=res.name, device="cpu"), progress=False)
    want = never_firing(res.sae, st.activations("tiny", 2)[:])
    assert enc.never_fired_fraction == pytest.approx(want)
    saes = CliRunner().invoke(main, ["saes", tiny_store, "--format", "json"])
    assert json.loads(saes.output)[0]["dead_store"] == pytest.approx(want)
    again = CliRunner().invoke(main, ["encode", tiny_store, "--sae", res.name, "--quiet"])
    assert again.exit_code == 0
    r = CliRunner().invoke(
        main, ["encode", tiny_store, "--sae", res.name, "--overwrite", "--quiet", "--device", "cpu"]
    )
    assert f"{want:.3f} of its features never fire on any token of the store" in r.output, r.output


def test_the_trainers_window_counts_a_feature_that_fired_once_early_as_dead():
    t = TrainTracker(d_sae=3, dead_window=100)
    x = torch.zeros(10, 4)
    # 400 tokens: feature 0 fires in the first batch only, 1 in every batch, 2 never
    for i in range(40):
        t.update(x, x, torch.tensor([1.0 if i == 0 else 0.0, 2.0, 0.0]))
    assert t.dead_mask().tolist() == [True, False, True]
    assert t.interval(4)["dead_window_tokens"] == 100


def test_rising_fvu_needs_two_rises_beyond_noise():
    assert rising_fvu([0.5, 0.6, 0.7])
    assert not rising_fvu([0.5, 0.6, 0.55])
    assert not rising_fvu([0.980, 0.981, 0.982])  # 0.2% in all: noise
    assert not rising_fvu([0.6, 0.7])


def test_a_run_that_gets_worse_with_more_data_warns_naming_the_cause(tiny_store, tmp_path):
    bad = TrainConfig(
        model="tiny",
        layer=2,
        arch="topk",
        k=4,
        d_sae=64,
        epochs=4,
        batch_size=32,
        optimizer="signum",
        lr=0.5,
        eval_points=12,
        device="cpu",
        task_samples=0,
        name="bad",
    )
    store2 = tmp_path / "t2.zarr"
    shutil.copytree(tiny_store, store2)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        res = train_sae(tiny_store, bad, progress=False)
    fvu = res.metrics["curves"]["eval"]["fvu"]
    assert any(rising_fvu(fvu[: i + 1]) for i in range(len(fvu)))
    said = [str(w.message) for w in got if issubclass(w.category, RisingFVUWarning)]
    assert (
        len(said) == 1
        and "signum's learning rate (0.5)" in said[0]
        and "--optimizer adam" in said[0]
    )
    assert res.metrics["warnings"] == [said[0].split(": ", 1)[1]]
    r = CliRunner().invoke(
        main,
        [
            "train",
            str(store2),
            "--model",
            "tiny",
            "--layer",
            "2",
            "--arch",
            "topk",
            "--k",
            "4",
            "--d-sae",
            "64",
            "--epochs",
            "4",
            "--batch-size",
            "32",
            "--optimizer",
            "signum",
            "--lr",
            "0.5",
            "--eval-points",
            "12",
            "--device",
            "cpu",
            "--quiet",
            "--name",
            "bad",
        ],
    )
    assert (
        r.exit_code == 0
        and "warning: held-out FVU rose at two evaluation points in a row" in r.output
    ), r.output


def test_a_good_run_does_not_warn(tiny_store):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        res = train_sae(tiny_store, RUN, progress=False)
    assert not [w for w in got if issubclass(w.category, RisingFVUWarning)]
    assert res.metrics["warnings"] == []
