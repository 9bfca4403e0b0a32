"""The extraction stage's settings: ``ExtractConfig`` and its layer spec.

Torch-free, so the CLI builds its options (defaults, choices, help) from these fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from actstore.data.corpora import DataConfig
from actstore.errors import ConfigError
from actstore.fields import cli, opt
from actstore.format import codecs
from actstore.models.names import MODEL_DTYPES, SITES, sanitize_key

COMPRESSIONS = ("auto", "none", "zstd")
"""Compressors of new layer arrays (docs/FORMAT.md): int8 and fp16 activations barely compress, bf16 a fifth."""
ZSTD_CODECS = ("bf16", "fp32")
"""Codecs whose layer arrays ``compression="auto"`` zstd's."""
CODEC_PLACES = ("auto", "device", "writers")
DEFAULT_CHUNK_ROWS = 4096
DEFAULT_INNER_ROWS = 1024
"""Rows per inner chunk of a sharded layer array: a 4096-row shard holds 4, so streaming decodes at the speed of
unsharded chunks while a random-row read fetches a quarter of a shard (256-row chunks: 0.66x the streaming speed)."""


def layer_list(spec: str) -> list[int]:
    """``"2,4,6"`` or ``"0-6"`` (ranges included) -> ints in the order given, repeats kept."""
    return int_list(spec)


def int_list(spec: str, what: str = "layers", item: str = "layer") -> list[int]:
    """``"2,4,6"`` or ``"0-6"`` (ranges included) -> ints in the order given, repeats kept: the one reading of an
    integer list on a command line (layers, sweeps); ``what`` and ``item`` name them in its errors."""
    out: list[int] = []
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        try:
            ends = [int(x) for x in part.split("-", 1)] if "-" in part[1:] else [int(part)]
        except ValueError:
            raise ConfigError(
                f"cannot read {what} {spec!r}: use numbers like 2,4,6 or a range 0-6"
            ) from None
        if len(ends) == 2 and ends[1] < ends[0]:
            raise ConfigError(
                f"{item} range {part!r} runs backwards: write it low-high, e.g. {ends[1]}-{ends[0]}"
            )
        out += range(ends[0], ends[-1] + 1)
    return out


def parse_layers(spec: str | list[int] | tuple[int, ...]) -> list[int]:
    """``"2,4,6"``, ``"0-6"`` or a list -> sorted unique ints."""
    out = (
        sorted({int(x) for x in spec})
        if isinstance(spec, list | tuple)
        else sorted(set(layer_list(spec)))
    )
    if not out:
        raise ConfigError("no layers given: use --layers 2,4,6, a range 0-6, or 'all'")
    return out


