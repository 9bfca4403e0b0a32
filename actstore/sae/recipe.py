"""The default SAE recipe: what a run trains with when an option is not given (optimizer, learning rate by token
budget, warm-up and decay, decoder and bias initialisation, the gradient rescale), and the paper's preset. How each
default was chosen: docs/TRAINING.md."""

from __future__ import annotations

from typing import Any

from actstore.sae.archs import get_arch

PRESETS: dict[str, dict[str, Any]] = {
    # the seed paper: 768 -> 1024, ReLU, MSE + 1e-3 L1, Adam 2e-5, 10 epochs. Dense by design: on inputs scaled to
    # mean squared norm d_in, lambda 1e-3 leaves about half the features active per token (MiniLM layer 3, 5 epochs:
    # FVU 0.744 at L0 720 of 1536; docs/TRAINING.md); faithful to the paper, not a recipe for sparse features
    # b_dec at the data mean and a plain (clipped) gradient: the paper's recipe, kept so `make demo` is unchanged
    "paper": {
        "arch": "relu-l1",
        "d_sae": 1024,
        "l1": 1e-3,
        "lr": 2e-5,
        "epochs": 10,
        "l1_warmup": 0.0,
        "b_dec_init": "mean",
        "unit_grad": False,
    },
}
DEFAULT_EXPANSION = 4.0
DEFAULT_LR = 5e-4
RELU_L1_LR = 1e-3
"""Adam's default for relu-l1 SAEs (not crosscoders): lower FVU at lower L0 than 5e-4 at every lambda tried
(docs/TRAINING.md)."""
DEFAULT_EPOCHS = 3
DEFAULT_K = 32
DEFAULT_L1 = 1e-3
DEFAULT_L1_WARMUP = 0.05  # SAELens's usual L1 warm-up: 5% of the run
OPTIMIZERS = ("signum", "adam")
"""SAE optimizers (``--optimizer``), see :mod:`actstore.sae.optim`."""


def default_optimizer(arch: str, crosscoder: bool = False) -> str:
    """Adam for SAEs of every architecture; signum for topk / batchtopk crosscoders. sparsify's signum gets worse with
    more data where Adam with :func:`adam_lr` and its decay keeps improving (docs/TRAINING.md, "The default across
    scales"). Crosscoders keep signum (not measured across budgets); relu-l1's L1 recipes (the paper's, SAELens's)
    are tuned for Adam."""
    return "signum" if crosscoder and not get_arch(arch).l1_penalty else "adam"


ADAM_LR_AT_2M = 1e-3
"""Adam's learning rate for a topk / batchtopk SAE trained on 2M tokens (see :func:`adam_lr`)."""
ADAM_LR_EXPONENT = 0.3
ADAM_LR_RANGE = (2e-4, 4e-3)


def ramp(step: int, warm_steps: float) -> float:
    """A warm-up's multiplier at ``step`` (0-based): rising linearly to 1 over ``warm_steps`` (none under 1 step)."""
    return min(1.0, (step + 1) / warm_steps) if warm_steps >= 1 else 1.0


def adam_lr(tokens: int) -> float:
    """The default Adam learning rate of a topk / batchtopk SAE trained on ``tokens`` tokens:
    ``1e-3 * (tokens / 2M) ** -0.3`` within [2e-4, 4e-3]. Short runs want larger steps, long ones smaller (the best
    of three rates at 0.2M and at 2M tokens: docs/TRAINING.md)."""
    lo, hi = ADAM_LR_RANGE
    return min(hi, max(lo, ADAM_LR_AT_2M * (max(tokens, 1) / 2e6) ** -ADAM_LR_EXPONENT))


DEFAULT_LR_WARMUP = 0.0
DEFAULT_LR_DECAY = 0.2


def default_lr_schedule(arch: str, optimizer: str, crosscoder: bool) -> tuple[float, float]:
    """``(lr_warmup, lr_decay)``: no warm-up and a linear decay to 0 over the last 20% for Adam on topk / batchtopk
    SAEs (the decay lowered FVU; a warm-up cost a little FVU for fewer never-firing latents: docs/TRAINING.md); none
    otherwise (relu-l1's and signum's recipes were measured without)."""
    if optimizer == "adam" and not get_arch(arch).l1_penalty and not crosscoder:
        return DEFAULT_LR_WARMUP, DEFAULT_LR_DECAY
    return 0.0, 0.0


B_DEC_INITS = ("mean", "zeros")
"""Where the decoder bias starts (``--b-dec-init``): the mean of a few chunks of training rows, or zeros."""


def relu_sae(arch: str, crosscoder: bool) -> bool:
    """A relu-l1 SAE (not a crosscoder): the runs whose recipe was measured against SAELens's standard SAE."""
    return get_arch(arch).l1_penalty and not crosscoder


def default_b_dec_init(arch: str, crosscoder: bool) -> str:
    """zeros for relu-l1 SAEs (as SAELens's standard SAE: with the unit gradient below, fewer dead features), mean
    otherwise (as sparsify). Measured: docs/benchmarks/LOG.md, "Issue 10"."""
    return "zeros" if relu_sae(arch, crosscoder) else "mean"


def default_unit_grad(arch: str, crosscoder: bool) -> bool:
    """True for relu-l1 SAEs: each step's gradient rescaled to norm 1 before Adam. SAELens clips at norm 1 a loss
    summed over d_in (on raw inputs), so its clip acts on every step; actstore's mean-MSE gradients are far below 1,
    so a clip at 1 never acted. It moved relu-l1 onto SAELens's FVU-L0 frontier (docs/benchmarks/LOG.md)."""
    return relu_sae(arch, crosscoder)


DECODER_INITS = ("data", "random")
"""How a trained SAE's decoder rows start (``--init``): see :meth:`actstore.sae.model.SAE.init_from_rows`."""


def default_init(arch: str, crosscoder: bool) -> str:
    """data for topk / batchtopk SAEs (lower FVU at equal tokens: docs/benchmarks/LOG.md); random for relu-l1
    (SAELens's 0.1-norm init, measured against it) and crosscoders (not measured)."""
    return get_arch(arch).default_init(crosscoder)
