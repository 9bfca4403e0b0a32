"""SAE optimizers (issue 10): sparsify's "signum" (sign descent under Schedule-Free averaging), step by hand."""

from __future__ import annotations

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
