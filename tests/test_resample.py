"""Dead-latent resampling (``--resample``, issue 28 item 2): silent latents restart at badly reconstructed tokens,
their optimizer state cleared; fewer latents end up never firing; a killed run resumes to the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import actstore
from actstore.sae.config import SAEConfig, TrainConfig
from actstore.sae.model import SAE
from actstore.sae.optim import ScheduleFreeSignSGD
from actstore.sae.resample import resample_latents, resample_steps
from actstore.sae.train import train_sae

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized")


def _sae_and_batch(seed: int = 0) -> tuple[SAE, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(arch="topk", d_in=8, d_sae=16, k=2, norm_scale=1.0))
    xn = torch.randn(32, 8)  # (b, d_in)
    x_hat = xn.clone()
    x_hat[5] = 0.0  # token 5 is the only one reconstructed badly: every draw picks it
    return sae, xn, x_hat


@pytest.mark.parametrize("optimizer", ["adam", "signum"])
def test_silent_latents_restart_at_the_residual_of_badly_reconstructed_tokens(optimizer):
    sae, xn, x_hat = _sae_and_batch()
    opt = (
        torch.optim.Adam(sae.parameters(), lr=1e-3)
        if optimizer == "adam"
        else ScheduleFreeSignSGD(sae.parameters(), 1e-3)
    )
    sae(xn).acts.sum().backward()  # one step, so the optimizer has state
    opt.step()
    before = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    silent = torch.zeros(16, dtype=torch.bool)
    silent[[3, 7]] = True
    live_enc = float(sae.W_enc.detach()[:, ~silent].norm(dim=0).mean())
    assert resample_latents(sae, opt, xn, x_hat, silent, seed=0) == 2
    want = xn[5] / xn[5].norm()  # the residual's direction
    for i in (3, 7):
        torch.testing.assert_close(sae.W_dec[i].detach(), want)  # unit, as topk's rows
        torch.testing.assert_close(sae.W_enc[:, i].detach(), want * live_enc)
        assert float(sae.b_enc[i]) == 0.0
    keep = ~silent
    # the others untouched
    torch.testing.assert_close(sae.W_dec[keep].detach(), before["W_dec"][keep])
    torch.testing.assert_close(sae.W_enc[:, keep].detach(), before["W_enc"][:, keep])
    st = opt.state[sae.W_enc]
    if optimizer == "adam":
        assert (
            float(st["exp_avg"][:, 3].abs().sum()) == 0
            and float(st["exp_avg_sq"][:, 7].abs().sum()) == 0
        )
        assert float(st["exp_avg_sq"][:, keep].abs().sum()) > 0
    else:  # signum: the base iterate z starts at the new parameters (so do x and y)
        torch.testing.assert_close(st["z"][:, 3], sae.W_enc[:, 3].detach())


def test_no_silent_latents_changes_nothing():
    sae, xn, x_hat = _sae_and_batch()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    before = sae.W_dec.detach().clone()
    assert resample_latents(sae, opt, xn, x_hat, torch.zeros(16, dtype=torch.bool), seed=0) == 0
    torch.testing.assert_close(sae.W_dec.detach(), before)


def test_resampling_points_lie_in_the_first_half():
    assert resample_steps(0, 100) == set()
    assert resample_steps(4, 100) == {13, 25, 38, 50}
    assert resample_steps(3, 2) == {1}


def _never_firing(sae: SAE, x: np.ndarray) -> float:
    with torch.no_grad():
        acts = sae.eval()(torch.from_numpy(x)).acts  # (n, d_sae)
    return float(((acts > 0).sum(0) == 0).double().mean())


# a wide SAE on few rows: without resampling a good part of its latents never fire
RUN = TrainConfig(
    model="tiny",
    layer=2,
    arch="topk",
    k=2,
    d_sae=256,
    epochs=8,
    batch_size=64,
    device="cpu",
    task_samples=0,
    seed=1,
    checkpoint_every=3,
)


def test_resampling_leaves_fewer_latents_that_never_fire(tiny_store):
    import dataclasses

    plain = train_sae(tiny_store, dataclasses.replace(RUN, name="plain"), progress=False)
    again = train_sae(
        tiny_store, dataclasses.replace(RUN, name="resampled", resample=4), progress=False
    )
    rows = actstore.open_store(tiny_store).activations("tiny", 2)[:]
    before, after = _never_firing(plain.sae, rows), _never_firing(again.sae, rows)
    assert before > 0.1, "the test needs an SAE with many latents that never fire"
    assert after < before / 2, (before, after)
    done = again.metrics["resampled"]
    assert [r["step"] for r in done] == sorted(resample_steps(4, again.steps)) and sum(
        r["latents"] for r in done
    ) > 0


def test_a_window_too_short_to_tell_rare_from_dead_is_skipped(tiny_store):
    """8 resamplings in 4 epochs of ~1,000 rows: windows of ~250 tokens, 2 fires per latent on average at k 2 of 256."""
    import dataclasses

    res = train_sae(
        tiny_store, dataclasses.replace(RUN, name="short", epochs=4, resample=8), progress=False
    )
    done = res.metrics["resampled"]
    assert len(done) == 8 and done[0]["skipped"] == "window too short" and done[0]["latents"] == 0
    ran = [r for r in done if "skipped" not in r]
    assert ran and all(
        b["tokens"] - a["tokens"] >= 5 * 256 / 2 for a, b in zip(ran, ran[1:], strict=False)
    )


class Killed(Exception):
    pass


def test_a_run_killed_between_resamplings_resumes_to_the_same_weights(tiny_store):
    import dataclasses

    full = train_sae(tiny_store, dataclasses.replace(RUN, name="full", resample=4), progress=False)
    points = sorted(resample_steps(4, full.steps))

    def die(step, _info):
        if step == points[1] + 2:
            raise Killed

    with pytest.raises(Killed):
        train_sae(
            tiny_store,
            dataclasses.replace(RUN, name="cut", resample=4),
            progress=False,
            on_step=die,
        )
    assert (Path(tiny_store) / "saes/cut/checkpoint/state.safetensors").exists()
    res = train_sae(tiny_store, dataclasses.replace(RUN, name="cut", resample=4), progress=False)
    assert 0 < res.resumed_from < full.steps
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(
            getattr(res.sae, key), getattr(full.sae, key), rtol=1e-5, atol=1e-6
        )
    assert res.metrics["resampled"] == full.metrics["resampled"]


def test_a_resampling_does_not_count_as_getting_worse_with_more_data():
    """Resampled latents start unfit, so the held-out FVU jumps after a resampling (the demo's layer 6: 0.252 -> 0.276
    -> 0.437 right after the resampling at step 18 of 71): the rising-FVU check reads only the curve after the last."""
    from actstore.sae.metrics import curve_after, rising_fvu

    history = [
        {"step": s, "curve": {"fvu": f}}
        for s, f in [
            (9, 0.30),
            (18, 0.25),
            (22, 0.276),
            (27, 0.437),
            (36, 0.30),
            (45, 0.26),
            (54, 0.24),
            (63, 0.23),
            (71, 0.22),
        ]
    ]

    def warns(fvus: list[float]) -> bool:  # checked at every curve point as the run goes
        return any(rising_fvu(fvus[: i + 1]) for i in range(len(fvus)))

    assert warns(curve_after(history, 0))
    last_resampling = max(resample_steps(4, 71))
    assert last_resampling == 36 and not warns(curve_after(history, last_resampling))
