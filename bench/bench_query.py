"""Benchmark: top-tokens lookup on a large feature table vs a scan of a token-ordered copy.

Builds (once, under --dir) a store of a random 3-layer 32-wide BERT over IMDb reviews,
a seeded top-k SAE (d_sae 1024, k 128) on layer 2, and encodes it with actstore's own
writer to >= 50M feature rows. Then times, warm, in one DuckDB connection:

* the lookup ``WHERE feature = f ORDER BY value DESC LIMIT 20`` on the encoded table
  (feature-clustered, small row groups) vs the same rows re-written in token-row order;
* the full ``top_tokens`` (with sample, label and context) for the same features: through the
  connection, without one (straight from the bucket file, as the CLI does), and the named SQL
  query ``top_tokens`` (a join against the ``tokens`` table) it replaces; the frames are equal.

    .venv/bin/python bench/bench_query.py [--docs 1600] [--dir /tmp/actstore-bench]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IMDB = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb.jsonl.gz"


def build_store(root: Path, n_docs: int, d_sae: int = 1024, k: int = 128) -> str:
    """A store with SAE 'bench' (topk) on layer 2 of a tiny random BERT; returns its path (reused if present)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    import actstore
    from actstore.data.corpora import DataConfig
    from actstore.models.names import resolve_model
    from actstore.sae.config import SAEConfig
    from actstore.sae.files import save_sae
    from actstore.sae.model import SAE
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    path = root / f"imdb{n_docs}.zarr"
    if not (path / "saes" / "bench" / "cfg.json").exists():
        model_dir = root / "tiny-bert"
        if not (model_dir / "config.json").exists():
            torch.manual_seed(0)
            cfg = BertConfig(
                vocab_size=30522,
                hidden_size=32,
                num_hidden_layers=3,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=512,
            )
            BertModel(cfg).save_pretrained(model_dir)
            AutoTokenizer.from_pretrained(resolve_model("bundled:minilm")).save_pretrained(
                model_dir
            )
        ecfg = ExtractConfig(
            model=str(model_dir),
            data=DataConfig(str(IMDB), limit=n_docs),
            layers=[2],
            name="tiny",
            codec="fp16",
            batch_size=32,
            device="cpu",
        )
        extract(str(path), ecfg, progress=False)
        st = actstore.open_store(str(path), writable=True)
        torch.manual_seed(0)
        tk = st.model_info("tiny").tokenization
        sae = SAE(
            SAEConfig(
                arch="topk",
                d_in=32,
                d_sae=d_sae,
                k=k,
                model="tiny",
                layer=2,
                tokenization=tk,
                name="bench",
            )
        )
        with torch.no_grad():  # uneven feature frequencies, like a trained SAE
            sae.b_enc.copy_(torch.linspace(-2.0, 1.0, d_sae)[torch.randperm(d_sae)])
        save_sae(st, sae, "bench")
    return str(path)


def timeit(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` warm calls (after one warm-up)."""
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1600, help="IMDb reviews in the store")
    ap.add_argument(
        "--dir", default="/tmp/actstore-bench", help="where the store is built and kept"
    )
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    import polars as pl
    import pyarrow.parquet as pq

    import actstore
    from actstore.encoding.config import EncodeConfig
    from actstore.encoding.encode import encode
    from actstore.query import lookups, named, tables

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    path = build_store(root, args.docs)
    st = actstore.open_store(path, writable=True)
    res = encode(st, EncodeConfig(sae="bench"), progress=False)
    man = tables.resolve_sae(st, sae="bench")
    n_feat_rows = man.n_feature_rows
    print(
        f"store: {path}: {man.n_rows:,} token rows, {n_feat_rows:,} feature rows"
        + ("" if res.skipped else f" (encoded in {res.seconds:.1f}s)")
    )
    n_bytes = sum(os.path.getsize(f) for f in man.files)
    print(
        f"parquet: {n_bytes / 2**20:.1f} MiB, {n_bytes / n_feat_rows:.2f} bytes per feature row, "
        f"{sum(pq.ParquetFile(f).metadata.num_row_groups for f in man.files)} row groups"
    )

    # token-ordered copy: same rows, same row-group size, sorted by token row
    copy = root / f"imdb{args.docs}-token-ordered.parquet"
    if not copy.exists():
        t = pq.read_table(man.files).sort_by([("row", "ascending"), ("feature", "ascending")])
        pq.write_table(t, copy, row_group_size=16384, compression="zstd")
        del t

    stats = (
        actstore.feature_stats(st, "bench")
        .filter(pl.col("n_active") > 0)
        .sort("n_active")
        .collect()
    )
    picks = {
        "rare (p10)": stats.row(int(stats.height * 0.1), named=True),
        "typical (median)": stats.row(stats.height // 2, named=True),
        "frequent (p90)": stats.row(int(stats.height * 0.9), named=True),
        "most frequent": stats.row(stats.height - 1, named=True),
    }
    con = actstore.connect(st)
    lookup = "SELECT row, value FROM features WHERE sae = $sae AND feature = $f ORDER BY value DESC, row LIMIT 20"
    scan = f"SELECT row, value FROM read_parquet('{copy}') WHERE feature = $f ORDER BY value DESC, row LIMIT 20"
    # the copy lies outside the store: the read-only connection may not read it
    rw = actstore.connect(st, read_only=False)
    t0 = time.perf_counter()
    lookups.top_tokens(st, int(picks["typical (median)"]["feature"]), sae="bench", n=20, context=8)
    print(
        f"first top_tokens in the process (builds the token context): {(time.perf_counter() - t0) * 1e3:.0f} ms"
    )
    print(
        f"\n{'feature':>24} {'rows':>9} {'lookup ms':>10} {'scan ms':>9} {'speed-up':>9} | {'top_tokens ms':>13} "
        f"{'no con ms':>10} {'SQL join ms':>12} {'speed-up':>9}"
    )
    for label, row in picks.items():
        f = int(row["feature"])
        a = con.execute(lookup, {"sae": "bench", "f": f}).fetchall()
        b = rw.execute(scan, {"f": f}).fetchall()
        assert a == b, "lookup and scan disagree"
        params = {"sae": "bench", "feature": f, "n": 20, "context": 8}
        assert lookups.top_tokens(st, f, sae="bench", con=con).equals(
            named.run_query(st, "top_tokens", params, con=con)
        )
        t_lookup = timeit(
            lambda f=f: con.execute(lookup, {"sae": "bench", "f": f}).fetchall(), args.repeat
        )
        t_scan = timeit(lambda f=f: rw.execute(scan, {"f": f}).fetchall(), max(3, args.repeat // 3))
        t_top = timeit(
            lambda f=f: lookups.top_tokens(st, f, sae="bench", n=20, context=8, con=con),
            args.repeat,
        )
        t_nocon = timeit(
            lambda f=f: lookups.top_tokens(st, f, sae="bench", n=20, context=8), args.repeat
        )
        t_sql = timeit(
            lambda p=params: named.run_query(st, "top_tokens", p, con=con), max(3, args.repeat // 3)
        )
        print(
            f"{label + ' ' + str(f):>24} {row['n_active']:>9,} {t_lookup * 1e3:>10.1f} {t_scan * 1e3:>9.1f} "
            f"{t_scan / t_lookup:>8.1f}x | {t_top * 1e3:>13.1f} {t_nocon * 1e3:>10.1f} {t_sql * 1e3:>12.1f} "
            f"{t_sql / t_top:>8.1f}x"
        )
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
