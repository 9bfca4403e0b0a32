"""SAE settings: the architecture saved as ``cfg.json`` (``SAEConfig``) and a training run's (``TrainConfig``).

Torch-free, so the CLI builds its options (defaults, choices, help) from these fields."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from actstore.errors import ConfigError, IntegrityError
from actstore.fields import cli, opt
from actstore.sae.archs import CROSSCODER_ARCHS, REGISTRY, TRAIN_ARCHS, get_arch
from actstore.sae.recipe import (
    B_DEC_INITS,
    DECODER_INITS,
    DEFAULT_EPOCHS,
    DEFAULT_EXPANSION,
    DEFAULT_K,
    DEFAULT_L1,
    DEFAULT_L1_WARMUP,
    DEFAULT_LR,
    DEFAULT_LR_WARMUP,
    OPTIMIZERS,
    PRESETS,
    RELU_L1_LR,
    adam_lr,
    default_b_dec_init,
    default_init,
    default_lr_schedule,
    default_optimizer,
    default_unit_grad,
    ramp,
    relu_sae,
)
from actstore.store.config import Source, parse_sources

INPUT_NORMS = ("none", "constant_norm_rescale", "layer_norm")
"""Per-token input normalisations an imported SAE may apply before encoding (SAELens's ``normalize_activations``)."""


@dataclass
class SAEConfig:
    """Architecture and provenance of one SAE (saved as ``cfg.json``)."""

    arch: str
    """relu-l1, topk, batchtopk or jumprelu."""
    d_in: int
    """Width of the activations it reads (the layer's d_model)."""
    d_sae: int
    """Number of features (dictionary size)."""
    k: int | None = None
    """Active features per token for topk / batchtopk."""
    l1: float = 1e-3
    """L1 coefficient for relu-l1."""
    norm_scale: float = 1.0
    """Inputs are multiplied by this before encoding (fixed mean squared norm)."""
    model: str | None = None
    """Store key of the model whose activations it was trained on."""
    layer: int | None = None
    """Layer (hidden_states index) it was trained on."""
    tokenization: str | None = None
    """Tokenization key of the rows it was trained on."""
    name: str | None = None
    """Name under STORE/saes/."""
    input_norm: str = "none"
    """Per-token normalisation before encoding, undone after decoding: none, constant_norm_rescale, layer_norm."""
    source: dict[str, Any] | None = None
    """Where an imported SAE came from (format, folder, hook point); None for one trained here."""
    models: list[str] | None = None
    """Crosscoder: the model of each source it reads together, in order (None for an SAE; model is the first)."""
    layers: list[int] | None = None
    """Crosscoder: the layer of each source (layer is the first)."""
    norm_scales: list[float] | None = None
    """Crosscoder: each source's input scale to mean squared norm d_in (norm_scale is the first's)."""
    target: dict[str, Any] | None = None
    """Transcoder: the rows it reconstructs, ``{"model": KEY, "layer": L, "norm_scale": s}`` (model and layer are
    the rows it reads); None for an SAE."""
    skip: bool = False
    """Transcoder: with a linear skip connection ``W_skip (d_in, d_in)`` from its input to its output."""
    training: dict[str, Any] = field(default_factory=dict)
    """The training config it was made with."""
    actstore_version: str | None = None
    """actstore version that trained it."""

    def __post_init__(self) -> None:
        if self.arch not in REGISTRY:
            raise ConfigError(
                f"unknown SAE architecture {self.arch!r}: choose one of {', '.join(REGISTRY)}"
            )
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ConfigError(f"d_in and d_sae must be positive (got {self.d_in}, {self.d_sae})")
        if get_arch(self.arch).uses_k and (not self.k or not 0 < self.k <= self.d_sae):
            raise ConfigError(
                f"{self.arch} needs --k between 1 and d_sae ({self.d_sae}), got {self.k}"
            )
        if self.norm_scale <= 0:
            raise ConfigError(f"norm_scale must be positive, got {self.norm_scale}")
        if self.input_norm not in INPUT_NORMS:
            raise ConfigError(
                f"unknown input_norm {self.input_norm!r}: choose one of {', '.join(INPUT_NORMS)}"
            )
        if get_arch(self.arch).transcoder != (self.target is not None):
            raise ConfigError(
                f"a {self.arch} {'needs' if self.target is None else 'has no'} target rows (cfg.json 'target')"
            )
        if self.target is not None:  # from a store's cfg.json: any JSON at all
            t = self.target
            scale = t.get("norm_scale", 1.0) if isinstance(t, dict) else None
            if (
                not isinstance(t, dict)
                or not isinstance(t.get("model"), str)
                or not isinstance(t.get("layer"), int)
                or isinstance(t.get("layer"), bool)
                or not isinstance(scale, int | float)
                or isinstance(scale, bool)
                or not 0 < scale < math.inf
            ):
                raise ConfigError(
                    "a transcoder's target must be {model: key, layer: int, norm_scale: positive number}, "
                    f"got {str(t)[:120]!r}"
                )
        if not isinstance(self.skip, bool):
            raise ConfigError(f"skip must be true or false, got {str(self.skip)[:40]!r}")
        if self.skip and self.target is None:
            raise ConfigError("a skip connection is for transcoders")
        if self.models is not None or self.layers is not None:
            n = len(self.models or [])
            if n < 2 or len(self.layers or []) != n or len(self.norm_scales or [1.0] * n) != n:
                raise ConfigError(
                    f"a crosscoder needs at least two sources with a model, layer and scale each, got "
                    f"models {self.models}, layers {self.layers}, norm_scales {self.norm_scales}"
                )
            if self.input_norm != "none":
                raise ConfigError("a crosscoder has no per-token input_norm")
            self.norm_scales = [float(v) for v in (self.norm_scales or [self.norm_scale] * n)]
            if min(self.norm_scales) <= 0:
                raise ConfigError(f"norm_scales must be positive, got {self.norm_scales}")

    @property
    def n_sources(self) -> int:
        """Sources read together: 1 for an SAE, one per (model, layer) for a crosscoder."""
        return len(self.models) if self.models else 1

    @property
    def is_crosscoder(self) -> bool:
        return self.n_sources > 1

    @property
    def is_transcoder(self) -> bool:
        """It reconstructs other rows (``target``) than the ones it reads."""
        return self.target is not None

    @property
    def target_scale(self) -> float:
        """The scale of the rows it reconstructs (a transcoder's target's; an SAE's own input's)."""
        return float(self.target.get("norm_scale", 1.0)) if self.target else float(self.norm_scale)

    def source_labels(self) -> list[str]:
        """``MODEL@LAYER`` of each source."""
        if self.models and self.layers:
            return [f"{m}@{lay}" for m, lay in zip(self.models, self.layers, strict=True)]
        return [f"{self.model}@{self.layer}"]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def parse_config(cfg_json: bytes, where: str = "SAE") -> SAEConfig:
    """An :class:`SAEConfig` from ``cfg.json`` bytes; IntegrityError naming ``where`` if they are not a JSON object."""
    try:
        d = json.loads(cfg_json)
        if not isinstance(d, dict):
            raise TypeError
    except (ValueError, TypeError):
        raise IntegrityError(
            f"{where}: cfg.json is not a JSON object; the SAE is damaged: re-train or re-copy it"
        ) from None
    return SAEConfig.from_dict(d)


# fields that may change between a killed run and its restart
RUNTIME_FIELDS = (  # options that do not change what is trained: a run may resume with other values
    "device",
    "workers",
    "threads",
    "resume",
    "overwrite",
    "log_every",
    "eval_points",
    "curve_eval_tokens",
    "checkpoint_every",
    "task_samples",
)

COMPARED_APART = ("name", "d_sae", "expansion", "k", "aux_k")
"""Fields a finished SAE is compared on through what they resolve to (its name, d_sae, k and aux_k), not as given
(SAEs trained before ``resolve`` saved them as given)."""


def resolved_aux_k(aux_k: int | None, d_in: int, d_sae: int) -> int:
    """The dead latents of the auxiliary loss: ``aux_k``, else d_in / 2, at most d_sae."""
    return min(aux_k or max(1, d_in // 2), d_sae)


def training_differences(
    saved: dict[str, Any], cfg: TrainConfig, saved_d_sae: int, saved_k: int | None, d_in: int
) -> list[str]:
    """The options in which ``cfg`` differs from the training config ``saved`` of a finished SAE of width
    ``saved_d_sae`` and ``saved_k`` (an SAE with no saved training config, e.g. imported, differs in ``training``)."""
    if not saved:
        return ["training (it was not trained here)"]
    old = {**FIELDS_ADDED, **saved}
    new = cfg.resolve(d_in)
    skip = set(RUNTIME_FIELDS) | set(COMPARED_APART)
    diff = sorted(
        k_ for k_, v in new.to_dict().items() if k_ in old and k_ not in skip and old[k_] != v
    )
    if new.d_sae != saved_d_sae:
        diff.append("d_sae")
    if new.k != saved_k:
        diff.append("k")
    if new.aux_k != resolved_aux_k(old.get("aux_k"), d_in, saved_d_sae):
        diff.append("aux_k")
    return diff


FIELDS_ADDED = {
    "b_dec_init": "mean",
    "unit_grad": False,
    "data_seed": None,
    "lr_warmup": 0.0,
    "lr_decay": 0.0,
    "resample": 0,
    "matryoshka_widths": None,
}
"""Training fields added after runs were checkpointed without them, with the value every such run used: an
unfinished run from before them resumes with ``--b-dec-init mean --no-unit-grad``."""


@dataclass
class TrainConfig:
    """Everything one ``actstore train`` run needs (saved in the SAE's cfg.json as ``training``)."""

    model: str = field(metadata=cli(names=("--model", "--models"), sweep=True))
    """Store key of the model whose activations to train on."""
    layer: int = field(
        metadata=cli(names=("--layer", "--layers"), sweep=True, metavar="LAYER[,LAYER...]")
    )
    """Layer (hidden_states index) to train on."""
    models: str | None = None
    """Crosscoder: models read together (comma separated, row-aligned), every one at ``layer`` or one per ``layers``."""
    layers: str | None = opt(None, names=("--layer", "--layers"))
    """Crosscoder: layers read together (comma separated): of one model (cross-layer) or one per model."""
    arch: str | None = opt(
        None, choices=TRAIN_ARCHS, sweep=True, resolved="relu-l1", metavar="ARCH[,ARCH...]"
    )
    """Architecture, one of the choices (docs/TRAINING.md compares them; crosscoders: batchtopk by default)."""
    source: str | None = opt(None, metavar="SITE[@LAYER]", shown="resid at --layer")
    """Transcoder: the rows it reads, a site of --model (resid, mlp_in, mlp_out, attn_out) at --layer or @LAYER."""
    target: str | None = opt(None, metavar="SITE[@LAYER]")
    """Transcoder: the rows it reconstructs, e.g. mlp_out (the same block's MLP output) or mlp_out@4."""
    skip: bool = False
    """Transcoder: add a linear skip connection from its input to its output (a skip transcoder)."""
    d_sae: int | None = opt(None, sweep=True, shown="expansion x d_model")
    """Number of features."""
    expansion: float | None = opt(None, resolved=DEFAULT_EXPANSION)
    """d_sae as a multiple of the layer's width, when d_sae is not given."""
    k: int | None = opt(None, sweep=True, resolved=DEFAULT_K)
    """Active features per token for topk / batchtopk (by default at most d_sae / 4)."""
    l1: float | None = opt(None, resolved=DEFAULT_L1)
    """L1 coefficient for relu-l1."""
    l1_warmup: float | None = opt(None, resolved=DEFAULT_L1_WARMUP)
    """relu-l1: fraction of the steps over which the L1 coefficient ramps up from 0 (paper preset 0)."""
    lr: float | None = opt(None, sweep=True, shown="by optimizer, architecture and tokens")
    """Learning rate: Adam 1e-3 * (tokens / 2M)^-0.3 on topk, batchtopk SAEs; 1e-3 on relu-l1; paper 2e-5; signum as sparsify."""
    lr_warmup: float | None = opt(None, resolved=DEFAULT_LR_WARMUP)
    """Fraction of the steps over which the learning rate ramps up linearly from 0."""
    lr_decay: float | None = opt(
        None, resolved=0.0, shown="0.2 for Adam on topk, batchtopk SAEs, else 0"
    )
    """Fraction of the steps at the end over which the learning rate decays linearly to 0."""
    optimizer: str | None = opt(None, choices=OPTIMIZERS, resolved="adam")
    """adam, or signum (sparsify's Schedule-Free sign descent; the default for topk, batchtopk crosscoders)."""
    init: str | None = opt(None, choices=DECODER_INITS, shown="data (relu-l1, crosscoders: random)")
    """Decoder rows at start: data (directions of training tokens; a transcoder's paired rows) or random."""
    epochs: int | None = opt(None, resolved=DEFAULT_EPOCHS)
    """Passes over the training rows; give it or --tokens, not both."""
    tokens: int | None = None
    """Train on this many tokens instead of whole epochs."""
    batch_size: int = 1024
    """Tokens per optimizer step."""
    preset: str | None = opt(None, choices=tuple(PRESETS))
    """'paper': relu-l1, d_sae 1024, l1 1e-3, lr 2e-5, 10 epochs (explicit options win); dense: ~half the features fire."""
    name: str | None = None
    """Name under STORE/saes/ (default MODEL-lLAYER-ARCH-D_SAE)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto."""
    seed: int = opt(0, sweep=True)
    """Seed for initialisation, and (unless data_seed is given) the held-out split and the shuffling."""
    data_seed: int | None = None
    """Seed for the held-out split and the shuffling (default: seed); SAEs trained in one pass share one."""
    normalize: bool = True
    """Scale inputs to mean squared norm d_in (the scale is saved as norm_scale)."""
    buffer_mb: int = 256
    """Shuffle buffer size in MiB of float32 rows."""
    workers: int = 2
    """Threads reading and decoding chunks."""
    threads: int | None = None
    """torch CPU threads while training (default: torch's; 1 avoids oversubscription beside other jobs)."""
    eval_fraction: float = 0.05
    """Fraction of tokens held out (as whole samples) for evaluation."""
    max_eval_tokens: int = 20_000
    """Cap on held-out tokens."""
    dead_window: int = 1_000_000
    """A feature is dead after this many training tokens without an activation."""
    dense_threshold: float = 0.1
    """A feature is dense when active on more than this fraction of tokens."""
    aux_k: int | None = opt(None, shown="d_in / 2")
    """Dead latents used by the topk/batchtopk auxiliary loss."""
    aux_coef: float = 1 / 32
    """Weight of the auxiliary dead-latent loss."""
    matryoshka_widths: list[int] | None = opt(None, shown="d_sae/16, /8, /4, /2 and d_sae")
    """matryoshka-batchtopk: the nested prefixes of the dictionary, each trained to reconstruct alone (d_sae is
    added as the last)."""
    resample: int = 0
    """Re-initialise latents silent since the last time toward badly fit tokens, N times in the run's first half (0: never)."""
    task_samples: int = 256
    """Held-out samples for the spliced-fidelity check: accuracy and KL (a classification head), CE recovered (an LM
    head); 0 disables."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 disables; not used with unit_grad)."""
    unit_grad: bool | None = opt(None, flag="--unit-grad/--no-unit-grad", resolved=True)
    """Rescale each step's gradient to norm 1 before the optimizer (by default on for relu-l1 SAEs, off otherwise)."""
    b_dec_init: str | None = opt(None, choices=B_DEC_INITS, resolved="zeros")
    """Decoder bias at start: mean (of a few chunks of training rows) or zeros (by default zeros for relu-l1 SAEs)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (0: only at epoch ends)."""
    log_every: int = 50
    """Steps between metric log entries."""
    eval_points: int = 10
    """Held-out evaluations spread evenly over the run (the FVU-tokens curve in metrics.json); 0: the end only."""
    curve_eval_tokens: int = 4096
    """Held-out rows each curve point is measured on (evenly spaced; the final metrics use every held-out row)."""
    resume: bool = False
    """Require an unfinished run to continue (one is continued automatically anyway)."""
    overwrite: bool = False
    """Replace an existing SAE or unfinished run of the same name."""

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"--threads must be positive, got {self.threads}")
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ConfigError(
                    f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}"
                )
            for key, val in PRESETS[self.preset].items():
                if getattr(self, key) is None and not (
                    key == "d_sae" and self.expansion is not None
                ):
                    setattr(self, key, val)
        crosscoder = self.models is not None or self.layers is not None  # as sources()
        self.arch = self.arch or ("batchtopk" if crosscoder else "relu-l1")
        trained = [n for n, a in REGISTRY.items() if a.trained]  # the registry as it is now
        if self.arch in REGISTRY and not get_arch(self.arch).trained:
            raise ConfigError(
                f"{self.arch} SAEs are imported (actstore import-sae), not trained: choose --arch "
                f"{' or '.join(trained)}"
            )
        if self.arch not in trained:
            raise ConfigError(f"unknown --arch {self.arch!r}: choose one of {', '.join(trained)}")
        if self.d_sae is not None and self.expansion is not None:
            raise ConfigError("give --d-sae or --expansion, not both")
        if self.tokens is not None and self.epochs is not None:
            raise ConfigError("give --epochs or --tokens, not both")
        self.l1 = DEFAULT_L1 if self.l1 is None else self.l1
        self.l1_warmup = DEFAULT_L1_WARMUP if self.l1_warmup is None else self.l1_warmup
        self.optimizer = self.optimizer or default_optimizer(self.arch, crosscoder)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"unknown --optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.init is not None and self.init not in DECODER_INITS:
            raise ConfigError(
                f"unknown --init {self.init!r}: choose one of {', '.join(DECODER_INITS)}"
            )
        if self.b_dec_init is not None and self.b_dec_init not in B_DEC_INITS:
            raise ConfigError(
                f"unknown --b-dec-init {self.b_dec_init!r}: choose one of {', '.join(B_DEC_INITS)}"
            )
        warmup, decay = default_lr_schedule(self.arch, str(self.optimizer), crosscoder)
        self.lr_warmup = warmup if self.lr_warmup is None else float(self.lr_warmup)
        self.lr_decay = decay if self.lr_decay is None else float(self.lr_decay)
        if (
            self.lr is None
            and self.optimizer == "adam"
            and (get_arch(self.arch).l1_penalty or crosscoder)
        ):
            self.lr = (
                RELU_L1_LR if relu_sae(self.arch, crosscoder) else DEFAULT_LR
            )  # else by d_sae or tokens: learning_rate
        if self.tokens is None:
            self.epochs = DEFAULT_EPOCHS if self.epochs is None else self.epochs
        checks = [
            (self.d_sae is None or self.d_sae > 0, f"--d-sae must be positive, got {self.d_sae}"),
            (
                self.expansion is None or self.expansion > 0,
                f"--expansion must be positive, got {self.expansion}",
            ),
            (self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.l1 >= 0, f"--l1 must be >= 0, got {self.l1}"),
            (0 <= self.l1_warmup < 1, f"--l1-warmup must be in [0, 1), got {self.l1_warmup}"),
            (0 <= self.lr_warmup < 1, f"--lr-warmup must be in [0, 1), got {self.lr_warmup}"),
            (0 <= self.lr_decay <= 1, f"--lr-decay must be in [0, 1], got {self.lr_decay}"),
            (self.lr_warmup + self.lr_decay <= 1, "--lr-warmup + --lr-decay must be at most 1"),
            (
                self.epochs is None or self.epochs > 0,
                f"--epochs must be positive, got {self.epochs}",
            ),
            (
                self.tokens is None or self.tokens > 0,
                f"--tokens must be positive, got {self.tokens}",
            ),
            (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
            (self.k is None or self.k > 0, f"--k must be positive, got {self.k}"),
            (
                0 <= self.eval_fraction < 1,
                f"eval_fraction must be in [0, 1), got {self.eval_fraction}",
            ),
            (self.buffer_mb > 0 and self.workers > 0, "buffer_mb and workers must be positive"),
            (self.dead_window > 0, "dead_window must be positive"),
            (self.resample >= 0, f"--resample must be >= 0, got {self.resample}"),
            (self.resample == 0 or not crosscoder, "--resample is for SAEs, not crosscoders"),
            (
                self.checkpoint_every >= 0 and self.log_every > 0,
                "checkpoint_every >= 0 and log_every > 0 please",
            ),
            (self.eval_points >= 0, f"eval_points must be >= 0, got {self.eval_points}"),
            (
                self.curve_eval_tokens > 0,
                f"curve_eval_tokens must be positive, got {self.curve_eval_tokens}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        arch = get_arch(self.arch)
        foreign = [n for a in REGISTRY.values() for n in a.options
                   if n not in arch.options and getattr(self, n) not in (None, False)]  # fmt: skip
        if foreign:
            owners = sorted({a.name for a in REGISTRY.values() for n in foreign if n in a.options})
            flags = ", ".join(dict.fromkeys("--" + n.replace("_", "-") for n in foreign))
            raise ConfigError(f"{flags} {'is' if len(foreign) == 1 else 'are'} for --arch "
                              f"{' / '.join(owners)}, not {self.arch}")  # fmt: skip
        if crosscoder and not arch.crosscoder:
            raise ConfigError(f"{self.arch} is for SAEs: train crosscoders with {', '.join(CROSSCODER_ARCHS)}"
                              " (drop --models / --layers)")  # fmt: skip
        arch.check(self, crosscoder)
        if self.k is not None and not get_arch(self.arch).uses_k:
            raise ConfigError(
                f"--k is for {' / '.join(n for n, a in REGISTRY.items() if a.trained and a.uses_k)}; {self.arch} uses --l1"
            )
        # a crosscoder's sources: parsed now, so a bad --models / --layers fails before any work
        srcs = self.sources()
        if srcs is not None:
            self.model, self.layer = srcs[0].model, srcs[0].layer
        self.init = self.init or default_init(self.arch, crosscoder)
        self.b_dec_init = self.b_dec_init or default_b_dec_init(self.arch, crosscoder)
        self.unit_grad = (
            default_unit_grad(self.arch, crosscoder)
            if self.unit_grad is None
            else bool(self.unit_grad)
        )

    def resolve(self, d_in: int) -> TrainConfig:
        """This config for a layer of width ``d_in``, with what depends on it filled in: ``d_sae`` (``expansion``
        times ``d_in``; expansion then None), ``k`` (topk, batchtopk: at most d_sae / 4 by default) and ``aux_k``.
        The one config a run trains with and saves beside its SAE (the learning rate by token budget is set when the
        run knows its steps: metrics.json ``lr``). Resolving a resolved config changes nothing."""
        d_sae = self.d_sae or max(1, round((self.expansion or DEFAULT_EXPANSION) * d_in))
        k = None
        if get_arch(str(self.arch)).uses_k:
            k = self.k or max(1, min(DEFAULT_K, d_sae // 4))
            if k > d_sae:
                raise ConfigError(f"--k {k} is larger than d_sae {d_sae}")
        return dataclasses.replace(
            self,
            d_sae=d_sae,
            expansion=None,
            k=k,
            aux_k=resolved_aux_k(self.aux_k, d_in, d_sae),
            **get_arch(str(self.arch)).resolve(self, d_sae),
        )

    def arch_options(self) -> dict[str, Any]:
        """The values of the options only its architecture reads (``Arch.options``), by field name."""
        return {n: getattr(self, n) for n in get_arch(str(self.arch)).options}

    def stream_seed(self) -> int:
        """The seed of the held-out split and the data order."""
        return self.seed if self.data_seed is None else int(self.data_seed)

    def learning_rate(self, d_sae: int, tokens: int | None = None) -> float:
        """The learning rate of a run of width ``d_sae`` on ``tokens`` tokens (default ``self.tokens``): ``lr``, else
        the optimizer's default (signum: by d_sae as sparsify; Adam on a topk / batchtopk SAE: by tokens, :func:`adam_lr`)."""
        if self.lr is not None:
            return float(self.lr)
        if self.optimizer == "signum":
            return 5e-3 / math.sqrt(d_sae / 2**14)
        budget = tokens if tokens is not None else self.tokens
        return adam_lr(budget) if budget else DEFAULT_LR

    def lr_factor(self, step: int, total_steps: int) -> float:
        """The learning rate's multiplier at ``step`` (0-based) of ``total_steps``: a linear ramp from 0 over the first
        ``lr_warmup`` of the steps, 1, then a linear decay to 0 over the last ``lr_decay``."""
        f = ramp(step, float(self.lr_warmup or 0.0) * total_steps)
        decay = float(self.lr_decay or 0.0) * total_steps
        if decay >= 1:
            f = min(f, (total_steps - step) / decay)
        return max(f, 0.0)

    def transcoder_pair(self) -> tuple[Source, Source] | None:
        """A transcoder's (source, target) rows of the store, None for an SAE or crosscoder."""
        from actstore.models.names import base_key, site_key

        if self.source is None or self.target is None:
            return None
        base = base_key(self.model)
        out = []
        for spec in (self.source, self.target):
            site, layer = spec.split("@")
            out.append(Source(site_key(base, site), int(layer)))
        return out[0], out[1]

    def sources(self) -> list[Source] | None:
        """A crosscoder's sources (``models`` / ``layers``), None for an SAE."""
        if self.models is None and self.layers is None:
            return None
        return parse_sources(
            self.models or self.model, self.layers if self.layers is not None else self.layer
        )

    def default_name(self, d_sae: int) -> str:
        from actstore.models.names import sanitize_key

        srcs = self.sources()
        if self.target is not None:  # a transcoder: MODEL-lLAYER-transcoder-TARGET-D_SAE
            return sanitize_key(f"{self.model}-l{self.layer}-{self.arch}-{self.target}-{d_sae}")
        if srcs is None:
            return sanitize_key(f"{self.model}-l{self.layer}-{self.arch}-{d_sae}")
        models = "-".join(dict.fromkeys(s.model for s in srcs))
        layers = "-".join(str(v) for v in dict.fromkeys(s.layer for s in srcs))
        return sanitize_key(f"cc-{models}-l{layers}-{self.arch}-{d_sae}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


EXPORT_FORMATS = ("saelens", "sparsify", "actstore")
IMPORT_FORMATS = ("saelens", "sparsify")


@dataclass
class ImportConfig:
    """One ``actstore import-sae`` run: a SAELens or sparsify folder mapped onto a model and layer of a store."""

    path: str
    """Local folder holding cfg.json and the safetensors weights."""
    format: str = field(metadata=cli(choices=IMPORT_FORMATS))
    """saelens: cfg.json + sae_weights.safetensors; sparsify: cfg.json + sae.safetensors (one hook point)."""
    model: str | None = None
    """Store key of the model it reads (default: the store's only model)."""
    layer: int | None = None
    """hidden_states index it reads (default: from its hook point)."""
    name: str | None = None
    """Name under STORE/saes/ (default MODEL-lLAYER-FORMAT-ARCH-D_SAE)."""
    force: bool = False
    """Import even when it does not fit the layer's rows (FVU >= 1)."""
    overwrite: bool = False
    """Replace an SAE of the same name."""
    max_eval_tokens: int = 20_000
    """Rows of the layer the fit check reads (all when fewer)."""
    seed: int = 0
    """Seed of the rows the fit check draws."""

    def __post_init__(self) -> None:
        if self.format not in IMPORT_FORMATS:
            raise ConfigError(
                f"unknown --format {self.format!r}: choose one of {', '.join(IMPORT_FORMATS)}"
            )
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"--layer must be >= 0, got {self.layer}")
        if self.max_eval_tokens <= 0:
            raise ConfigError(f"max_eval_tokens must be positive, got {self.max_eval_tokens}")


DENSE_L0_FRACTION = 0.10
