"""Tokenize stage: the token index of a store, shared by every model with the same tokenizer.

The corpus is tokenized once per (tokenizer, max length) into ``tokenizations/<tk>``:
Zarr int32 arrays (sample, position, token_id per row; first_row, n_tokens per
sample) and Parquet tables (``tokens``, ``samples``) written in parts while the
corpus streams past, so memory stays bounded. Row ``r`` of every layer array of
every model over this tokenization is the token at row ``r`` of this index.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
import zarr.codecs as zc

from actstore.clock import now
from actstore.data.corpora import Corpus
from actstore.errors import ConfigError, StoreError, TokenizerMismatchError
from actstore.format import layout
from actstore.format.metadata import StoreAttrs, TokenizationAttrs
from actstore.models.loading import LoadedModel
from actstore.storage.location import Location
from actstore.version import __version__

PART_ROWS = 1 << 20  # token rows per Parquet part


def _data_fingerprint(corpus: Corpus) -> dict[str, Any]:
    c = corpus.cfg
    return {
        "source": c.source,
        "sha256": corpus.fingerprint(),
        "text_field": c.text_field,
        "label_field": c.label_field,
        "id_field": c.id_field,
        "limit": c.limit,
    }


def _same_data(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("text_field", "label_field", "id_field", "limit")
    if any(a.get(k) != b.get(k) for k in keys):
        return False
    if a.get("sha256") or b.get("sha256"):
        return a.get("sha256") == b.get("sha256")
    return a.get("source") == b.get("source")


def _tokenization_key(
    tok_hash: str, max_length: int | None, window: int | None = None, stride: int | None = None
) -> str:
    if window is None:  # the key of every store before context windows
        return "t-" + hashlib.sha256(f"{tok_hash}:{max_length}".encode()).hexdigest()[:10]
    return (
        "t-"
        + hashlib.sha256(f"{tok_hash}:{max_length}:w{window}:s{stride}".encode()).hexdigest()[:10]
    )


def window_of(position: np.ndarray, window: int | None, stride: int | None) -> np.ndarray:
    """The context window each token's row comes from: its first window (the one giving it the most left context).

    Window ``k`` covers positions ``[k * stride, k * stride + window)``; window 0 gives its ``window`` tokens, each
    later one its last ``stride``.
    """
    position = np.asarray(position, dtype=np.int64)
    if window is None:
        return np.zeros(position.shape, dtype=np.int32)
    stride = stride or window
    return np.maximum(0, -(-(position - window + 1) // stride)).astype(np.int32)


class _TokenIndexWriter:
    """Accumulates tokenized samples and writes the token index in parts."""

    def __init__(
        self,
        loc: Location,
        grp: zarr.Group,
        key: str,
        tokenizer: Any,
        chunk_rows: int,
        window: int | None = None,
        stride: int | None = None,
    ) -> None:
        self.loc, self.grp, self.key, self.tok = loc, grp, key, tokenizer
        self.window, self.stride = window, stride
        idx_chunk = chunk_rows * 16
        mk = lambda name, dtype, chunk, dim: grp.create_array(  # noqa: E731
            name,
            shape=(0,),
            chunks=(chunk,),
            dtype=dtype,
            fill_value=0,
            dimension_names=(dim,),
            compressors=[zc.ZstdCodec(level=3), zc.Crc32cCodec()],
        )
        self.arrays = {
            "sample": mk("sample", "int32", idx_chunk, "token"),
            "position": mk("position", "int32", idx_chunk, "token"),
            "token_id": mk("token_id", "int32", idx_chunk, "token"),
            "sample_first_row": mk("sample_first_row", "int64", 65536, "sample"),
            "sample_n_tokens": mk("sample_n_tokens", "int32", 65536, "sample"),
        }
        self.parts: list[dict[str, Any]] = []
        self.n_tokens = self.n_samples = self.n_truncated = 0
        self._reset()

    def _reset(self) -> None:
        self.ids: list[list[int]] = []
        self.meta: list[tuple[str, str | None, str, bool]] = []
        self.buf_rows = 0

    def add(self, rid: str, label: str | None, text: str, ids: list[int], truncated: bool) -> None:
        self.ids.append(ids)
        self.meta.append((rid, label, text, truncated))
        self.buf_rows += len(ids)
        if self.buf_rows >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        lens = np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))
        n = int(lens.sum())
        first_row = self.n_tokens + np.concatenate([[0], np.cumsum(lens)[:-1]])
        sample = np.repeat(
            np.arange(self.n_samples, self.n_samples + len(lens), dtype=np.int64), lens
        )
        position = np.arange(n, dtype=np.int64) - np.repeat(first_row - self.n_tokens, lens)
        token_id = np.fromiter((t for x in self.ids for t in x), dtype=np.int64, count=n)
        a = self.arrays
        a["sample"].append(sample.astype(np.int32))
        a["position"].append(position.astype(np.int32))
        a["token_id"].append(token_id.astype(np.int32))
        a["sample_first_row"].append(first_row)
        a["sample_n_tokens"].append(lens.astype(np.int32))
        fname = f"part-{len(self.parts):05d}.parquet"
        tokens = pa.table(
            {
                "row": pa.array(np.arange(self.n_tokens, self.n_tokens + n)),
                "sample": pa.array(sample),
                "position": pa.array(position.astype(np.int32)),
                "token_id": pa.array(token_id.astype(np.int32)),
                "token": pa.array(self.tok.convert_ids_to_tokens(token_id.tolist()), pa.string()),
                **(
                    {"window": pa.array(window_of(position, self.window, self.stride))}
                    if self.window
                    else {}
                ),
            }
        )
        samples = pa.table(
            {
                "sample": pa.array(np.arange(self.n_samples, self.n_samples + len(lens))),
                "id": pa.array([m[0] for m in self.meta], pa.string()),
                "label": pa.array([m[1] for m in self.meta], pa.string()),
                "text": pa.array([m[2] for m in self.meta], pa.string()),
                "n_tokens": pa.array(lens.astype(np.int32)),
                "first_row": pa.array(first_row),
                "truncated": pa.array([m[3] for m in self.meta], pa.bool_()),
            }
        )
        for table_name, table in (("tokens", tokens), ("samples", samples)):
            with self.loc.open_output(layout.token_table_part(self.key, table_name, fname)) as f:
                pq.write_table(table, f, row_group_size=65536, compression="zstd")
        self.parts.append(
            {
                "file": fname,
                "first_row": self.n_tokens,
                "n_rows": n,
                "first_sample": self.n_samples,
                "n_samples": len(lens),
            }
        )
        self.n_tokens += n
        self.n_samples += len(lens)
        self.n_truncated += sum(m[3] for m in self.meta)
        self._reset()


def _tokenize_corpus(
    loc: Location,
    root: zarr.Group,
    key: str,
    corpus: Corpus,
    loaded: LoadedModel,
    max_length: int | None,
    chunk_rows: int,
    progress: bool,
    window: int | None = None,
    stride: int | None = None,
) -> None:
    from tqdm.auto import tqdm

    tok = loaded.tokenizer
    base = TokenizationAttrs(
        tokenizer_sha256=loaded.tokenizer_sha256,
        tokenizer_ids_sha256=loaded.tokenizer_ids_sha256,
        tokenizer_source=loaded.source,
        tokenizer_class=type(tok).__name__,
        max_length=max_length,
        window=window or None,
        stride=stride if window else None,
        chunk_rows=chunk_rows,
        data=_data_fingerprint(corpus),
        created=now(),
        complete=False,
        actstore_version=__version__,
    )
    grp = root.create_group(layout.tokenization_dir(key), overwrite=True, attributes=base.as_zarr())
    for table in layout.TOKEN_TABLES:
        loc.rmtree(layout.token_table_dir(key, table))
    w = _TokenIndexWriter(loc, grp, key, tok, chunk_rows, window, stride)
    batch: list = []
    bar = tqdm(desc="tokenize", unit=" samples", disable=not progress)

    def run(batch: list) -> None:
        texts = [r.text for r in batch]
        if max_length is None:  # context windows and no cap: whole samples
            for r, x in zip(
                batch,
                tok(texts, truncation=False, add_special_tokens=True)["input_ids"],
                strict=True,
            ):
                w.add(r.id, r.label, r.text, list(x), False)
            bar.update(len(batch))
            return
        ids = tok(texts, truncation=True, max_length=max_length + 1, add_special_tokens=True)[
            "input_ids"
        ]
        long = [i for i, x in enumerate(ids) if len(x) > max_length]
        if long:
            fixed = tok(
                [texts[i] for i in long],
                truncation=True,
                max_length=max_length,
                add_special_tokens=True,
            )["input_ids"]
            for i, x in zip(long, fixed, strict=True):
                ids[i] = x
        long_set = set(long)
        for i, (r, x) in enumerate(zip(batch, ids, strict=True)):
            w.add(r.id, r.label, r.text, list(x), i in long_set)
        bar.update(len(batch))

    for rec in corpus:
        batch.append(rec)
        if len(batch) >= 1024:
            run(batch)
            batch = []
    if batch:
        run(batch)
    w.flush()
    bar.close()
    if w.n_samples == 0:
        raise ConfigError(
            f"no usable rows in {corpus.cfg.source}: every row was empty or not text (field {corpus.cfg.text_field!r})"
        )
    vocab_ids = list(range(len(tok)))  # every id the tokenizer can emit, added tokens included
    with loc.open_output(layout.vocab_file(key)) as f:
        vocab = pa.table(
            {
                "token_id": pa.array(vocab_ids, pa.int32()),
                "token": pa.array(tok.convert_ids_to_tokens(vocab_ids)),
            }
        )
        pq.write_table(vocab, f, compression="zstd")
    dataclasses.replace(
        base,
        n_tokens=w.n_tokens,
        n_samples=w.n_samples,
        n_truncated=w.n_truncated,
        parts=w.parts,
        data_report=corpus.report.to_dict(),
        complete=True,
        completed=now(),
    ).write(grp)


def _windowed(
    loc: Location,
    root: zarr.Group,
    corpus: Corpus,
    loaded: LoadedModel,
    max_length: int | None,
    chunk_rows: int,
    new_tokenization: bool,
    progress: bool,
    window: int,
    stride: int | None,
    done: dict[str, TokenizationAttrs],
) -> tuple[str, TokenizationAttrs]:
    """:func:`choose_tokenization` for context windows: an index of the same tokenizer, cap, window and stride."""
    stride = stride or window
    key = _tokenization_key(loaded.tokenizer_ids_sha256, max_length, window, stride)
    match = [
        k
        for k, a in done.items()
        if same_tokenizer(a, loaded) and a.same_index(max_length, window, stride)
    ]
    if match:
        key = match[0]
    else:
        if done and not new_tokenization:
            other = next(iter(done.values()))
            raise TokenizerMismatchError(
                f"store {loc.url} has a token index of window {other.window} / stride {other.stride}, max "
                f"length {other.max_length}, not window {window} / stride {stride}: its rows would not align; "
                "pass --new-tokenization to add a separate token index, or use another store"
            )
        _tokenize_corpus(
            loc, root, key, corpus, loaded, max_length, chunk_rows, progress, window, stride
        )
        set_default_tokenization(loc, root, key)
    return key, read_tokenization(loc, key)


def same_tokenizer(attrs: TokenizationAttrs, loaded: LoadedModel) -> bool:
    """Whether a tokenization (its attributes) was made by a tokenizer giving ``loaded``'s token ids (both hashes are
    computed once per model; see :meth:`TokenizationAttrs.same_tokenizer`)."""
    return attrs.same_tokenizer(loaded.tokenizer_ids_sha256, loaded.tokenizer_sha256)


def read_tokenization(loc: Location, key: str) -> TokenizationAttrs:
    """The attributes of token index ``key`` (checked)."""
    group = zarr.open_group(loc.zarr_store, path=layout.tokenization_dir(key), mode="r")
    return TokenizationAttrs.read(group, f"tokenization {key} of store {loc.url}")


def set_default_tokenization(loc: Location, root: zarr.Group, key: str) -> None:
    """Make ``key`` the store's default token index unless it has one."""
    a = StoreAttrs.read(root, f"store {loc.url}")
    if a.default_tokenization is None:
        dataclasses.replace(a, default_tokenization=key).write(root)


