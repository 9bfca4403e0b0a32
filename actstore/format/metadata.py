"""What a store says about itself, typed: the root group's, a token index's and a layer array's ``actstore``
attribute as dataclasses.

Every reader and writer of these attributes goes through here: ``LayerAttrs.read(array, where)`` checks the values
against each other and the array (a hand-edited or damaged store is refused on open, with one line naming it), and
``attrs.write(array)`` is the one place they are written. A key this version does not know is kept in ``extra`` and
written back unchanged, so a store written by a newer actstore keeps what it said; an old store reads unchanged
(absent keys take their defaults). ``tests/test_architecture.py`` fails on an attribute key spelled outside
``format/``. The keys are described for users in docs/FORMAT.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from actstore.errors import IntegrityError
from actstore.format.layout import ATTR, GENERATION_PREFIX, PROGRESS_UNITS, parse_generation

T = TypeVar("T", bound="Attrs")


REFETCH = "re-copy it from its source or re-extract that layer"
"""The fix for damaged store metadata."""


def damaged(where: str, what: str, fix: str = REFETCH) -> IntegrityError:
    """The error for metadata that does not hold together: names where, says what and the fix."""
    return IntegrityError(f"{where}: {what}; the store is damaged or was edited by hand: {fix}")


def check_int(value: Any, name: str, where: str, lo: int = 0, hi: int | None = None) -> int:
    """``value`` as an int in ``lo..hi`` (IntegrityError naming attribute ``name`` otherwise; bools are not ints)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        and not (hasattr(value, "__index__") and not isinstance(value, str))
    ):
        raise damaged(where, f"attribute {name} is {value!r}, not an integer")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        raise damaged(
            where, f"attribute {name} is {v}, outside {lo}..{hi if hi is not None else 'inf'}"
        )
    return v


def raw_attrs(node: Any) -> dict[str, Any]:
    """The ``actstore`` attribute of a Zarr group or array, as a plain dict (empty when absent)."""
    a = node.attrs.get(ATTR, {})
    return dict(a) if isinstance(a, dict) else {}


def in_metadata(meta: Any) -> dict[str, Any] | None:
    """The ``actstore`` attribute object inside a parsed ``zarr.json`` document (None when it has none)."""
    a = (meta.get("attributes") or {}).get(ATTR) if isinstance(meta, dict) else None
    return a if isinstance(a, dict) else None


def has_attrs(node: Any) -> bool:
    """Whether a Zarr group or array carries an ``actstore`` attribute object."""
    return isinstance(node.attrs.get(ATTR), dict)


@dataclass
class Attrs:
    """Shared by the attribute classes: ``from_dict``/``to_dict``, with unknown keys kept in ``extra``."""

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)
    """Keys this version does not know (from a newer actstore), written back unchanged."""
    FIX: ClassVar[str] = REFETCH
    """What to do about damaged metadata of this kind (ends the error's message)."""

    @classmethod
    def known(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any], where: str = "store") -> T:
        """The attributes in ``d`` (absent keys take their defaults), checked by :meth:`check`."""
        if not isinstance(d, dict):
            raise damaged(where, "it is not a JSON object", cls.FIX)
        known = cls.known()
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name in known
            and f.name not in d
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise damaged(where, f"attribute {missing[0]} is missing", cls.FIX)
        obj = cls(
            **{k: v for k, v in d.items() if k in known},
            extra={k: v for k, v in d.items() if k not in known},
        )
        obj.check(where)
        return obj

    def check(self, where: str) -> None:
        """Raise IntegrityError (naming ``where``) when the values do not hold together."""

    def to_dict(self) -> dict[str, Any]:
        """The attribute object as stored: known keys whose value is not None, then ``extra``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    @classmethod
    def read(cls: type[T], node: Any, where: str) -> T:
        """The attributes of a Zarr group or array (see :meth:`from_dict`)."""
        return cls.from_dict(raw_attrs(node), where)

    def as_zarr(self) -> dict[str, Any]:
        """The ``attributes`` argument of a Zarr group or array created with these."""
        return {ATTR: self.to_dict()}

    def write(self, node: Any) -> None:
        """Store these attributes on a Zarr group or array (its whole ``actstore`` attribute, in one write)."""
        node.attrs[ATTR] = self.to_dict()


@dataclass
class StoreAttrs(Attrs):
    """The root group's: which format the store is, and which token index is its default."""

    format: int = 1
    """Store format (layout.FORMAT_VERSION for new stores; format 1 stores predate the key)."""
    created: str | None = None
    """When the store was created (ISO 8601, UTC)."""
    actstore_version: str | None = None
    """actstore version that created it."""
    default_tokenization: str | None = None
    """Key of the token index used when none is named (the first made)."""

    def check(self, where: str) -> None:
        if isinstance(self.format, bool) or not isinstance(self.format, int):
            raise damaged(where, f"attribute format is {self.format!r}, not an integer")


