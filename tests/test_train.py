"""Out-of-core SAE training: the shuffled stream, dictionary recovery, artifacts, resume, CLI."""

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

import actstore
from actstore.cli import main
from actstore.errors import ConfigError, NotFoundError
from actstore.sae.config import TrainConfig
from actstore.sae.stream import ShuffledStream, split_rows, split_sample_rows
from actstore.sae.train import train_sae
from actstore.testing.synthetic import planted_dictionary, write_synthetic_store

FAST = dict(batch_size=64, device="cpu", eval_fraction=0.1)


# ---------------------------------------------------------------- the stream
def test_split_is_by_whole_sample(tiny_store_ro):
    st = actstore.open_store(tiny_store_ro)
    tok = st.model_tokenization("tiny")
    n = len(st.activations("tiny", 1))
    sp = split_rows(tok, n, eval_fraction=0.2, max_eval_tokens=10_000, seed=1)
    first, n_tok = tok.sample_rows()
    assert len(sp.eval_samples) > 0
    want = np.concatenate([np.arange(first[s], first[s] + n_tok[s]) for s in sp.eval_samples])
    np.testing.assert_array_equal(sp.eval_rows, np.sort(want))
    assert not sp.train_mask[sp.eval_rows].any()
    assert sp.n_train + len(sp.eval_rows) == n  # every row is in exactly one set
    assert 0.1 * n < len(sp.eval_rows) < 0.35 * n
    # the cap on held-out tokens holds, and samples past the committed rows are in neither set
    capped = split_sample_rows(first, n_tok, n, 0.5, 60, seed=0)
    assert len(capped.eval_rows) < 60 + n_tok.max()
    short = split_sample_rows(first, n_tok, int(first[5]) + 1, 0.0, 0, seed=0)
    assert short.n_train == int(first[5]) and len(short.eval_rows) == 0


