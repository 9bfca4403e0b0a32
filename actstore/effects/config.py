"""The effects stage's settings (``actstore effects``, ``actstore steer``).

Torch-free, so the CLI builds its options (defaults, choices, help) from these fields."""

from __future__ import annotations

from dataclasses import dataclass

from actstore.errors import ConfigError
from actstore.fields import opt
from actstore.format.layout import check_name

TARGETS = ("predicted", "label", "logits")
"""What a classifier's attribution is to: the predicted class's log-probability, the true label's margin, every
class logit."""
ABLATE_MODES = ("zero", "mean", "patch")
"""What an ablated feature is set to: zero, its mean, or its value on another model's rows of the same tokens."""


@dataclass
class EffectsConfig:
    """What ``actstore effects`` computes: each SAE feature's effect on a model's output over the store's samples
    (saved in ``saes/<sae>/effects/<model>/``)."""

    sae: str
    """The SAE (under STORE/saes/), spliced into the model at its layer with its reconstruction error added back."""
    model: str | None = None
    """The model, by store key or as a model directory of the same tokenizer (default: the SAE's own): a classifier
    (sequence-classification head) or a decoder LM."""
    target: str = opt("predicted", choices=TARGETS)
    """Classifiers: attribution to the predicted class's log-probability (predicted), to the true label's logit
    margin over the best other class (label), or to every class logit (logits). Decoder LMs: to the sample's
    summed next-token loss."""
    max_samples: int = 0
    """Samples attributed, the first ones in store order (0: all)."""
    batch_size: int = 16
    """Samples per forward and backward pass."""
    part_samples: int = 256
    """Samples per finished part: what a killed run keeps and a resumed one skips."""
    ablate_top: int = 20
    """Exact ablation of this many features, those with the largest total |attribution| (0: none)."""
    ablate_features: list[int] | None = None
    """Features to ablate besides the top ones."""
    ablate_mode: str = opt("zero", choices=ABLATE_MODES)
    """What an ablated feature is set to: zero, its mean activation over the samples' tokens, or (patch) its value
    at each token on another model's stored rows of that token."""
    patch_from: str | None = None
    """For patching: the store model whose rows the patched values are encoded from (default: the SAE's own model,
    when the SAE is spliced into another, e.g. the pretrained model's SAE in the fine-tuned classifier)."""
    ablate_samples: int = 0
    """Samples each ablation runs over, the first attributed ones (0: all attributed samples)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto."""
    overwrite: bool = False
    """Recompute from scratch (a finished table, or the parts of a killed run with other settings)."""
    break_lock: bool = False
    """Take over the lock of a writer that died on another host."""

    def __post_init__(self) -> None:
        check_name(self.sae, "SAE")
        if self.model is not None and "/" not in self.model and "\\" not in self.model:
            check_name(self.model, "model")
        if self.patch_from is not None:
            check_name(self.patch_from, "model")
            if self.ablate_mode != "patch":
                raise ConfigError("--patch-from is for --ablate-mode patch")
        if self.target not in TARGETS:
            raise ConfigError(
                f"unknown --target {self.target!r}: choose one of {', '.join(TARGETS)}"
            )
        if self.ablate_mode not in ABLATE_MODES:
            raise ConfigError(
                f"unknown --ablate-mode {self.ablate_mode!r}: choose one of {', '.join(ABLATE_MODES)}"
            )
        if min(self.max_samples, self.ablate_top, self.ablate_samples) < 0:
            raise ConfigError("--max-samples, --ablate-top and --ablate-samples must be >= 0")
        if self.batch_size < 1 or self.part_samples < 1:
            raise ConfigError("--batch-size and --part-samples must be positive")
        if self.ablate_features is not None:
            self.ablate_features = sorted({int(f) for f in self.ablate_features})
            if self.ablate_features and self.ablate_features[0] < 0:
                raise ConfigError(
                    f"--ablate-features must be feature indices >= 0, got {self.ablate_features}"
                )

    def identity(self) -> dict[str, object]:
        """What the attribution table depends on: a killed run resumes only with the same."""
        return {"sae": self.sae, "model": self.model, "target": self.target, "max_samples": self.max_samples,
                "part_samples": self.part_samples}  # fmt: skip


@dataclass
class SteerConfig:
    """What ``actstore steer`` runs: the model on a text with one SAE feature clamped, beside the unsteered run."""

    sae: str
    """The SAE (under STORE/saes/), spliced into the model at its layer with its reconstruction error added back."""
    feature: int
    """The feature to clamp."""
    value: float
    """Its activation at every token of the text (0 ablates it)."""
    text: str
    """The text to run."""
    model: str | None = None
    """The model, by store key (default: the SAE's own): a classifier or a decoder LM."""
    tokens: int = 10
    """Decoder LMs: greedy continuation length (and the top next tokens shown)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto."""

    def __post_init__(self) -> None:
        check_name(self.sae, "SAE")
        if self.model is not None:
            check_name(self.model, "model")
        if self.feature < 0:
            raise ConfigError(f"--feature must be a feature index >= 0, got {self.feature}")
        if not self.text.strip():
            raise ConfigError("--text is empty: give the text to run")
        if self.tokens < 0:
            raise ConfigError(f"--tokens must be >= 0, got {self.tokens}")