@dataclass
class TokenizationAttrs(Attrs):
    """A token index's: the tokenizer and data it was made from, and how far it got."""

    chunk_rows: int
    """Rows per chunk of the store's arrays (a shard of a layer array)."""
    n_tokens: int = 0
    """Token rows."""
    n_samples: int = 0
    """Samples (corpus rows) tokenized."""
    n_truncated: int = 0
    """Samples cut at max_length."""
    complete: bool = False
    """Whether every row of the corpus is tokenized."""
    max_length: int | None = None
    """Token cap per sample (None: whole samples, in context windows)."""
    window: int | None = None
    """Tokens per context window (decoders over long documents), or None."""
    stride: int | None = None
    """Tokens between window starts."""
    tokenizer_sha256: str | None = None
    """Hash of the tokenizer's full definition."""
    tokenizer_ids_sha256: str | None = None
    """Hash of what decides its token ids (models whose tokenizers give the same ids share the index)."""
    tokenizer_source: str | None = None
    """Where the tokenizer came from."""
    tokenizer_class: str | None = None
    """Its class name."""
    data: dict[str, Any] = field(default_factory=dict)
    """Fingerprint of the corpus (source, fields, size, hash)."""
    parts: list[dict[str, Any]] = field(default_factory=list)
    """Parquet parts of the tokens and samples tables: {file, first_row, n_rows, first_sample, n_samples}."""
    data_report: dict[str, Any] = field(default_factory=dict)
    """What loading the corpus skipped or repaired."""
    created: str | None = None
    """When tokenizing started."""
    completed: str | None = None
    """When it finished."""
    actstore_version: str | None = None
    """actstore version that made it."""

    def check(self, where: str) -> None:
        self.n_tokens = check_int(self.n_tokens, "n_tokens", where)
        self.n_samples = check_int(self.n_samples, "n_samples", where)
        self.chunk_rows = check_int(self.chunk_rows, "chunk_rows", where, lo=1)
        parts = self.parts
        if not isinstance(parts, list) or not all(
            isinstance(p, dict) and isinstance(p.get("file"), str) for p in parts
        ):
            raise damaged(where, "attribute parts is not a list of {file: ...} entries")
        for p in self.parts:
            if "/" in p["file"]:
                raise damaged(where, f"part file {p['file']!r} is not a plain file name")

    def same_index(self, max_length: int | None, window: int | None, stride: int | None) -> bool:
        """Whether this index cuts samples as ``max_length``/``window``/``stride`` would."""
        return self.max_length == max_length and self.window == window and self.stride == stride

    def same_tokenizer(self, ids_sha256: str, sha256: str) -> bool:
        """Whether it was made by a tokenizer giving the same token ids: ``tokenizer_ids_sha256`` where recorded, else
        (older indexes) the full-definition hash, so those accept exactly the models they accepted before."""
        if self.tokenizer_ids_sha256:
            return self.tokenizer_ids_sha256 == ids_sha256
        return self.tokenizer_sha256 == sha256


