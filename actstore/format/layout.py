"""The store's on-disk layout: the only module that spells a store key, an attribute name or the format version.

Every other module asks here for the key of what it reads or writes (``layer_array("minilm", 4)`` ->
``models/minilm/layer_4``), so a reader traces a layer from ``--layers 4`` to its Zarr array in one
place, and a change of layout is a change of this file (and ``docs/FORMAT.md``, which describes it).

::

    STORE/
      zarr.json                               root group; attributes[ATTR] = {format, created, ...}
      tokenizations/<tk>/                     a token index (tokenize stage)
        sample, position, token_id            int32 (n_tokens,)
        sample_first_row, sample_n_tokens     int64 / int32 (n_samples,)
        tokens/part-NNNNN.parquet, samples/part-NNNNN.parquet, vocab.parquet
      models/<model>/                         one group per model (extract stage)
        layer_<L>, layer_<L>_scale            (n_tokens, d_model) activations; int8's per-token scale
        finetune_report.json                  an actstore finetune report, copied at extraction
      saes/<name>/                            sae.safetensors, cfg.json, metrics.json, checkpoint/ (train stage)
      features/<sae>/                         encoding.json, pending.json, gen-<N>/acts/*.parquet, gen-<N>/stats.parquet
      diffs/<name>/                           diff.parquet, diff.json (diff-features)
      manifest.json                           size + SHA-256 of every non-chunk file (integrity)
      units/<array>/<first row>.done          format 3: one completion marker per finished unit of a layer array
      locks/<what>.lock                       one per array, SAE, encoding or diff being written; one per unit claimed
"""

from __future__ import annotations

import re
from typing import Any

from actstore.errors import ConfigError

FORMAT_VERSION = 3
"""Version of the store format (the root group's ``attributes[ATTR]["format"]``) that new stores get.
3: each unit of a new layer array has its own completion marker (units complete in any order, many writers per
array); 2: layer arrays are sharded (one shard object per chunk_rows rows, small inner chunks); 1: one object per
chunk."""
READABLE_FORMATS = (1, 2, 3)
"""Store formats this version reads (and extends: a format-1 store keeps unsharded arrays, a format-2 store keeps
one writer per array and its ``committed_rows`` prefix)."""
SHARDED_SINCE = 2
"""The first format whose new layer arrays are sharded."""
UNIT_MARKERS_SINCE = 3
"""The first format whose new layer arrays record each unit's completion by a marker object."""
PROGRESS_UNITS = "units"
"""A layer array's ``progress`` attribute when its units complete by markers (absent: by ``committed_rows``)."""
ATTR = "actstore"
"""The attribute under which every actstore group and array keeps its metadata."""

ROOT_META = "zarr.json"
MANIFEST = "manifest.json"
TOKENIZATIONS = "tokenizations"
MODELS = "models"
SAES = "saes"
FEATURES = "features"
DIFFS = "diffs"
LOCKS = "locks"
UNITS = "units"

TOKEN_TABLES = ("tokens", "samples")
"""The Parquet tables of a token index."""
SAE_WEIGHTS, SAE_CONFIG, SAE_METRICS = "sae.safetensors", "cfg.json", "metrics.json"
SAE_EVALS = "evals.json"
"""An SAE's evaluations (``actstore eval``: sparse probing)."""
SAE_CHECKPOINT_DIR = "checkpoint"
SAE_CHECKPOINT = f"{SAE_CHECKPOINT_DIR}/state.safetensors"
ENCODING, PENDING = "encoding.json", "pending.json"
DIFF_TABLE, DIFF_META = "diff.parquet", "diff.json"
CROSSCODER_LATENTS, CROSSCODER_DIFF = "latents.parquet", "latents.json"
"""A crosscoder's per-latent diff (``actstore diff-crosscoder``), in its ``saes/<name>/`` folder."""
EFFECTS = "effects"
EFFECTS_TABLE, EFFECTS_META, ABLATIONS_TABLE = (
    "effects.parquet",
    "effects.json",
    "ablations.parquet",
)
"""An SAE's causal effects on a model's output (``actstore effects``), in ``saes/<name>/effects/<model>/``."""
ABLATION_SAMPLES = "ablation_samples.parquet"
"""Per ablated feature and sample: the target's change and the prediction before and after."""
EFFECTS_PARTS = "parts"
FINETUNE_REPORT = "finetune_report.json"
_LAYER = "layer_"
SCALE_SUFFIX = "_scale"
"""An int8 layer's scale array is its layer array's name plus this."""


