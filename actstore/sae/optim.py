"""SAE optimizers: Adam, and EleutherAI sparsify's "signum" (sign descent under Schedule-Free averaging).

``signum`` is the recipe of sparsify (``sparsify/trainer.py``: ``ScheduleFreeWrapper(SignSGD(...), momentum=0.95)``
from Defazio et al. 2024, "The Road Less Scheduled", https://arxiv.org/abs/2405.15682; sign descent from Bernstein
et al. 2018, https://arxiv.org/abs/1802.04434), written out here without the ``schedulefree`` package so that its
state is plain tensors (safetensors checkpoints, exact resume). Three sequences per parameter:

- ``z``, the base iterate: ``z <- z - lr * sign(grad)``, the gradient taken at ``y``;
- ``x``, the average: ``x <- x + c_t (z - x)`` with ``c_t = lr_max^2 / sum of lr_max^2`` (a uniform average at a
  constant learning rate);
- ``y = beta * x + (1 - beta) * z``, where the gradient is evaluated: the parameters hold ``y`` while training.

Only ``z`` is stored: ``x`` is recovered from the parameters as ``(y - (1 - beta) z) / beta`` (as the wrapper does),
so a change the trainer makes to the parameters between steps (the decoder renormalised to unit rows) carries into
``x`` exactly as in sparsify. The model to evaluate or save is ``x`` (:meth:`ScheduleFreeSignSGD.averaged`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


class ScheduleFreeSignSGD(torch.optim.Optimizer):
    """Sign descent with Schedule-Free averaging (see the module docstring); parameters hold ``y`` while training."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        momentum: float = 0.95,
        weight_lr_power: float = 2.0,
    ) -> None:
        if lr <= 0 or not 0 < momentum < 1:
            raise ValueError(f"need lr > 0 and 0 < momentum < 1, got lr {lr}, momentum {momentum}")
        super().__init__(
            params, {"lr": lr, "momentum": momentum, "weight_lr_power": weight_lr_power}
        )

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, beta, power = (
                float(group["lr"]),
                float(group["momentum"]),
                float(group["weight_lr_power"]),
            )
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                # every scalar a tensor in each parameter's state, so checkpoints hold it all
                if not st:
                    st["z"] = p.detach().clone()
                    # the parameter's dtype: torch's load_state_dict casts float state to it on resume
                    st["weight_sum"] = torch.zeros((), dtype=p.dtype, device=p.device)
                    st["lr_max"] = torch.zeros((), dtype=p.dtype, device=p.device)
                z = st["z"]
                x = torch.lerp(p, z, 1 - 1 / beta)  # x from y (and z before this step)
                z.add_(p.grad.sign(), alpha=-lr)
                lr_max = max(lr, float(st["lr_max"]))
                st["lr_max"].fill_(lr_max)
                weight = lr_max**power
                st["weight_sum"].add_(weight)
                x.lerp_(z, weight / float(st["weight_sum"]))
                p.copy_(torch.lerp(x, z, 1 - beta))  # y

    @torch.no_grad()
    def finalize(self) -> None:
        """Set the parameters to ``x`` for good (the model to save); training must not continue after this."""
        for group in self.param_groups:
            for p in group["params"]:
                z = self.state[p].get("z")
                if z is not None:
                    p.lerp_(z, 1 - 1 / float(group["momentum"]))
                    self.state[p].clear()

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """The parameters set to ``x`` (the averaged model: evaluate or save it) for the block, then back to ``y``."""
        saved = []
        with torch.no_grad():
            for group in self.param_groups:
                beta = float(group["momentum"])
                for p in group["params"]:
                    z = self.state[p].get("z")
                    if z is not None:
                        saved.append((p, p.detach().clone()))
                        p.copy_(torch.lerp(p, z, 1 - 1 / beta))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, y in saved:
                    p.copy_(y)


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (``signum`` or ``adam``, :data:`actstore.sae.recipe.OPTIMIZERS`) over ``params``."""
    if name == "signum":
        return ScheduleFreeSignSGD(params, lr=lr)
    return torch.optim.Adam(params, lr=lr)


@contextlib.contextmanager
def averaged(opt: torch.optim.Optimizer) -> Iterator[None]:
    """The model to evaluate or save: the averaged ``x`` for signum, the parameters as they are for Adam."""
    if isinstance(opt, ScheduleFreeSignSGD):
        with opt.averaged():
            yield
    else:
        yield
