"""The feature browser at scale (issue 17): server time per page at a feature table of >= 50M rows, and the static
export's size and build time for 100 features.

Builds (once, under --work) a store of a random 32-wide BERT over IMDb reviews (--docs of them at 256 tokens:
8,000 give ~1.6M token rows), a TopK SAE (k 32, d_sae 1024) and its encoding (k x rows ~ 51M feature rows), then
times each page through Starlette's TestClient in this process: the first request (cold: caches being filled,
e.g. the token search index) and the median of 5 more (warm). The goal is warm <= 100 ms per page.

Usage: python bench/bench_browse.py [--work /tmp/bench-browse] [--docs 8000] [--threads 2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(work: Path, docs: int) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    import actstore
    from actstore.data.corpora import DataConfig
    from actstore.encoding.config import EncodeConfig
    from actstore.encoding.encode import encode
    from actstore.models.names import resolve_model
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    store = work / "big.zarr"
    if (store / "features" / "s" / "encoding.json").exists():
        return str(store)
    work.mkdir(parents=True, exist_ok=True)
    bert = work / "bert"
    if not (bert / "config.json").exists():
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=256,
        )
        BertModel(cfg).save_pretrained(bert)
        AutoTokenizer.from_pretrained(resolve_model("bundled:minilm")).save_pretrained(bert)
    corpus = work / "imdb.jsonl"
    if not corpus.exists():
        with gzip.open(ROOT.parent / "shared" / "data" / "imdb.jsonl.gz", "rt") as f:
            rows = [json.loads(line) for line in f]
        step = max(1, len(rows) // docs)
        with corpus.open("w") as out:
            for r in rows[::step][:docs]:  # both labels, both splits
                out.write(
                    json.dumps({"id": r["id"], "text": r["text"], "label": r["label"]}) + "\n"
                )
    t0 = time.perf_counter()
    extract(
        str(store),
        ExtractConfig(
            model=str(bert),
            name="tiny",
            data=DataConfig(str(corpus)),
            layers="2",
            max_length=256,
            codec="fp16",
            batch_size=64,
            device="cpu",
        ),
        progress=False,
    )
    t1 = time.perf_counter()
    train_sae(
        str(store),
        TrainConfig(
            model="tiny",
            layer=2,
            arch="topk",
            k=32,
            d_sae=1024,
            tokens=200_000,
            batch_size=4096,
            name="s",
            device="cpu",
            task_samples=0,
        ),
        progress=False,
    )
    t2 = time.perf_counter()
    encode(
        actstore.open_store(str(store), writable=True),
        EncodeConfig(sae="s", device="cpu"),
        progress=False,
    )
    print(
        f"built {store}: extract {t1 - t0:.0f}s, train {t2 - t1:.0f}s, encode {time.perf_counter() - t2:.0f}s"
    )
    return str(store)


def timed(client, url: str, n: int = 5) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    r = client.get(url)
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get(url)
        warm.append(time.perf_counter() - t0)
    return cold, statistics.median(warm), r.status_code


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench-browse"))
    ap.add_argument("--docs", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    store = build(Path(a.work), a.docs)
    from starlette.testclient import TestClient

    import actstore
    from actstore.browse.app import create_app
    from actstore.browse.config import DashboardConfig, ServeConfig
    from actstore.browse.dashboard import write_dashboard

    st = actstore.open_store(store)
    from actstore.query.tables import feature_tables

    t = next(x for x in feature_tables(st) if x.sae == "s")
    stats = actstore.sql(
        st, "SELECT feature, n_active FROM feature_stats WHERE sae = 's' ORDER BY n_active"
    )
    median_f = int(stats["feature"][stats.height // 2])
    top_f = int(stats["feature"][-1])
    c = TestClient(create_app(st, ServeConfig()))
    pages = [
        ("store", "/"),
        ("features of the SAE (by variance)", "/sae/s"),
        ("features sorted by frequency", "/sae/s?sort=frequency"),
        ("features that fire on token 'great'", "/sae/s?token=great"),
        ("features associated with label pos", "/sae/s?label=pos&sort=mean_diff"),
        (
            f"feature page, median feature ({int(stats['n_active'][stats.height // 2]):,} activations)",
            f"/sae/s/feature/{median_f}",
        ),
        (
            f"feature page, most frequent feature ({int(stats['n_active'][-1]):,} activations)",
            f"/sae/s/feature/{top_f}",
        ),
        ("more contexts (page 3)", f"/sae/s/feature/{median_f}/contexts?page=3"),
        ("sample page", "/sample/17"),
        (
            "SQL console: count by label",
            "/sql?q=SELECT+label,+count(*)+FROM+samples+GROUP+BY+label",
        ),
    ]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}"
    )
    print(f"store: {t.n_rows:,} token rows, {t.n_feature_rows:,} feature rows, d_sae {t.d_sae}")
    print("| page | cold ms | warm ms (median of 5) |")
    print("|---|---|---|")
    for name, url in pages:
        cold, warm, status = timed(c, url)
        assert status == 200, (url, status)
        print(f"| {name} | {cold * 1000:.0f} | {warm * 1000:.0f} |")
    with tempfile.TemporaryDirectory() as tmp:
        res = write_dashboard(st, DashboardConfig(sae="s", out=f"{tmp}/dash", top=100))
        print(
            f"\nstatic export of 100 features: {res.n_bytes / 2**20:.1f} MiB in {res.seconds:.1f}s"
        )


if __name__ == "__main__":
    main()