@dataclass
class ExtractConfig:
    """Everything one ``actstore extract`` run needs."""

    model: str
    """Hugging Face id, local directory, or bundled:minilm / bundled:minilm-sre."""
    data: DataConfig
    """The corpus and its fields."""
    layers: list[int] | str = field(metadata=cli(metavar="LAYERS"))
    """hidden_states indices to store: 2,4,6 or 0-6 or 'all' (0 = the embeddings)."""
    name: str | None = None
    """Store key for the model (default: derived from the model name); a sublayer --site adds '.SITE' to it."""
    site: str = opt("resid", choices=SITES)
    """Where in each block to read: resid (hidden_states[L]), or block L's mlp_in, mlp_out or attn_out (before the
    residual add), stored under the key MODEL.SITE."""
    max_length: int | None = opt(None, shown="min(512, the model's limit)")
    """Truncate samples to this many tokens (up to the model's context). With --window: the longest sample kept
    (default: no truncation)."""
    window: int | None = None
    """Split long samples into context windows of this many tokens, one forward pass each (rows stay one per token)."""
    stride: int | None = None
    """Tokens between window starts (default: the window, no overlap); a token's row comes from its first window."""
    dtype: str = opt("auto", choices=MODEL_DTYPES)
    """Precision of the model weights: fp32, fp16, bf16, or auto (bf16 on CUDA, fp32 on CPU)."""
    batch_size: int = 32
    """Samples per forward pass (batches are bucketed by length)."""
    codec: str = opt("fp16", choices=codecs.CODECS)
    """Stored precision: fp32, fp16, bf16 or int8 (per-token scale)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when present)."""
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    """Token rows per Zarr chunk (only used when the store's tokenization is created)."""
    inner_rows: int = DEFAULT_INNER_ROWS
    """Rows per inner chunk of a layer shard (a random-row read fetches only these; 0: unsharded, one object per chunk)."""
    unit_mb: int = 256
    """Memory budget (MiB) of float32 rows held per unit of work before writing."""
    unit_rows: int | None = opt(None, shown="from unit_mb")
    """Rows per unit of work, rounded up to whole chunks."""
    new_tokenization: bool = False
    """Allow a model whose tokenizer differs from the store's: add a new token index."""
    threads: int | None = None
    """torch CPU threads of the forward pass, per worker (default: torch's own)."""
    ray_workers: int | None = None
    """Ray actors with --ray (default: one per GPU, else one per --threads CPUs of the cluster)."""
    writer_threads: int | None = opt(None, shown="2 on a CPU; beside a GPU, the cores up to 8")
    """Threads per worker that encode and write rows."""
    codec_on: str = opt("auto", choices=CODEC_PLACES)
    """Where the codec runs: device (in the forward pass: only stored bytes cross to the host), writers (in the writer
    threads), or auto (device on CUDA, else writers)."""
    compression: str = opt("auto", choices=COMPRESSIONS)
    """Compressor of new layer arrays: zstd (level 1, ~0.8 GB/s a core), none (checksummed only), or auto (zstd for
    bf16 and fp32, bf16 21% smaller; none for int8 and fp16, which it makes only 7-8% smaller; docs/FORMAT.md)."""

    def __post_init__(self) -> None:
        if self.codec not in codecs.CODECS:
            raise ConfigError(
                f"unknown codec {self.codec!r}: choose one of {', '.join(codecs.CODECS)}"
            )
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if self.site not in SITES:
            raise ConfigError(f"unknown --site {self.site!r}: choose one of {', '.join(SITES)}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        if (
            self.chunk_rows <= 0
            or self.unit_mb <= 0
            or (self.unit_rows is not None and self.unit_rows <= 0)
        ):
            raise ConfigError("chunk_rows, unit_mb and unit_rows must be positive")
        if any(
            v is not None and v <= 0 for v in (self.threads, self.ray_workers, self.writer_threads)
        ):
            raise ConfigError("--threads, --ray-workers and --writer-threads must be positive")
        if self.codec_on not in CODEC_PLACES:
            raise ConfigError(
                f"unknown --codec-on {self.codec_on!r}: choose one of {', '.join(CODEC_PLACES)}"
            )
        if self.compression not in COMPRESSIONS:
            raise ConfigError(
                f"unknown --compression {self.compression!r}: choose one of {', '.join(COMPRESSIONS)}"
            )
        if self.window is not None and self.window < 2:
            raise ConfigError(f"--window must be at least 2 tokens, got {self.window}")
        if self.stride is not None and (self.window is None or not 1 <= self.stride <= self.window):
            raise ConfigError(
                f"--stride needs --window and 1 <= stride <= window, got stride {self.stride}, window {self.window}"
            )
        if self.window is not None and self.stride is None:
            self.stride = self.window
        from actstore.models.names import MODEL_DTYPES

        if self.dtype not in MODEL_DTYPES:
            raise ConfigError(
                f"unknown --dtype {self.dtype!r}: choose one of {', '.join(MODEL_DTYPES)}"
            )
        if self.inner_rows < 0:
            raise ConfigError(
                f"--inner-rows must be 0 (unsharded) or positive, got {self.inner_rows}"
            )
        if self.layers != "all":
            self.layers = parse_layers(self.layers)
        if self.name is not None:
            self.name = sanitize_key(self.name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def zstd(self) -> bool:
        """Whether new layer arrays are zstd'd (``compression`` resolved for ``codec``)."""
        return self.compression == "zstd" or (
            self.compression == "auto" and self.codec in ZSTD_CODECS
        )


class Source(NamedTuple):
    """One input of a crosscoder: a model's layer."""

    model: str
    """Store key of the model."""
    layer: int
    """Layer (hidden_states index)."""

    def label(self) -> str:
        return f"{self.model}@{self.layer}"


def parse_sources(models: str | list[str], layers: str | list[int] | int) -> list[Source]:
    """The sources of ``--models A,B --layer L`` (every model at one layer), ``--models A --layers 2,4`` (one model at
    several layers), or equal-length lists (model i at layer i)."""
    ms = [m.strip() for m in models.split(",")] if isinstance(models, str) else list(models)
    if isinstance(layers, int):
        layers = [layers]
    ls = (
        layer_list(layers) if isinstance(layers, str) else [int(v) for v in layers]
    )  # in order: model i at layer i
    ms = [m for m in ms if m]
    if not ms or not ls:
        raise ConfigError("a crosscoder needs --models (comma separated) and --layer or --layers")
    if len(ms) == 1:
        ms = ms * len(ls)
    elif len(ls) == 1:
        ls = ls * len(ms)
    if len(ms) != len(ls):
        raise ConfigError(
            f"--models has {len(ms)} entries and --layers {len(ls)}: give one layer, one model, or as many of each"
        )
    sources = [Source(m, lay) for m, lay in zip(ms, ls, strict=True)]
    if len(sources) < 2:
        raise ConfigError(
            "a crosscoder reads at least two sources: --models A,B (same layer) or --models A --layers L1,L2"
        )
    if len(set(sources)) != len(sources):
        raise ConfigError(
            f"a crosscoder's sources must differ, got {', '.join(s.label() for s in sources)}"
        )
    if any(s.layer < 0 for s in sources):
        raise ConfigError("layers must be >= 0")
    return sources
