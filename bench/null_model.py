"""The extractor's ceiling without a model (issue 29), for ``bench_extract.py --null-model``.

``extract`` runs with every forward pass replaced by a *null model*: ``LayerTap.__call__`` hands back contiguous views
of one preallocated ``(batch, width, d_model)`` buffer per layer, so what is timed is the rest of the pipeline:
building the batches, gathering the owned rows, the codec, the copies, the chunk writes and the unit markers. The
token index is built first and not timed; the unit phase (``run_here``) is.

Beside it, the *physical floor* of this machine: the same stored bytes (the null rows encoded by the same codec)
written as the store writes them — one object per shard, each inner chunk checksummed (crc32c), zstd'd when the
arrays are — by the same number of threads, with no Zarr, no codec and no model.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

SHAPES = {  # name -> (d_model, layers, max_length, samples)
    "bert-base": (768, [3, 6, 12], 256, 2000),
    "decoder-4096": (4096, [1, 2, 3], 256, 300),
}


@contextlib.contextmanager
def timing_units() -> Iterator[list[float]]:
    """While active, the seconds of each extraction's unit phase (``run_here``: the token index already built, the
    model loaded) are appended to the list it yields."""
    from actstore.store import extract as extract_mod

    real, timed = extract_mod.run_here, []

    def run_here(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            timed.append(time.perf_counter() - t0)

    extract_mod.run_here = run_here  # type: ignore[assignment]
    try:
        yield timed
    finally:
        extract_mod.run_here = real  # type: ignore[assignment]


def null_model(path: Path, d_model: int, n_layers: int) -> str:
    """A random BERT of width ``d_model`` (blocks that never run: narrow MLPs) with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from actstore.models.names import resolve_model

    cfg = BertConfig(
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=max(1, d_model // 64),
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model("bundled:minilm")).save_pretrained(path)
    return str(path)


def null_tap(d_model: int, max_batch: int, max_len: int):
    """A ``LayerTap.__call__`` that runs no model: per layer, a contiguous ``(batch, width, d_model)`` view of one
    preallocated buffer (a model's output is contiguous)."""
    cache: dict[int, torch.Tensor] = {}

    def call(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        b, w = input_ids.shape
        out = {}
        for layer in self.layers:
            if layer not in cache:
                g = torch.Generator().manual_seed(layer)
                cache[layer] = torch.randn(max_batch * max_len * d_model, generator=g) * (
                    1 + torch.rand(1, generator=g)
                )
            out[layer] = cache[layer][: b * w * d_model].view(b, w, d_model)
        return out

    return call


def floor_seconds(
    sample: np.ndarray,
    n_rows: int,
    n_layers: int,
    shard_rows: int,
    inner_rows: int,
    compression: str,
    threads: int,
) -> float:
    """Seconds to write ``n_rows`` rows of ``n_layers`` layers of stored rows like ``sample`` (one shard's worth) as
    shard objects of checksummed inner chunks, by ``threads`` threads."""
    import google_crc32c
    from numcodecs import Zstd

    zstd = Zstd(level=1)
    chunks = [
        np.ascontiguousarray(sample[i : i + inner_rows]).tobytes()
        for i in range(0, len(sample), inner_rows)
    ]
    n_shards = -(-n_rows // shard_rows) * n_layers
    out = Path(tempfile.mkdtemp(prefix="actstore-floor-", dir=os.environ.get("ACTSTORE_BENCH_DIR")))

    def shard(i: int) -> None:
        parts = []
        for c in chunks:
            body = zstd.encode(c) if compression == "zstd" else c
            parts.append(body + google_crc32c.value(body).to_bytes(4, "little"))
        index = np.zeros(2 * len(parts), np.uint64).tobytes()
        (out / str(i)).write_bytes(
            b"".join(parts) + index + google_crc32c.value(index).to_bytes(4, "little")
        )

    try:
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(shard, range(n_shards)))
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)


def ceiling(
    shape: str,
    codecs_: list[str],
    writer_threads: list[int],
    compression: str,
    samples: int | None,
    imdb: Path,
) -> list[dict]:
    """One row per (codec, writer threads): the unit phase's tok/s and values/s, and the floor's tok/s."""
    from actstore.data.corpora import DataConfig
    from actstore.format import codecs
    from actstore.models.taps import LayerTap
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    d_model, layers, max_length, n_samples = SHAPES[shape]
    n_samples = samples or n_samples
    tmp = Path(tempfile.mkdtemp(prefix="actstore-null-", dir=os.environ.get("ACTSTORE_BENCH_DIR")))
    real_call = LayerTap.__call__
    rows = []
    with timing_units() as timed:
        try:
            model = null_model(tmp / "model", d_model, max(layers))
            LayerTap.__call__ = null_tap(d_model, 32, max_length)  # type: ignore[method-assign]
            store, data = str(tmp / "s.zarr"), DataConfig(str(imdb), limit=n_samples)
            base = dict(
                model=model,
                data=data,
                max_length=max_length,
                batch_size=32,
                device="cpu",
                compression=compression,
            )
            res = extract(
                store,
                ExtractConfig(layers=[0], codec="fp16", name="tokenize", **base),
                progress=False,
            )  # type: ignore[arg-type]
            n = res.n_tokens
            for codec in codecs_:
                sample = null_rows_encoded(codec, d_model)
                for threads in writer_threads:
                    timed.clear()
                    key = f"{codec}-w{threads}"
                    cfg = ExtractConfig(
                        layers=layers, codec=codec, name=key, writer_threads=threads, **base
                    )  # type: ignore[arg-type]
                    extract(store, cfg, progress=False)
                    secs = timed[0]
                    shutil.rmtree(Path(store) / "models" / key, ignore_errors=True)
                    shutil.rmtree(Path(store) / "units" / "models" / key, ignore_errors=True)
                    floor = floor_seconds(
                        sample,
                        n,
                        len(layers),
                        4096,
                        1024,
                        "zstd" if cfg.zstd() else "none",
                        threads,
                    )
                    stored = (
                        n * len(layers) * d_model * np.dtype(codecs.STORED_DTYPE[codec]).itemsize
                    )
                    rows.append(
                        dict(
                            shape=shape,
                            codec=codec,
                            zstd=cfg.zstd(),
                            threads=threads,
                            tokens=n,
                            seconds=secs,
                            tok_s=n / secs,
                            values_s=n * len(layers) * d_model / secs,
                            mb_s=stored / secs / 1e6,
                            floor_tok_s=n / floor,
                            vs_floor=floor / secs,
                        )
                    )
        finally:
            LayerTap.__call__ = real_call  # type: ignore[method-assign]
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def null_rows_encoded(codec: str, d_model: int) -> np.ndarray:
    """One shard (4096 rows) of null-model rows in ``codec``'s stored form (what the floor writes)."""
    from actstore.format import codecs

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4096, d_model, generator=g) * (1 + torch.rand(1, generator=g))).numpy()
    chan = codecs.channel_scale(x) if codec == "int8" else None
    return codecs.encode(x, codec, chan).values
