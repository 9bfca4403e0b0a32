"""Benchmark: streaming layer comparison (actstore compare) vs just reading the two layers.

Builds (once, under --dir) a store of two differently seeded random BERTs (384 wide, like
MiniLM; 2 layers) over IMDb reviews, then times, in one process:

* baseline: stream both (n_tokens, 384) fp16 arrays chunk by chunk and decode them (no maths);
* compare with mean-cosine + token-cosine;
* compare with all three metrics, CKA on every row (three 384 x 384 float64 Gram accumulators);
* the in-memory numpy reference (load both arrays whole, then the same three metrics), with its peak
  Python-heap memory next to the streaming pass's.

    .venv/bin/python bench/bench_compare.py [--docs 500] [--dir /tmp/actstore-bench-compare]
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IMDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb.jsonl.gz"


def build_store(root: Path, n_docs: int) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from actstore.data.corpora import DataConfig
    from actstore.models.names import resolve_model
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    path = root / f"imdb{n_docs}.zarr"
    if (path / "models" / "b" / "layer_2" / "zarr.json").exists():
        return str(path)
    for seed, key in ((0, "a"), (1, "b")):
        d = root / f"bert-{key}"
        if not (d / "config.json").exists():
            torch.manual_seed(seed)
            cfg = BertConfig(
                vocab_size=30522,
                hidden_size=384,
                num_hidden_layers=2,
                num_attention_heads=6,
                intermediate_size=768,
                max_position_embeddings=512,
            )
            BertModel(cfg).save_pretrained(d)
            AutoTokenizer.from_pretrained(resolve_model("bundled:minilm")).save_pretrained(d)
        ecfg = ExtractConfig(
            model=str(d),
            data=DataConfig(str(IMDB), limit=n_docs),
            layers=[2],
            name=key,
            max_length=128,
            codec="fp16",
            device="cpu",
        )
        extract(str(path), ecfg, progress=False)
    return str(path)


def timed(fn):  # -> (seconds, peak traced MiB, result)
    tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    secs = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return secs, peak, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=500)
    ap.add_argument("--dir", default="/tmp/actstore-bench-compare")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)

    import numpy as np

    from actstore import open_store
    from actstore.analysis.compare import compare_layer, linear_cka, mean_cosine, token_cosine
    from actstore.analysis.config import CompareConfig

    st = open_store(build_store(root, args.docs))
    xa, xb = st.activations("a", 2), st.activations("b", 2)
    n = len(xa)

    def read_only() -> int:
        rows = 0
        for ca, cb in zip(xa.iter_chunks(), xb.iter_chunks(), strict=True):
            rows += len(ca.values) + len(cb.values)
        return rows

    def in_memory() -> tuple[float, float, float]:
        a, b = xa[:], xb[:]
        return mean_cosine(a, b), token_cosine(a, b), linear_cka(a, b)

    read_only()  # warm the page cache
    base, base_mem, _ = timed(read_only)
    cos2, cos2_mem, _ = timed(
        lambda: compare_layer(
            st,
            "a",
            "b",
            2,
            CompareConfig(models=("a", "b"), metrics=["mean-cosine", "token-cosine"]),
        )
    )
    full, full_mem, r = timed(
        lambda: compare_layer(st, "a", "b", 2, CompareConfig(models=("a", "b"), cka_rows=0))
    )
    mem, mem_mem, ref = timed(in_memory)
    assert np.allclose([r["mean-cosine"], r["token-cosine"], r["cka"]], ref, atol=1e-5)
    print(f"store: {n:,} token rows x 384 (fp16), layer 2 of two random BERTs")
    print(
        f"baseline, stream + decode both arrays : {base:6.2f} s  (peak heap {base_mem:6.1f} MiB)  1.00x"
    )
    print(
        f"compare mean-cosine + token-cosine    : {cos2:6.2f} s  (peak heap {cos2_mem:6.1f} MiB)  {cos2 / base:.2f}x"
    )
    print(
        f"compare + CKA on every row            : {full:6.2f} s  (peak heap {full_mem:6.1f} MiB)  {full / base:.2f}x"
    )
    print(
        f"in-memory numpy reference (same 3)    : {mem:6.2f} s  (peak heap {mem_mem:6.1f} MiB)  {mem / base:.2f}x"
    )


if __name__ == "__main__":
    main()