# ---------------------------------------------------------------- token index
def tokenization_dir(tk: str) -> str:
    return f"{TOKENIZATIONS}/{tk}"


def token_array(tk: str, name: str) -> str:
    """A Zarr array of the token index (``sample``, ``position``, ``token_id``, ``sample_first_row``, ...)."""
    return f"{TOKENIZATIONS}/{tk}/{name}"


def token_table_dir(tk: str, table: str) -> str:
    return f"{TOKENIZATIONS}/{tk}/{table}"


def token_table_part(tk: str, table: str, file: str) -> str:
    return f"{TOKENIZATIONS}/{tk}/{table}/{file}"


def vocab_file(tk: str) -> str:
    return f"{TOKENIZATIONS}/{tk}/vocab.parquet"


# ---------------------------------------------------------------- models and layers
def model_dir(model: str) -> str:
    return f"{MODELS}/{model}"


def layer_name(layer: int) -> str:
    return f"{_LAYER}{layer}"


def parse_layer_name(name: str) -> int | None:
    """The layer of an array name ``layer_<L>`` (None for anything else, ``layer_<L>_scale`` included)."""
    rest = name[len(_LAYER) :] if name.startswith(_LAYER) else ""
    return int(rest) if rest.isdigit() else None


def layer_array(model: str, layer: int) -> str:
    """The ``(n_tokens, d_model)`` activations of ``model`` at ``layer`` (a ``hidden_states`` index)."""
    return f"{MODELS}/{model}/{layer_name(layer)}"


def scale_array(model: str, layer: int) -> str:
    """The int8 preset's per-token scale array beside :func:`layer_array`."""
    return layer_array(model, layer) + SCALE_SUFFIX


def finetune_report(model: str) -> str:
    return f"{MODELS}/{model}/{FINETUNE_REPORT}"


# ---------------------------------------------------------------- SAEs
def sae_dir(name: str) -> str:
    return f"{SAES}/{name}"


def sae_file(name: str, file: str) -> str:
    """A file of SAE ``name``: :data:`SAE_WEIGHTS`, :data:`SAE_CONFIG`, :data:`SAE_METRICS` or :data:`SAE_CHECKPOINT`."""
    return f"{SAES}/{name}/{file}"


def effects_dir(sae: str, model: str) -> str:
    """The folder of SAE ``sae``'s effects on model ``model``'s output: ``saes/<sae>/effects/<model>``."""
    return f"{SAES}/{sae}/{EFFECTS}/{model}"


def effects_file(sae: str, model: str, file: str) -> str:
    """A file of :func:`effects_dir`: :data:`EFFECTS_TABLE`, :data:`EFFECTS_META` or :data:`ABLATIONS_TABLE`."""
    return f"{effects_dir(sae, model)}/{file}"


def effects_part(sae: str, model: str, first_sample: int) -> str:
    """One finished block of samples of an unfinished attribution run, named by its first sample."""
    return f"{effects_dir(sae, model)}/{EFFECTS_PARTS}/part-{first_sample:012d}.parquet"


def parse_effects_part(name: str) -> int | None:
    """The first sample of a part file name ``part-<12 digits>.parquet`` (None for anything else)."""
    m = _PART.fullmatch(name)
    return int(m.group(1)) if m else None


_PART = re.compile(r"part-([0-9]{12})\.parquet")


# ---------------------------------------------------------------- feature tables
def features_dir(sae: str) -> str:
    return f"{FEATURES}/{sae}"


GENERATION_PREFIX = "gen-"


def generation_name(n: int) -> str:
    """The folder name of an encoding's ``n``-th generation: ``gen-<n>``."""
    return f"{GENERATION_PREFIX}{n}"