@pytest.mark.parametrize("buffer_rows", [100, 10_000])
def test_stream_yields_every_training_row_once_per_epoch(tmp_path, buffer_rows):
    n, d = 3000, 4
    # row r holds the value r
    rows = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, d), dtype=np.float32)
    st = write_synthetic_store(
        str(tmp_path / "s.zarr"), [rows[:1234], rows[1234:]], n, d, sample_len=25, chunk_rows=128
    )
    acts = st.activations("synth", 0)
    mask = np.ones(n, dtype=bool)
    mask[500:700] = False  # held out
    stream = ShuffledStream(acts, mask, batch_size=64, buffer_rows=buffer_rows, seed=3, workers=2)
    want = np.flatnonzero(mask)
    epochs = []
    for epoch in range(2):
        got = [b.numpy() for b in stream.batches(epoch)]
        assert len(got) == stream.batches_per_epoch == -(-len(want) // 64)
        assert all(len(b) == 64 for b in got[:-1])
        seen = np.concatenate(got)[:, 0].astype(np.int64)
        np.testing.assert_array_equal(np.sort(seen), want)  # each training row exactly once
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh order each epoch
    assert not np.array_equal(epochs[0], np.sort(epochs[0]))  # and shuffled
    # resuming mid-epoch gives exactly the remaining batches
    tail = np.concatenate([b.numpy() for b in stream.batches(1, skip=7)])[:, 0]
    np.testing.assert_array_equal(tail, epochs[1][7 * 64 :])
    # stopping early does not hang
    it = stream.batches(0)
    next(it)
    it.close()


# ---------------------------------------------------------------- ground truth: a planted dictionary
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    pd = planted_dictionary(d=32, n_atoms=64, k_active=3, seed=0)
    path = tmp_path_factory.mktemp("planted") / "p.zarr"
    write_synthetic_store(str(path), pd.rows(8000), 8000, 32, chunk_rows=512)
    return str(path), pd


@pytest.mark.parametrize(("arch", "extra"), [("relu-l1", {"l1": 0.1}), ("topk", {"k": 3})])
def test_recovers_a_planted_dictionary(planted, one_thread, arch, extra):
    path, pd = planted
    cfg = TrainConfig(
        model="synth",
        layer=0,
        arch=arch,
        d_sae=64,
        epochs=10,
        batch_size=128,
        lr=5e-3,
        device="cpu",
        name=arch,
        optimizer="adam",
        **extra,
    )
    res = train_sae(path, cfg, progress=False)
    w = res.sae.W_dec.detach()
    w = w / w.norm(dim=1, keepdim=True)  # (d_sae, d)
    # best cosine of each learned column
    best = (w @ torch.from_numpy(pd.atoms).T).max(dim=1).values
    assert float((best >= 0.9).float().mean()) >= 0.75, best
    assert res.metrics["eval"]["fvu"] < 0.5
    if arch == "topk":
        assert res.metrics["eval"]["l0"] == pytest.approx(3.0)
    assert res.metrics["task"] is None  # no classification head


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("recipe", ["default", "signum"])
def test_a_2x_overcomplete_sae_recovers_a_planted_dictionary(planted, one_thread, arch, recipe):
    """>= 95% of the planted atoms each have a latent within cosine 0.9 (Adam's d_sae = n_atoms run above finds 83%),
    in 20 epochs: with the default recipe (no recipe options: Adam at the learning rate for its token budget, with its
    decay) as with sparsify's signum, the default of topk / batchtopk before issue 28."""
    path, pd = planted
    opts = {"optimizer": "signum", "lr": 1e-2} if recipe == "signum" else {}
    cfg = TrainConfig(
        model="synth",
        layer=0,
        arch=arch,
        d_sae=128,
        k=3,
        epochs=20,
        batch_size=128,
        device="cpu",
        name=f"{arch}-{recipe}",
        task_samples=0,
        **opts,
    )
    if recipe == "default":
        assert (cfg.optimizer, cfg.lr, cfg.lr_warmup, cfg.lr_decay) == ("adam", None, 0.0, 0.2)
    res = train_sae(path, cfg, progress=False)
    w = res.sae.W_dec.detach()
    w = w / w.norm(dim=1, keepdim=True)  # (d_sae, d)
    best = (torch.from_numpy(pd.atoms) @ w.T).max(dim=1).values  # each atom's best latent
    assert float((best >= 0.9).float().mean()) >= 0.95, best
    assert res.metrics["eval"]["fvu"] < 0.15


@pytest.mark.parametrize("warmup", [None, 0.05])
def test_the_learning_rate_follows_its_warm_up_and_decay(planted, one_thread, warmup):
    """The Adam recipe's learning rate: the budget's peak (adam_lr of the run's tokens, kept in metrics.json), ramped
    up over the first ``--lr-warmup`` of the steps (default none) and down to 0 over the last 20%, as logged."""
    from actstore.sae.recipe import adam_lr

    path, _ = planted
    cfg = TrainConfig(
        model="synth",
        layer=0,
        arch="topk",
        d_sae=64,
        k=3,
        tokens=128 * 100,
        batch_size=128,
        log_every=1,
        eval_points=0,
        device="cpu",
        name=f"sched-{warmup}",
        task_samples=0,
        lr_warmup=warmup,
    )
    res = train_sae(path, cfg, progress=False)
    peak = adam_lr(128 * 100)
    assert res.metrics["lr"] == pytest.approx(peak)
    # the rate of the step that ended at "step"
    lrs = {h["step"]: h["lr"] for h in res.metrics["history"]}
    # 5 warm-up steps: 1/5, 2/5, ... of the peak
    assert lrs[1] == pytest.approx(peak if warmup is None else peak / 5)
    assert lrs[5] == lrs[50] == lrs[81] == pytest.approx(peak)
    # 20 decay steps
    assert lrs[82] == pytest.approx(peak * 19 / 20) and lrs[100] == pytest.approx(peak / 20)
    assert adam_lr(2_000_000) == pytest.approx(1e-3)
    assert (
        peak > adam_lr(200_000) > adam_lr(2_000_000) > adam_lr(20_000_000)
    )  # shorter runs take larger steps


def test_data_init_points_decoder_rows_at_training_tokens(planted, one_thread):
    """--init data (topk's default): each decoder row starts as the direction of one training row minus b_dec (scaled
    inputs), never a held-out row's, and the encoder as DATA_INIT_ENCODER times its transpose. Seen after one step
    at a learning rate of 1e-9, which leaves the init in place."""
    from actstore.sae.model import DATA_INIT_ENCODER

    path, _ = planted
    cfg = TrainConfig(
        model="synth",
        layer=0,
        arch="topk",
        d_sae=96,
        k=3,
        batch_size=128,
        tokens=128,
        lr=1e-9,
        device="cpu",
        name="init",
        task_samples=0,
        eval_points=0,
    )
    assert (
        cfg.init == "data" and TrainConfig(model="synth", layer=0).init == "random"
    )  # relu-l1 keeps its 0.1 init
    res = train_sae(path, cfg, progress=False)
    sae, st = res.sae, actstore.open_store(path)
    acts = st.activations("synth", 0)
    x = (
        torch.from_numpy(acts.take(np.arange(len(acts)))) * sae.scale - sae.b_dec.detach()
    )  # (n, d) centred
    x = x / x.norm(dim=1, keepdim=True)
    best = (sae.W_dec.detach() @ x.T).max(dim=1)  # each row's closest token direction
    assert float(best.values.min()) > 0.99999
    assert res.split.train_mask[best.indices.numpy()].all()  # all of them training rows
    assert len(set(best.indices.tolist())) == 96  # no token twice
    torch.testing.assert_close(
        sae.W_enc.detach(), sae.W_dec.detach().T * DATA_INIT_ENCODER, atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize(
    ("arch", "preset", "want"),
    [("relu-l1", None, "zeros"), ("relu-l1", "paper", "mean"), ("topk", None, "mean")],
)
def test_b_dec_starts_at_zeros_for_relu_l1_and_at_the_mean_otherwise(
    planted, one_thread, arch, preset, want
):
    """relu-l1 SAEs start ``b_dec`` at zeros and step on the unit gradient (SAELens's standard SAE; measured in
    docs/BENCHMARKS.md); the paper preset keeps its mean start and plain gradient, topk / batchtopk the mean
    (sparsify). Seen after training at a learning rate of 1e-9, which leaves the init in place."""
    path, _ = planted
    # the preset sets epochs
    extra = ({"k": 3} if arch == "topk" else {}) | ({"epochs": 1} if preset else {"tokens": 128})
    cfg = TrainConfig(
        model="synth",
        layer=0,
        arch=arch,
        preset=preset,
        d_sae=32,
        batch_size=128,
        lr=1e-9,
        device="cpu",
        name=f"bdec-{arch}-{preset}",
        task_samples=0,
        eval_points=0,
        **extra,
    )
    assert cfg.b_dec_init == want and cfg.unit_grad is (arch == "relu-l1" and preset is None)
    res = train_sae(path, cfg, progress=False)
    b_dec = res.sae.b_dec.detach()
    acts = actstore.open_store(path).activations("synth", 0)
    mean = (
        torch.from_numpy(acts.take(np.arange(len(acts))).mean(0)) * res.sae.scale
    )  # (d,) scaled mean row
    if want == "zeros":
        assert float(b_dec.abs().max()) < 1e-6
    else:
        torch.testing.assert_close(b_dec, mean.float(), atol=0.05 * float(mean.norm()), rtol=0)
    assert (
        json.loads((Path(path) / "saes" / cfg.name / "cfg.json").read_text())["training"][
            "b_dec_init"
        ]
        == want
    )


# ---------------------------------------------------------------- artifacts and metrics
@pytest.mark.parametrize(
    ("arch", "extra"), [("relu-l1", {}), ("topk", {"k": 4}), ("batchtopk", {"k": 4})]
)
def test_train_each_arch_writes_artifacts(tiny_store, arch, extra):
    cfg = TrainConfig(
        model="tiny", layer=2, arch=arch, d_sae=64, epochs=2, name="s", **FAST, **extra
    )
    res = train_sae(tiny_store, cfg, progress=False)
    st = actstore.open_store(tiny_store)
    assert actstore.sae_names(st) == ["s"]
    folder = Path(tiny_store) / "saes" / "s"
    assert sorted(p.name for p in folder.iterdir()) == [
        "cfg.json",
        "metrics.json",
        "sae.safetensors",
    ]  # checkpoint removed
    c = json.loads((folder / "cfg.json").read_text())
    assert (c["arch"], c["d_in"], c["d_sae"], c["model"], c["layer"]) == (arch, 32, 64, "tiny", 2)
    assert (
        c["tokenization"] == st.model_tokenization("tiny").key
        and c["actstore_version"] == actstore.__version__
    )
    assert c["training"]["epochs"] == 2 and c["norm_scale"] > 0
    m = json.loads((folder / "metrics.json").read_text())
    n_train = m["n_train_rows"]
    assert m["tokens"] == 2 * n_train and m["steps"] == 2 * -(-n_train // 64)
    assert n_train + m["n_eval_rows"] == len(st.activations("tiny", 2))
    for part in ("train", "eval"):
        assert {"mse", "fvu", "l0", "dead_fraction", "dense_fraction"} <= set(m[part])
        assert 0 <= m[part]["fvu"] < 2
    # held-out metrics agree with an independent computation on the held-out rows
    x = torch.from_numpy(st.activations("tiny", 2).take(res.split.eval_rows))
    sae = actstore.load_sae(st, "s")
    with torch.no_grad():
        x_hat = sae(x).x_hat
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert m["eval"]["fvu"] == pytest.approx(fvu, rel=1e-3)
    if arch == "topk":
        assert m["eval"]["l0"] <= 4
    if arch == "batchtopk":
        assert m["threshold"] > 0 and float(sae.threshold) == pytest.approx(m["threshold"])
    assert [h["step"] for h in m["history"]] == sorted(h["step"] for h in m["history"])
    # the FVU-tokens / FVU-L0 curves: held-out points spread over the run, the last one the final metrics
    ev, tr = m["curves"]["eval"], m["curves"]["train"]
    n_points = min(TrainConfig(model="tiny", layer=2).eval_points, m["steps"])
    assert (
        len(ev["tokens"]) >= n_points
        and ev["tokens"] == sorted(ev["tokens"])
        and ev["tokens"][-1] == m["tokens"]
    )
    assert ev["fvu"][-1] == pytest.approx(m["eval"]["fvu"]) and ev["l0"][-1] == pytest.approx(
        m["eval"]["l0"]
    )
    assert (
        len(tr["tokens"])
        == len(tr["fvu"])
        == len(tr["l0"])
        == sum("fvu" in h for h in m["history"])
    )
    assert ev["fvu"][-1] < ev["fvu"][0]  # it learned


def test_tokens_budget_and_paper_preset(tiny_store):
    res = train_sae(
        tiny_store,
        TrainConfig(model="tiny", layer=1, tokens=300, d_sae=16, name="t", **FAST),
        progress=False,
    )
    assert res.steps == 5 and res.tokens == 300 + 20  # ceil(300 / 64) steps of 64
    p = TrainConfig(model="tiny", layer=1, preset="paper")
    assert (p.arch, p.d_sae, p.l1, p.lr, p.epochs) == ("relu-l1", 1024, 1e-3, 2e-5, 10)
    assert (
        TrainConfig(model="tiny", layer=1, preset="paper", lr=1e-3).lr == 1e-3
    )  # explicit options win
    assert TrainConfig(model="tiny", layer=1, expansion=2).resolve(32).d_sae == 64


def test_errors(tiny_store):
    with pytest.raises(NotFoundError, match="model 'nope' is not in store"):
        train_sae(tiny_store, TrainConfig(model="nope", layer=1, **FAST), progress=False)
    with pytest.raises(NotFoundError, match="layer 9 of model 'tiny'"):
        train_sae(tiny_store, TrainConfig(model="tiny", layer=9, **FAST), progress=False)
    with pytest.raises(ConfigError, match="--k is for topk"):
        TrainConfig(model="tiny", layer=1, k=3)
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(model="tiny", layer=1, d_sae=8, expansion=2)
    with pytest.raises(ConfigError, match="--k 99 is larger than d_sae 16"):
        train_sae(
            tiny_store,
            TrainConfig(model="tiny", layer=1, arch="topk", k=99, d_sae=16, **FAST),
            progress=False,
        )
    cfg = TrainConfig(model="tiny", layer=1, d_sae=16, epochs=1, name="dup", **FAST)
    train_sae(tiny_store, cfg, progress=False)
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        train_sae(tiny_store, cfg, progress=False)
    with pytest.raises(NotFoundError, match="no unfinished run named 'other'"):
        train_sae(
            tiny_store,
            TrainConfig(model="tiny", layer=1, d_sae=16, name="other", resume=True, **FAST),
            progress=False,
        )
    again = TrainConfig(
        model="tiny", layer=1, d_sae=16, epochs=1, name="dup", overwrite=True, **FAST
    )
    assert train_sae(tiny_store, again, progress=False).resumed_from == 0


# ---------------------------------------------------------------- resume
class Killed(Exception):
    pass


@pytest.mark.parametrize(
    ("arch", "optimizer"),
    [
        ("topk", "signum"),
        ("batchtopk", "signum"),
        ("topk", "adam"),
        ("relu-l1", "adam"),
        ("matryoshka-batchtopk", "adam"),
    ],
)
def test_killed_run_resumes_to_the_same_weights(tiny_store, arch, optimizer):
    def cfg(**kw):
        if arch != "relu-l1":
            kw["k"] = 4
        return TrainConfig(
            model="tiny",
            layer=3,
            arch=arch,
            d_sae=48,
            epochs=3,
            checkpoint_every=7,
            dead_window=200,
            buffer_mb=1,
            optimizer=optimizer,
            **FAST,
            **kw,
        )

    full = train_sae(tiny_store, cfg(name="full"), progress=False)

    def die(step, _info):
        if step == 25:
            raise Killed

    with pytest.raises(Killed):
        train_sae(tiny_store, cfg(name="cut"), progress=False, on_step=die)
    st = actstore.open_store(tiny_store)
    assert (
        "cut" not in actstore.sae_names(st)
        and (Path(tiny_store) / "saes/cut/checkpoint/state.safetensors").exists()
    )
    with pytest.raises(ConfigError, match="other options.*differs in: lr"):
        train_sae(tiny_store, cfg(name="cut", lr=1e-2), progress=False)
    res = train_sae(tiny_store, cfg(name="cut"), progress=False)  # the same command again
    assert res.resumed_from == 21 and res.steps == full.steps
    for key in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        torch.testing.assert_close(
            getattr(res.sae, key), getattr(full.sae, key), rtol=1e-5, atol=1e-6
        )
    assert res.metrics["eval"]["fvu"] == pytest.approx(full.metrics["eval"]["fvu"], rel=1e-4)
    assert [h["step"] for h in res.metrics["history"]] == [
        h["step"] for h in full.metrics["history"]
    ]


def test_a_run_checkpointed_before_the_relu_recipe_fields_resumes_with_their_old_values(tiny_store):
    """A relu-l1 run checkpointed before ``b_dec_init`` / ``unit_grad`` existed (its saved options lack them) was
    started at the mean with a plain gradient: it is refused with today's defaults, naming both, and resumes to
    the uninterrupted run's weights with ``--b-dec-init mean --no-unit-grad``."""
    from actstore.format import layout
    from actstore.models.checkpoint import pack, unpack

    def cfg(**kw):
        return TrainConfig(
            model="tiny", layer=3, d_sae=48, epochs=2, checkpoint_every=5, buffer_mb=1, **FAST, **kw
        )

    old = {"b_dec_init": "mean", "unit_grad": False}
    full = train_sae(tiny_store, cfg(name="full", **old), progress=False)

    def die(step, _info):
        if step == 12:
            raise Killed

    with pytest.raises(Killed):
        train_sae(tiny_store, cfg(name="cut", **old), progress=False, on_step=die)
    ckpt = Path(tiny_store) / "saes" / "cut" / layout.SAE_CHECKPOINT
    packed = unpack(ckpt.read_bytes())
    meta = {k: v for k, v in packed.meta.items()}
    meta["meta"]["config"] = {
        k: v for k, v in meta["meta"]["config"].items() if k not in old
    }  # as an older version wrote
    ckpt.write_bytes(pack(packed.tensors, meta))
    with pytest.raises(ConfigError, match="differs in: b_dec_init, unit_grad"):
        train_sae(tiny_store, cfg(name="cut"), progress=False)
    res = train_sae(tiny_store, cfg(name="cut", **old), progress=False)
    assert res.resumed_from == 10 and res.steps == full.steps
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(
            getattr(res.sae, key), getattr(full.sae, key), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("damage", ["garbage", "config"])
def test_a_damaged_checkpoint_is_a_clear_error_and_overwrite_starts_over(tiny_store, damage):
    """A checkpoint whose bytes are not safetensors, or whose saved options are not a JSON object (a teammate's
    store), is refused with an IntegrityError naming the run and the fix, not a traceback."""
    from actstore.errors import IntegrityError
    from actstore.format import layout
    from actstore.models.checkpoint import pack, unpack

    def cfg(**kw):
        return TrainConfig(
            model="tiny", layer=3, d_sae=16, epochs=2, checkpoint_every=3, name="dmg", **FAST, **kw
        )

    def die(step, _info):
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        train_sae(tiny_store, cfg(), progress=False, on_step=die)
    ckpt = Path(tiny_store) / "saes" / "dmg" / layout.SAE_CHECKPOINT
    if damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint")
    else:
        packed = unpack(ckpt.read_bytes())
        meta = dict(packed.meta)
        meta["meta"]["config"] = "<script>alert(1)</script>"
        ckpt.write_bytes(pack(packed.tensors, meta))
    with pytest.raises(
        IntegrityError, match="checkpoint of unfinished run 'dmg' .* is damaged .*--overwrite"
    ):
        train_sae(tiny_store, cfg(), progress=False)
    assert train_sae(tiny_store, cfg(overwrite=True), progress=False).resumed_from == 0


def test_sigkilled_cli_run_resumes(tiny_store):
    exe = str(Path(sys.executable).with_name("actstore"))
    cmd = [
        exe,
        "train",
        tiny_store,
        "--model",
        "tiny",
        "--layer",
        "2",
        "--d-sae",
        "32",
        "--epochs",
        "20",
        "--batch-size",
        "64",
        "--checkpoint-every",
        "5",
        "--name",
        "k",
        "--device",
        "cpu",
        "--quiet",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = Path(tiny_store) / "saes/k/checkpoint/state.safetensors"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (Path(tiny_store) / "saes/k/cfg.json").exists()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "resumed at step" in out.stdout
    step = int(out.stdout.split("resumed at step ")[1].split(";")[0].split(",")[0])
    assert step > 0 and step % 5 == 0
    assert actstore.sae_names(actstore.open_store(tiny_store)) == ["k"]


# ---------------------------------------------------------------- CLI
def test_cli_train_saes_export(tiny_store, tmp_path):
    import torch

    before_threads = torch.get_num_threads()
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
            "64",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--name",
            "c",
            "--quiet",
            "--device",
            "cpu",
            "--threads",
            str(2 if before_threads == 1 else 1),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "SAE c (topk, 32->64, k 4) on tiny layer 2" in r.output and "FVU" in r.output
    assert torch.get_num_threads() == before_threads  # --threads is restored after the run
    r = CliRunner().invoke(main, ["saes", tiny_store, "--format", "json"])
    rows = json.loads(r.output)
    assert r.exit_code == 0 and rows[0]["name"] == "c" and rows[0]["l0"] <= 4
    r = CliRunner().invoke(main, ["saes", tiny_store])
    assert "topk" in r.output and "fvu" in r.output
    r = CliRunner().invoke(
        main, ["export-sae", tiny_store, "c", "--format", "saelens", "--out", str(tmp_path / "ex")]
    )
    assert r.exit_code == 0 and (tmp_path / "ex" / "sae_weights.safetensors").exists()
    # errors are one clean line
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
            "64",
            "--name",
            "c",
            "--quiet",
        ],
    )
    assert (
        r.exit_code == 1
        and "Error: SAE 'c' already exists" in r.output
        and "Traceback" not in r.output
    )
    r = CliRunner().invoke(
        main, ["train", tiny_store, "--model", "bert", "--layer", "2", "--quiet"]
    )
    assert r.exit_code == 1 and "model 'bert' is not in store" in r.output
    r = CliRunner().invoke(main, ["export-sae", tiny_store, "zzz", "--out", str(tmp_path / "z")])
    assert r.exit_code == 1 and "no SAE named 'zzz'" in r.output
    # relu-l1's recipe options reach cfg.json; a bad choice is a usage error
    r = CliRunner().invoke(
        main,
        [
            "train",
            tiny_store,
            "--model",
            "tiny",
            "--layer",
            "2",
            "--d-sae",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--name",
            "r",
            "--quiet",
            "--device",
            "cpu",
            "--b-dec-init",
            "mean",
            "--no-unit-grad",
        ],
    )
    assert r.exit_code == 0, r.output
    training = json.loads((Path(tiny_store) / "saes" / "r" / "cfg.json").read_text())["training"]
    assert (training["arch"], training["b_dec_init"], training["unit_grad"]) == (
        "relu-l1",
        "mean",
        False,
    )
    r = CliRunner().invoke(
        main, ["train", tiny_store, "--model", "tiny", "--layer", "2", "--b-dec-init", "median"]
    )
    assert r.exit_code == 2 and "'median' is not one of 'mean', 'zeros'" in r.output


# ---------------------------------------------------------------- task accuracy with the SAE spliced in
def test_task_accuracy_with_the_sae_spliced_in(clf_store):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from actstore.sae.config import SAEConfig
    from actstore.sae.fidelity import task_accuracy
    from actstore.sae.model import SAE

    path, model_dir = clf_store
    st = actstore.open_store(path, writable=True)
    res = train_sae(
        st,
        TrainConfig(
            model="clf", layer=2, d_sae=64, epochs=1, batch_size=64, device="cpu", eval_fraction=0.3
        ),
        progress=False,
    )
    task = res.metrics["task"]
    assert task is not None and task["n_samples"] == len(res.split.eval_samples)
    # the original accuracy, computed independently
    samples = st.samples().filter(pl_in(res.split.eval_samples))
    tok, model = (
        AutoTokenizer.from_pretrained(model_dir),
        AutoModelForSequenceClassification.from_pretrained(model_dir).eval(),
    )
    with torch.no_grad():
        enc = tok(
            samples["text"].to_list(),
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )
        pred = model(**enc).logits.argmax(-1).tolist()
    want = np.mean(
        [
            model.config.id2label[p] == lab
            for p, lab in zip(pred, samples["label"].to_list(), strict=True)
        ]
    )
    assert task["accuracy"] == pytest.approx(want)
    assert 0 <= task["accuracy_with_sae"] <= 1 and 0 <= task["agreement"] <= 1
    # an SAE that reconstructs exactly (h = [relu(x), relu(-x)], x_hat = h[:d] - h[d:]) keeps every prediction
    exact = SAE(
        SAEConfig(
            "relu-l1", 32, 64, model="clf", layer=2, tokenization=st.model_tokenization("clf").key
        )
    )
    eye = torch.eye(32)
    with torch.no_grad():
        exact.W_enc.copy_(torch.cat([eye, -eye], 1))
        exact.W_dec.copy_(torch.cat([eye, -eye], 0))
        exact.b_enc.zero_()
        exact.b_dec.zero_()
    same = task_accuracy(st, exact, res.split.eval_samples)
    assert (
        same["agreement"] == 1.0
        and same["accuracy_with_sae"] == same["accuracy"] == task["accuracy"]
    )


def pl_in(samples):
    import polars as pl

    return pl.col("sample").is_in([int(s) for s in samples])