def choose_tokenization(
    loc: Location,
    root: zarr.Group,
    corpus: Corpus,
    loaded: LoadedModel,
    max_length: int | None,
    chunk_rows: int,
    new_tokenization: bool,
    progress: bool,
    window: int | None = None,
    stride: int | None = None,
) -> tuple[str, TokenizationAttrs]:
    """The token index ``loaded`` reads in this store (made here if needed) and its attributes.

    Without ``max_length`` the length of an index made by the same tokenizer is taken, when the model accepts it,
    so a second model's rows align with the first's; else the model's default. With ``window`` the samples are cut
    into context windows of that many tokens instead (``max_length``, if given, caps a sample's tokens).
    """
    existing = {k: read_tokenization(loc, k) for k in loc.list_dirs(layout.TOKENIZATIONS)}
    fp = _data_fingerprint(corpus)
    for a in existing.values():
        if a.complete and not _same_data(a.data, fp):
            diff = ", ".join(
                f"{k} {a.data.get(k)!r} vs {fp.get(k)!r}"
                for k in ("source", "sha256", "text_field", "label_field", "id_field", "limit")
                if a.data.get(k) != fp.get(k) and not (k == "source" and fp.get("sha256"))
            )
            raise StoreError(
                f"store {loc.url} holds another corpus ({diff}): a store holds one corpus, so use a new store path"
            )
    done = {k: a for k, a in existing.items() if a.complete}
    if window is not None:
        if window > loaded.position_limit:
            raise ConfigError(
                f"--window {window} exceeds what {loaded.source} accepts ({loaded.position_limit} tokens)"
            )
        return _windowed(
            loc,
            root,
            corpus,
            loaded,
            max_length,
            chunk_rows,
            new_tokenization,
            progress,
            window,
            stride,
            done,
        )
    if max_length is None:
        shared = [a.max_length for a in done.values() if same_tokenizer(a, loaded) and not a.window]
        ok = [n for n in shared if isinstance(n, int) and 2 <= n <= loaded.position_limit]
        max_length = ok[0] if ok else loaded.max_length
    # a new token index is named by the tokenizer's identity (token ids), not its saved runtime state
    key = _tokenization_key(loaded.tokenizer_ids_sha256, max_length)
    match = [
        k
        for k, a in done.items()
        if same_tokenizer(a, loaded) and a.same_index(max_length, None, None)
    ]
    # an existing token index gives the same ids (possibly named by an older hash): share it
    if match:
        key = match[0]
    if key not in done:
        if done and not new_tokenization:
            other = next(iter(done.values()))
            why = (
                "tokenizer"
                if not same_tokenizer(other, loaded)
                else f"max length ({other.max_length})"
            )
            raise TokenizerMismatchError(
                f"{loaded.source} at max length {max_length} differs in {why} from the tokenization of store {loc.url} "
                f"(made with {other.tokenizer_source}, max length {other.max_length}): its rows would not align; "
                "pass --new-tokenization to add a separate token index, or use another store"
            )
        _tokenize_corpus(loc, root, key, corpus, loaded, max_length, chunk_rows, progress)
        set_default_tokenization(loc, root, key)
    return key, read_tokenization(loc, key)