def parse_generation(name: object) -> int | None:
    """The number of a generation folder name ``gen-<N>`` (None for anything else)."""
    if not isinstance(name, str) or not name.startswith(GENERATION_PREFIX):
        return None
    rest = name[len(GENERATION_PREFIX) :]
    return int(rest) if rest.isascii() and rest.isdigit() else None


def generation_dir(sae: str, gen: str | None) -> str:
    """The folder of an encoding's files: ``features/<sae>/gen-<N>`` (or the SAE's folder, before generations)."""
    return f"{FEATURES}/{sae}/{gen}" if gen else f"{FEATURES}/{sae}"


# ---------------------------------------------------------------- diffs
def diff_dir(name: str) -> str:
    return f"{DIFFS}/{name}"


def diff_file(name: str, file: str) -> str:
    return f"{DIFFS}/{name}/{file}"


# ---------------------------------------------------------------- locks
def lock_key(name: str) -> str:
    """The lock object of ``name`` (an array path such as ``models/m/layer_3``, an SAE's folder, ...)."""
    return f"{LOCKS}/{name.strip('/')}.lock"


# ---------------------------------------------------------------- unit completion (format 3)
_UNIT = re.compile(r"([0-9]{12})\.done")  # ASCII digits only: \d would take any Unicode digit


def units_dir(array: str) -> str:
    """The folder of an array's unit markers: ``units/models/m/layer_3``."""
    return f"{UNITS}/{array.strip('/')}"


def unit_marker(array: str, first_row: int) -> str:
    """The completion marker of the unit of ``array`` that starts at token row ``first_row``."""
    return f"{units_dir(array)}/{first_row:012d}.done"


def parse_unit_marker(name: str) -> int | None:
    """The first row of a marker's unit from its file name (``000000004096.done`` -> 4096), else None."""
    m = _UNIT.fullmatch(name)
    return int(m.group(1)) if m else None


def unit_claim(model: str, first_row: int) -> str:
    """The lock name a worker holds while it computes the unit of ``model`` starting at ``first_row``
    (one forward pass writes that unit of every layer being extracted)."""
    return f"{model_dir(model)}/unit-{first_row:012d}"


def units_of(key: str) -> str | None:
    """The array a unit marker key belongs to (``units/models/m/layer_3/….done`` -> ``models/m/layer_3``), else None."""
    if not key.startswith(f"{UNITS}/"):
        return None
    return key[len(UNITS) + 1 :].rsplit("/", 1)[0]


# ---------------------------------------------------------------- copy selections
def include_prefix(item: str) -> str:
    """An ``actstore copy --include`` item as a key-prefix glob: ``MODEL``, ``MODEL:LAYER``, ``sae:NAME`` or a key glob."""
    if item.startswith("sae:"):
        return sae_dir(item[4:])
    if "/" in item:
        return item.strip("/")
    if ":" in item:
        model, layer = item.split(":", 1)
        return f"{MODELS}/{model}/{_LAYER}{layer}"
    return model_dir(item)


def always_copied(key: str) -> bool:
    """Keys every partial copy needs: the root metadata, the token index, the SAEs group's metadata."""
    return key == ROOT_META or key.startswith(f"{TOKENIZATIONS}/") or key == f"{SAES}/{ROOT_META}"


def selects_content(key: str) -> bool:
    """Whether ``key`` is model or SAE content (not just group metadata): a selection must match one."""
    return key.startswith((f"{MODELS}/", f"{SAES}/")) and not key.endswith(ROOT_META)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def name_ok(name: Any) -> bool:
    """Whether ``name`` can be one folder of a store key (an SAE, model key or diff name)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: Any, what: str) -> str:
    """``name`` if it is a valid name for ``what`` (see :func:`name_ok`), else ConfigError saying what is allowed."""
    if not name_ok(name):
        raise ConfigError(
            f"{what} {name!r} is not a valid name: use letters, digits, '.', '_' and '-' (no '/', no leading '.' or '-', "
            "at most 200 characters), so it stays one folder of the store that every command can find"
        )
    return name