@dataclass
class LayerAttrs(Attrs):
    """A layer array's: what it holds (model, layer, width, codec) and how many of its rows are written."""

    layer: int
    """hidden_states index (0 = the embeddings)."""
    d_model: int
    """Width of a row."""
    codec: str
    """How rows are stored (format/codecs.CODECS)."""
    n_rows: int = -1
    """Rows the array will hold (the token index's n_tokens; -1 when absent: the array's length)."""
    committed_rows: int = 0
    """Rows 0..committed_rows are written and readable (formats 1-2: the prefix; format 3: may lag the markers)."""
    complete: bool = False
    """Whether every row is written."""
    unit_rows: int | None = None
    """Rows per unit of work (a multiple of chunk_rows; the last unit may be shorter)."""
    progress: str | None = None
    """'units' when units complete by marker objects (format 3); None: by the committed_rows prefix."""
    inner_rows: int | None = None
    """Rows per inner chunk of a sharded array (format 2 and later)."""
    channel_scale: list[float] | None = None
    """int8 with a per-channel scale: the d_model scales rows were divided by before quantising."""
    stored_dtype: str | None = None
    """The dtype of the stored values."""
    model_key: str | None = None
    """Key of the model under models/."""
    tokenization: str | None = None
    """Key of the token index the rows follow."""
    created: str | None = None
    """When the array was created."""
    updated: str | None = None
    """When committed_rows last changed."""
    actstore_version: str | None = None
    """actstore version that created it."""
    config: dict[str, Any] | None = None
    """The extract config it was created with."""

    SUMMARY: ClassVar[tuple[str, ...]] = (
        "d_model",
        "codec",
        "committed_rows",
        "n_rows",
        "complete",
        "created",
        "updated",
    )
    """What ``actstore info`` shows of a layer."""
    PROVENANCE: ClassVar[tuple[str, ...]] = (
        "codec",
        "created",
        "updated",
        "actstore_version",
        "complete",
        "config",
    )
    """What a store's provenance records of a layer."""

    @property
    def marks_units(self) -> bool:
        """Whether units complete by markers (format 3) rather than by the ``committed_rows`` prefix."""
        return self.progress == PROGRESS_UNITS

    def check(self, where: str) -> None:
        from actstore.format.codecs import CODECS

        self.layer = check_int(self.layer, "layer", where)
        self.d_model = check_int(self.d_model, "d_model", where, lo=1)
        if self.n_rows != -1:
            self.n_rows = check_int(self.n_rows, "n_rows", where)
        self.committed_rows = check_int(
            self.committed_rows,
            "committed_rows",
            where,
            0,
            None if self.n_rows < 0 else self.n_rows,
        )
        if self.codec not in CODECS:
            raise damaged(
                where, f"attribute codec is {self.codec!r}, not one of {', '.join(CODECS)}"
            )
        if self.marks_units or self.unit_rows is not None:
            self.unit_rows = check_int(self.unit_rows, "unit_rows", where, lo=1)
        chan = self.channel_scale
        if chan is not None and (not isinstance(chan, list) or len(chan) != self.d_model):
            raise damaged(
                where, f"attribute channel_scale must be a list of {self.d_model} numbers"
            )
        if self.complete and self.n_rows >= 0 and self.committed_rows != self.n_rows:
            raise damaged(
                where, f"it says complete but commits {self.committed_rows} of {self.n_rows} rows"
            )

    def check_arrays(self, shape: tuple[int, ...], scale_rows: int | None, where: str) -> None:
        """Check against the values array's ``shape`` (``(n_tokens, d_model)``) and the int8 scale array's length;
        an absent ``n_rows`` becomes the array's length."""
        if len(shape) != 2:
            raise damaged(where, f"shape {shape} is not (n_tokens, d_model)")
        n_alloc, width = int(shape[0]), int(shape[1])
        if self.n_rows < 0:
            self.n_rows = n_alloc
            self.check(where)
        if self.n_rows > n_alloc:
            raise damaged(where, f"attribute n_rows is {self.n_rows}, outside 0..{n_alloc}")
        if self.d_model != width:
            raise damaged(
                where, f"attribute d_model is {self.d_model} but the array is {width} wide"
            )
        if self.codec == "int8" and scale_rows != n_alloc:
            raise damaged(where, "an int8 layer needs a per-token _scale array of the same length")

    def state(self) -> str:
        """``complete``, or how many rows are committed (``96/128 rows committed``)."""
        return (
            "complete" if self.complete else f"{self.committed_rows}/{self.n_rows} rows committed"
        )

    @staticmethod
    def rows_in(raw: dict[str, Any]) -> int | None:
        """The committed rows an array's raw ``actstore`` attribute object declares (None: not a layer array's)."""
        v = raw.get("committed_rows")
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else None

    def committed(self, rows: int, when: str) -> LayerAttrs:
        """These attributes with ``committed_rows`` set to ``rows`` (``complete`` when all, ``updated`` = ``when``)."""
        return dataclasses.replace(
            self, committed_rows=rows, complete=rows >= self.n_rows, updated=when
        )


