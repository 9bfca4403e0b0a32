"""SAE optimizers (issue 10): sparsify's "signum" (sign descent under Schedule-Free averaging), step by hand."""

from __future__ import annotations

import pytest
import torch

from actstore.sae.optim import ScheduleFreeSignSGD, averaged


def test_a_signum_step_matches_the_hand_computed_update():
    """Two steps on one parameter: z moves by -lr * sign(grad); x is the lr^2-weighted average of the z's; the
    parameter holds y = beta x + (1 - beta) z; ``averaged`` shows x and puts y back."""
    lr, beta = 0.1, 0.9
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = ScheduleFreeSignSGD([p], lr=lr, momentum=beta)
    z0 = p.detach().clone()

    p.grad = torch.tensor([3.0, -0.5, 0.0])  # signs +, -, 0
    opt.step()
    z1 = z0 - lr * torch.tensor([1.0, -1.0, 0.0])
    x1 = z1  # first step: weight / weight_sum = 1
    y1 = beta * x1 + (1 - beta) * z1
    torch.testing.assert_close(p.detach(), y1)

    p.grad = torch.tensor([-1.0, -1.0, 2.0])
    opt.step()
    z2 = z1 - lr * torch.tensor([-1.0, -1.0, 1.0])
    x2 = x1 + 0.5 * (z2 - x1)  # equal weights lr^2: the running mean of z1, z2
    y2 = beta * x2 + (1 - beta) * z2
    torch.testing.assert_close(p.detach(), y2)
    torch.testing.assert_close(opt.state[p]["z"], z2)

    with averaged(opt):
        torch.testing.assert_close(p.detach(), x2)
    torch.testing.assert_close(p.detach(), y2)
    opt.finalize()
    torch.testing.assert_close(p.detach(), x2)


def test_a_change_to_the_parameters_between_steps_carries_into_the_average():
    """As in sparsify, x is recovered from the parameters: renormalising y between steps moves x with it."""
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = ScheduleFreeSignSGD([p], lr=0.5, momentum=0.5)
    p.grad = torch.tensor([1.0, 1.0])
    opt.step()
    with torch.no_grad():
        p.div_(p.norm())  # the trainer renormalises the decoder
    y, z = p.detach().clone(), opt.state[p]["z"].clone()
    with averaged(opt):
        torch.testing.assert_close(p.detach(), (y - 0.5 * z) / 0.5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_the_sparse_step_has_the_dense_steps_loss_and_gradients(arch):
    """The trainer's loss (actstore.sae.sparse: top-k / batch top-k entries, an embedding-bag decoder, sparse encoder
    gradients, the sparse AuxK) against autograd through the dense path (SAE.activate, a dense decoder, AuxK over
    every pre-activation): the same loss, reconstruction, fired counts and gradients."""
    from actstore.sae.config import SAEConfig
    from actstore.sae.loss import sae_loss
    from actstore.sae.model import SAE

    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch=arch, d_in=12, d_sae=40, k=5, norm_scale=1.3))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    x = torch.randn(64, 12)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True

    def loss_of(sparse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if sparse:
            parts = sae_loss(sae, x, dead, 0.0, 4, 1 / 32)
            assert parts.acts is None  # no dense (b, d_sae) activations
            return parts.loss, parts.x_hat_n, parts.fired
        xn = x * sae.cfg.norm_scale
        pre = sae.pre_acts(x)
        acts = sae.activate(pre, train=True)
        x_hat = sae.decode_normalised(acts)
        resid = (xn - x_hat).detach()
        av, ai = torch.where(dead, pre, torch.full_like(pre, -torch.inf)).topk(4, dim=-1)
        aux = ((torch.relu(av).unsqueeze(-1) * sae.W_dec[ai]).sum(1) - resid) ** 2
        return ((x_hat - xn) ** 2).mean() + aux.mean() / 32, x_hat, (acts > 0).sum(0)

    runs = []
    for sparse in (False, True):
        sae.zero_grad()
        loss, x_hat, fired = loss_of(sparse)
        loss.backward()
        runs.append(
            (
                float(loss),
                x_hat.detach(),
                fired,
                {n: p.grad.clone() for n, p in sae.named_parameters()},
            )
        )
    (l_d, x_d, f_d, g_d), (l_s, x_s, f_s, g_s) = runs
    assert abs(l_d - l_s) < 1e-5 and torch.equal(f_d, f_s)
    torch.testing.assert_close(x_s, x_d, rtol=1e-5, atol=1e-5)
    for name in g_d:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("skewed", [False, True])
def test_batch_topk_by_row_candidates_is_the_flat_top_k(skewed):
    """actstore.sae.sparse.batch_topk picks each row's candidates first; it must give the flat top-k's entries, also
    when one row holds more of the batch's largest entries than its candidates (then it falls back)."""
    from actstore.sae.sparse import batch_topk

    torch.manual_seed(1)
    acts = torch.relu(torch.randn(64, 200))
    if skewed:
        acts[3] += 10  # row 3 holds the 200 largest entries, more than its 4 * 5 candidates
    vals, flat = batch_topk(acts, 64 * 5)
    want_v, want_i = acts.flatten().topk(64 * 5)
    assert torch.equal(torch.sort(flat).values, torch.sort(want_i).values)
    torch.testing.assert_close(torch.sort(vals).values, torch.sort(want_v).values)


@pytest.mark.parametrize("unit_grad", [True, False])
def test_a_relu_l1_step_sees_the_gradient_at_unit_norm(unit_grad):
    """relu-l1's default (``unit_grad``): the optimizer gets the whole gradient rescaled to norm 1, hand-checked with
    SGD at lr 1 (each parameter moves by -g / ||g||). Without it the clip at 1 leaves these small gradients alone
    (the mean-MSE gradient is ~0.01-0.05, where SAELens's summed-MSE one is far above its clip)."""
    from actstore.sae.config import SAEConfig, TrainConfig
    from actstore.sae.loss import sae_loss, train_step
    from actstore.sae.metrics import TrainTracker
    from actstore.sae.model import SAE

    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch="relu-l1", d_in=12, d_sae=40, l1=0.01, norm_scale=1.0))
    x = torch.randn(64, 12)
    sae_loss(sae, x, None, 0.01, 1, 0.0).loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    assert float(norm) < 1.0  # the clip at 1 would not act
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    cfg = TrainConfig(model="m", layer=0, l1=0.01, unit_grad=None if unit_grad else False)
    assert cfg.unit_grad is unit_grad and cfg.grad_clip == 1.0
    train_step(
        sae, torch.optim.SGD(sae.parameters(), lr=1.0), x, TrainTracker(40, 1000), cfg, aux_k=1
    )
    for n, p in sae.named_parameters():
        want = before[n] - (grads[n] / norm if unit_grad else grads[n])
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6, msg=n)
