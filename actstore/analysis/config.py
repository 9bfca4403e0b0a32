"""Settings of the paper's analyses: compare, diff-features, show, report, demo.

Torch-free, so the CLI builds its options (defaults, choices, help) from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from actstore.errors import ConfigError
from actstore.format.layout import check_name

METRICS = ("mean-cosine", "token-cosine", "cka")
"""The layer-wise similarity measures ``compare`` offers."""


# ---------------------------------------------------------------- over a store
@dataclass
class CompareConfig:
    """What ``actstore compare`` computes."""

    models: tuple[str, str] | None = None
    """The two model keys (default: the store's two models)."""
    layers: list[int] | None = None
    """Layers to compare (default: every layer both models have)."""
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    """Any of mean-cosine, token-cosine, cka."""
    cka_rows: int = 100_000
    """CKA on a seeded uniform sample of about this many token rows (0: all rows)."""
    seed: int = 0
    """Seed of the CKA row sample."""

    def __post_init__(self) -> None:
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise ConfigError(
                f"unknown metric {bad[0] if bad else '(none)'}: choose from {', '.join(METRICS)}"
            )
        if self.models is not None:
            self.models = tuple(self.models)  # type: ignore[assignment]
            if len(self.models) != 2 or self.models[0] == self.models[1]:
                raise ConfigError(
                    f"--models needs two different model keys, e.g. --models minilm,minilm-ft; got {self.models}"
                )
        if self.cka_rows < 0:
            raise ConfigError(f"--cka-rows must be 0 (all rows) or positive, got {self.cka_rows}")


CROSSCODER_CLASSES = ("shared", "changed", "a-only", "b-only", "dead")
"""A crosscoder latent's class from its decoder norms (``actstore diff-crosscoder``)."""


@dataclass
class CrosscoderDiffConfig:
    """What ``actstore diff-crosscoder`` computes (saved beside the crosscoder as ``latents.json``)."""

    sae: str
    """The crosscoder (under STORE/saes/)."""
    a: str | None = None
    """Source A, by model key or MODEL@LAYER (default: the crosscoder's first source, e.g. the pretrained model)."""
    b: str | None = None
    """Source B (default: its second source, e.g. the fine-tuned model)."""
    only: float = 0.1
    """Relative norm at most this: A-only; at least 1 - this: B-only."""
    shared_band: float = 0.1
    """Relative norm within this of 0.5, and decoder cosine >= shared_cos: shared (else changed)."""
    shared_cos: float = 0.5
    """Decoder cosine between the sources a shared latent needs."""
    nu: float = 0.2
    """Latent Scaling: an A-only / B-only latent whose nu (error or reconstruction) is at least this is flagged: the
    other model carries its direction after all (Complete Shrinkage / Latent Decoupling, Minder et al. 2025)."""
    rows: int = 0
    """Token rows Latent Scaling reads, a seeded evenly spaced subset of about this many (0: every row)."""
    batch_rows: int = 4096
    """Rows per batch of the scan."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto."""

    def __post_init__(self) -> None:
        check_name(self.sae, "SAE")
        if not 0 < self.only < 0.5 - self.shared_band or self.shared_band < 0:
            raise ConfigError(
                f"thresholds need 0 < --only ({self.only}) < 0.5 - --shared-band ({self.shared_band})"
            )
        if not -1 <= self.shared_cos <= 1 or self.nu <= 0:
            raise ConfigError(
                f"--shared-cos must be in [-1, 1] and --nu positive, got {self.shared_cos}, {self.nu}"
            )
        if self.rows < 0 or self.batch_rows <= 0:
            raise ConfigError(
                f"--rows must be >= 0 and --batch-rows positive, got {self.rows}, {self.batch_rows}"
            )


EVALS = ("sparse_probing", "absorption")
"""What ``actstore eval`` can measure."""
PROBE_KS = (1, 2, 5, 10, 20)
"""Features a k-sparse probe may use (SAEBench's sparse probing)."""


@dataclass
class EvalConfig:
    """What ``actstore eval`` measures of an SAE: sparse probing on the store's labels, first-letter absorption
    (saved as ``evals.json``)."""

    sae: str
    """The SAE (under STORE/saes/); sparse probing pools its layer's rows per sample."""
    k: list[int] = field(default_factory=lambda: list(PROBE_KS))
    """Features a k-sparse probe uses, chosen by the difference of class means on the training samples."""
    max_samples: int = 4000
    """Labelled samples probed at most (a seeded draw when the store has more)."""
    max_classes: int = 10
    """One-vs-rest tasks: the most frequent labels, at most this many (a two-label store: one task)."""
    test_fraction: float = 0.2
    """Samples held out from every probe's fit, drawn once (seeded) for all tasks."""
    l2: float = 1.0
    """Inverse L2 strength of each logistic probe, as scikit-learn's C (on standardized inputs)."""
    batch_rows: int = 4096
    """Token rows per SAE forward pass while pooling."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto."""
    seed: int = 0
    """Seed of the sample draw and the train / test split."""
    evals: list[str] = field(default_factory=lambda: ["sparse_probing"])
    """Evaluations to run: sparse_probing (the store's labels), absorption (first letters; runs the model)."""
    model: str | None = None
    """Absorption: the model to prompt (default: the path the store records for the SAE's model)."""
    absorption_icl: int = 10
    """Absorption: in-context examples before each word's prompt ("tartan has the first letter: T")."""
    absorption_words: int = 0
    """Absorption: vocabulary words prompted, a seeded draw (0: every whole alphabetic word)."""
    absorption_max_k: int = 10
    """Absorption: most main latents a letter may split into."""
    absorption_f1_jump: float = 0.03
    """Absorption: a letter's k-sparse probe grows by one latent while its F1 rises by at least this."""
    absorption_min_f1: float = 0.6
    """Absorption: letters whose ground-truth probe F1 is below this are not scored."""
    absorption_min_letters: int = 20
    """Absorption: fewer scored letters than this and the model cannot spell: an error, not a score."""
    absorption_batch: int = 32
    """Absorption: prompts per forward pass."""

    def __post_init__(self) -> None:
        check_name(self.sae, "SAE")
        bad = [e for e in self.evals if e not in EVALS]
        if bad or not self.evals:
            raise ConfigError(
                f"unknown evaluation {bad[0] if bad else '(none)'}: choose from {', '.join(EVALS)}"
            )
        if (
            min(self.absorption_icl, self.absorption_words) < 0
            or min(self.absorption_max_k, self.absorption_min_letters, self.absorption_batch) < 1
            or not 0 <= self.absorption_min_f1 <= 1
            or self.absorption_f1_jump < 0
        ):
            raise ConfigError(
                "--absorption-icl and --absorption-words must be >= 0, --absorption-max-k, --absorption-min-letters "
                "and --absorption-batch positive, --absorption-min-f1 in [0, 1], --absorption-f1-jump >= 0"
            )
        self.k = sorted({int(v) for v in self.k})
        if not self.k or self.k[0] < 1:
            raise ConfigError(f"--k needs positive feature counts, e.g. 1,5,20; got {self.k}")
        if self.max_samples < 10 or self.max_classes < 1 or self.batch_rows < 1 or self.l2 <= 0:
            raise ConfigError(
                "--max-samples must be at least 10, --max-classes, --batch-rows and --l2 positive"
            )
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")


@dataclass
class DiffConfig:
    """What ``actstore diff-features`` compares (saved as ``diff.json``)."""

    sae_a: str
    """First SAE (e.g. on the pretrained model)."""
    sae_b: str
    """Second SAE (e.g. on the fine-tuned model, same layer)."""
    rows: int = 50_000
    """Token rows for the activation correlation: a seeded sample of about this many (0: all rows)."""
    retain: float = 0.7
    """Threshold on both scores for 'retained'."""
    match: float = 0.4
    """Threshold on either score for 'modified' (below it: lost / new)."""
    activation_corr: bool = True
    """Compute the activation correlation (off: decoder cosine only)."""
    name: str | None = None
    """Name under STORE/diffs/ (default: A__B)."""
    seed: int = 0
    """Seed of the row sample."""

    def __post_init__(self) -> None:
        if not 0 < self.match <= self.retain <= 1:
            raise ConfigError(
                f"thresholds need 0 < --match ({self.match}) <= --retain ({self.retain}) <= 1"
            )
        if self.rows < 0:
            raise ConfigError(f"--rows must be 0 (all) or positive, got {self.rows}")
        if self.name is None:
            self.name = f"{self.sae_a}__{self.sae_b}"
        check_name(self.name, "diff")


@dataclass
class ShowConfig:
    """What ``actstore show`` draws."""

    saes: list[str]
    """SAE names: one for every model, or one per model."""
    features: list[int]
    """Feature indices: one for every SAE, or one per SAE."""
    texts: list[str] = field(default_factory=list)
    """Free texts, run through each model live."""
    sample_ids: list[str] = field(default_factory=list)
    """Ids of stored samples, read from the store."""
    models: list[str] | None = None
    """Model keys to show (default: each SAE's own model)."""
    device: str = "cpu"
    """Device for live forward passes."""
    max_tokens: int | None = None
    """Show at most this many tokens of each sentence (default: all)."""

    def __post_init__(self) -> None:
        if not self.saes:
            raise ConfigError(
                "no SAE given: pass --sae NAME (see actstore info for the store's SAEs)"
            )
        if not self.features:
            raise ConfigError("no feature given: pass --feature F")
        if len(self.features) not in (1, len(self.saes)):
            raise ConfigError(
                f"give one --feature for all SAEs or one per --sae ({len(self.saes)}), not {len(self.features)}"
            )
        if not self.texts and not self.sample_ids:
            raise ConfigError('nothing to show: pass --text "..." and/or --sample-id ID')
        if self.models is not None and len(self.saes) not in (1, len(self.models)):
            raise ConfigError(
                f"give one --sae for all models or one per model ({len(self.models)}), not {len(self.saes)}"
            )


@dataclass
class ReportConfig:
    """What ``actstore report`` puts in the page."""

    out: str
    """Output directory (index.html, summary.md, *.png, report.json)."""
    models: tuple[str, str] | None = None
    """The two models to compare (default: the store's two models)."""
    top_features: int = 5
    """Top features by variance shown per SAE."""
    top_tokens: int = 8
    """Top-activating tokens shown per feature."""
    views: int = 2
    """Stored samples shown as token views for the best feature of each SAE."""
    context: int = 12
    """Tokens shown on each side of the hit in a token view."""
    diff_rows: int = 50_000
    """Token rows sampled for the feature diff's activation correlation."""
    cka_rows: int = 100_000
    """Token rows sampled for CKA."""
    dashboard: bool = True
    """Write each encoded SAE's top features as static pages (feature-pages/<sae>/, as actstore dashboard) and link them."""

    def __post_init__(self) -> None:
        if min(self.top_features, self.top_tokens, self.views) < 0 or self.context < 1:
            raise ConfigError("top_features, top_tokens and views must be >= 0, context >= 1")
        if self.models is not None:
            self.models = tuple(self.models)  # type: ignore[assignment]
            if len(self.models) != 2:
                raise ConfigError(f"--models needs two model keys A,B, got {self.models}")


@dataclass
class DemoConfig:
    """The demo's knobs; the defaults finish within minutes on a 2-core CPU."""

    out: str = "demo-out"
    """Output folder: finetuned/ model, store.zarr, report/."""
    model: str = "bundled:minilm"
    """Model to fine-tune and compare."""
    data: str = "bundled:bbc"
    """Labelled corpus."""
    limit: int = 400
    """Samples drawn (seeded) from the corpus: 80% train, 10% validation, 10% test."""
    epochs: int = 2
    """Fine-tuning epochs (the paper: 10)."""
    lr: float = 1e-4
    """Fine-tuning Adam learning rate (the paper: 2e-5; higher here because the run is short)."""
    max_length: int = 64
    """Tokens per sample for fine-tuning and extraction (a BBC headline and lead fit in 64)."""
    batch_size: int = 16
    """Fine-tuning batch size."""
    sae_layers: list[int] | None = None
    """SAE layers (default: a quarter, half and all of the depth)."""
    sae_expansion: float = 4 / 3
    """d_sae / d_model (the paper: 1024 / 768)."""
    sae_k: int | None = None
    """Active features per token of the demo's TopK SAEs (default: 4% of d_sae, at least 1)."""
    paper_sae: bool = True
    """Also train the paper's ReLU + L1 1e-3 SAE at the last layer of the fine-tuned model (shown, flagged dense)."""
    sae_lr: float | None = None
    """SAE learning rate (default: the trainer's for the run's token budget; the paper: 2e-5 over far more tokens)."""
    sae_resample: int = 4
    """Dead-latent resamplings of each TopK SAE (a run of ~70 steps needs them: 16% -> 3.5% never firing at layer 6)."""
    sae_epochs: int = 3
    """SAE epochs (the paper: 10)."""
    sae_batch_size: int = 1024
    """Tokens per SAE step."""
    effects_ablate: int = 10
    """Features of each SAE ablated exactly after attribution (actstore effects; 0: attribution only)."""
    device: str = "auto"
    """cpu, cuda or auto."""
    seed: int = 0
    """Seed for the sample, the split, the heads and the SAEs."""

    def __post_init__(self) -> None:
        if self.limit < 20:
            raise ConfigError(f"the demo needs at least 20 samples (--limit), got {self.limit}")
        if self.epochs < 1 or self.sae_epochs < 1:
            raise ConfigError("epochs must be at least 1")
        if self.effects_ablate < 0:
            raise ConfigError(f"--effects-ablate must be >= 0, got {self.effects_ablate}")