@dataclass
class ModelAttrs(Attrs):
    """A model group's: which model its layers come from (what ``LoadedModel.info`` records) and their token index."""

    key: str | None = None
    """Its key under models/."""
    tokenization: str | None = None
    """Key of the token index its rows follow."""
    weights_sha256: str | None = None
    """Hash of the weights (another model under the same key is refused)."""
    source: str | None = None
    """Where the model came from (a path, a bundled name or a hub id)."""
    path: str | None = None
    """Local folder it was loaded from."""
    architecture: str | None = None
    """Its class (BertModel, GPT2LMHeadModel, ...)."""
    model_type: str | None = None
    """transformers' model_type."""
    revision: str | None = None
    """Hub revision, when from the hub."""
    n_layers: int | None = None
    """Transformer blocks."""
    site: str | None = None
    """Where in each block its rows were read (``extract --site``: mlp_in, mlp_out, attn_out); absent: resid, the
    residual stream (``hidden_states``)."""
    d_model: int | None = None
    """Hidden width."""
    dtype: str | None = None
    """Dtype of the forward pass (fp32, bf16, fp16; absent in stores made before --dtype: fp32)."""
    position_limit: int | None = None
    """Longest input it accepts."""
    tokenizer_sha256: str | None = None
    """Hash of its tokenizer's full definition."""
    tokenizer_ids_sha256: str | None = None
    """Hash of what decides its tokenizer's ids."""
    created: str | None = None
    """When the group was created."""


@dataclass
class EncodingManifest(Attrs):
    """An SAE's feature table: ``features/<sae>/encoding.json`` when published, ``pending.json`` while it is made.
    A JSON file rather than a Zarr attribute (the table is Parquet), read and written through these fields."""

    FIX: ClassVar[str] = "re-encode with --overwrite"

    n_rows: int = 0
    """Token rows encoded (the layer's rows)."""
    d_sae: int = 0
    """Features of the SAE."""
    layer: int = 0
    """Layer of the SAE's (first) source."""
    model: str | None = None
    """Model key of the SAE's (first) source."""
    sae: str | None = None
    """The SAE's name."""
    tokenization: str | None = None
    """Key of the token index the rows follow."""
    format: int | None = None
    """Version of the feature table's layout (encoding.ENCODING_FORMAT)."""
    n_buckets: int | None = None
    """Feature-range files."""
    bucket_features: int | None = None
    """Features per bucket (the last may hold fewer)."""
    sae_sha256: str | None = None
    """Hash of the SAE's weights file: an encoding is valid only for these weights."""
    row_group_rows: int | None = None
    """Rows per Parquet row group."""
    phase: str | None = None
    """spill (being made) or done."""
    spilled_rows: int = 0
    """Rows committed to spill files (a killed encode resumes here)."""
    segment_rows: int | None = None
    """Rows per segment of an encoding made in segments (``--ray``), else None."""
    dir: str | None = None
    """Its generation folder (gen-N); None for encodings from before generations."""
    files: list[dict[str, Any]] = field(default_factory=list)
    """One entry per bucket file: {file, feature_start, feature_stop, n_rows, n_bytes}."""
    complete: bool = False
    """Whether it is published whole."""
    n_feature_rows: int = 0
    """Non-zero activations stored."""
    n_bytes: int = 0
    """Bytes of the bucket files."""
    never_fired: int = 0
    """Features that fire on no token of the store."""
    never_fired_fraction: float | None = None
    """never_fired / d_sae (None in encodings from before the count)."""
    config: dict[str, Any] | None = None
    """The encode config it was made with."""
    sae_config: dict[str, Any] | None = None
    """The SAE's cfg.json as encoded."""
    actstore_version: str | None = None
    """actstore version that made it."""
    created: str | None = None
    """When it was started."""
    finished: str | None = None
    """When it was published."""
    updated: str | None = None
    """When the file was last written."""

    def check(self, where: str) -> None:
        for name in (
            "n_rows",
            "d_sae",
            "layer",
            "spilled_rows",
            "n_feature_rows",
            "n_bytes",
            "never_fired",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise damaged(where, f"{name} is {v!r}, not a non-negative integer", self.FIX)
        if not isinstance(self.files, list):
            raise damaged(where, "files is not a list", self.FIX)
        for f in self.files:
            try:
                name = str(f["file"])
                if "/" in name or "\\" in name or name in ("", ".", "..") or not name.isprintable():
                    raise ValueError
                lo, hi = int(f["feature_start"]), int(f["feature_stop"])
                if not 0 <= lo <= hi <= self.d_sae:
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise damaged(
                    where, f"file entry {f!r} is not a bucket of features in 0..d_sae", self.FIX
                ) from None
        if self.dir is not None and parse_generation(self.dir) is None:
            raise damaged(
                where, f"dir {self.dir!r} is not a generation folder {GENERATION_PREFIX}N", self.FIX
            )

    def matches(self, want: dict[str, Any]) -> bool:
        """Whether it was made with these settings (weights, rows, buckets: ``want``, field -> value)."""
        return all(getattr(self, k, self.extra.get(k)) == v for k, v in want.items())
