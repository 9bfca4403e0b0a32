"""Remote stores: bytes fetched by one top-tokens query vs the store's size, and streaming read MB/s over S3 vs local.

A real S3 API (moto's server on 127.0.0.1) sits behind a small counting HTTP
proxy, so "bytes fetched" is every response byte that crossed the wire,
including metadata reads and listings.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_remote.py [--docs 200] [--layer 6]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import Counter, counting_proxy  # noqa: E402 - the same counting proxy as the tests


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    counter = Counter()
    proxy = counting_proxy(moto.get_host_and_port()[1], counter)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.server_address[1]}",
    )
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")

    from actstore import open_store
    from actstore.data.corpora import DataConfig
    from actstore.encoding.config import EncodeConfig
    from actstore.encoding.encode import encode
    from actstore.query.lookups import top_tokens
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae
    from actstore.storage.config import CopyConfig
    from actstore.storage.copy import copy_store
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    tmp = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    local = str(tmp / "store.zarr")
    t = time.perf_counter()
    extract(
        local,
        ExtractConfig(
            model="bundled:minilm",
            data=DataConfig(str(SHARED / "imdb.jsonl.gz"), limit=args.docs),
            layers=[args.layer],
            codec="fp16",
            chunk_rows=4096,
            device="cpu",
        ),
        progress=False,
    )
    st = open_store(local, writable=True)
    train_sae(
        st,
        TrainConfig(
            model="minilm",
            layer=args.layer,
            d_sae=1536,
            epochs=1,
            batch_size=1024,
            name="s",
            device="cpu",
        ),
        progress=False,
    )
    encode(st, EncodeConfig(sae="s", row_group_rows=4096, n_buckets=8), progress=False)
    n_tokens = len(st.activations("minilm", args.layer))
    print(
        f"built local store: {n_tokens} tokens, layer {args.layer}, in {time.perf_counter() - t:.0f}s"
    )

    url = "s3://bench/store"
    counter.reset()
    t = time.perf_counter()
    res = copy_store(CopyConfig(local, url, jobs=8))
    up_s = time.perf_counter() - t
    store_bytes = sum(p.stat().st_size for p in Path(local).rglob("*") if p.is_file())
    feat_bytes = sum(p.stat().st_size for p in (Path(local) / "features").rglob("*.parquet"))
    print(
        f"copy local -> s3: {res.n_objects} objects, {store_bytes / 2**20:.1f} MiB in {up_s:.1f}s "
        f"({store_bytes / 2**20 / up_s:.1f} MiB/s)"
    )

    # 1) bytes fetched by one top-tokens query, opening the store cold by URL
    rows = []
    for feature in (0, 7, 100):
        counter.reset()
        t = time.perf_counter()
        remote = open_store(url)
        top = top_tokens(remote, feature=feature, sae="s", n=20)
        secs = time.perf_counter() - t
        rows.append((feature, counter.bytes, counter.requests, secs, top.height))
    print(
        f"\nstore size {store_bytes / 2**20:.2f} MiB (features tables {feat_bytes / 2**20:.2f} MiB)"
    )
    print(
        "top-tokens over s3 (cold open + query): feature, bytes fetched, requests, fraction of store, seconds"
    )
    for f, b, r, s, h in rows:
        print(
            f"  {f:>4}  {b / 2**20:8.2f} MiB  {r:5d}  {b / store_bytes:6.1%}  {s:5.2f}s  ({h} rows)"
        )

    # 2) streaming read MB/s: local vs s3 on loopback; s3 as before (s3fs's default max_concurrency=10: a HEAD
    #    before every chunk GET) vs now (actstore passes max_concurrency=1: one GET per chunk)
    def stream(path: str, **opts: object) -> tuple[float, int]:
        best, reqs = 0.0, 0
        for _ in range(args.repeat):
            acts = open_store(path, storage_options=opts or None).activations("minilm", args.layer)
            counter.reset()
            t = time.perf_counter()
            n = sum(c.values.nbytes for c in acts.iter_chunks(prefetch=4))
            best = max(best, n / (time.perf_counter() - t) / 2**20)
            reqs = counter.requests
        return best, reqs

    n_objects = -(-n_tokens // open_store(local).activations("minilm", args.layer).chunk_rows)
    (loc_mb, _), (s3_mb, s3_req), (old_mb, old_req) = (
        stream(local),
        stream(url),
        stream(url, max_concurrency=10),
    )
    print(
        f"\nstreaming read of layer {args.layer} ({n_objects} shard objects; decoded float32 MiB/s, best of {args.repeat}):"
    )
    print(f"  local                          {loc_mb:8.1f} MiB/s   (baseline 1.00)")
    print(
        f"  s3, one GET per shard (now)    {s3_mb:8.1f} MiB/s   ({s3_mb / loc_mb:.2f}x local; {s3_req} requests)"
    )
    print(
        f"  s3, HEAD + GET (s3fs default)  {old_mb:8.1f} MiB/s   ({old_mb / loc_mb:.2f}x local; {old_req} requests)"
    )

    # 3) the Zarr side alone: zarr's FsspecStore (as actstore opens it) vs zarr's ObjectStore (obstore), whole array
    import zarr

    def zarr_read(store: object) -> float:
        best = 0.0
        for _ in range(args.repeat):
            arr = zarr.open_array(store, path=f"models/minilm/layer_{args.layer}", mode="r")
            t = time.perf_counter()
            arr[:]
            best = max(best, arr.nbytes / (time.perf_counter() - t) / 2**20)
        return best

    fs_mb = zarr_read(open_store(url).loc.zarr_store)
    try:
        from obstore.store import S3Store

        endpoint = os.environ["AWS_ENDPOINT_URL"]
        obs = zarr.storage.ObjectStore(
            S3Store(
                "bench",
                prefix="store",
                endpoint=endpoint,
                region="us-east-1",
                client_options={"allow_http": True},
            ),
            read_only=True,
        )
        obs_mb = zarr_read(obs)
        print(
            f"\nzarr alone, stored bytes MiB/s: FsspecStore (max_concurrency=1) {fs_mb:.1f}; ObjectStore (obstore) "
            f"{obs_mb:.1f} ({obs_mb / fs_mb:.2f}x)"
        )
    except ImportError:
        print(
            f"\nzarr alone, stored bytes MiB/s: FsspecStore (max_concurrency=1) {fs_mb:.1f}; obstore not installed"
        )

    # 4) four random token rows: bytes fetched from a sharded layer (format 2) vs the same rows unsharded (format 1)
    flat = str(tmp / "flat.zarr")
    extract(
        flat,
        ExtractConfig(
            model="bundled:minilm",
            data=DataConfig(str(SHARED / "imdb.jsonl.gz"), limit=args.docs),
            layers=[args.layer],
            codec="fp16",
            chunk_rows=4096,
            inner_rows=0,
            device="cpu",
        ),
        progress=False,
    )
    copy_store(CopyConfig(flat, "s3://bench/flat", jobs=8))
    rows = np.random.default_rng(0).choice(n_tokens, size=4, replace=False)
    fetched = {}
    for name, u in (("sharded", url), ("unsharded", "s3://bench/flat")):
        acts = open_store(u).activations("minilm", args.layer)
        acts.take(rows[:1])  # metadata read
        counter.reset()
        acts.take(rows)
        fetched[name] = (counter.bytes, counter.requests)
    (sb, sr), (ub, ur) = fetched["sharded"], fetched["unsharded"]
    print(
        f"\n4 random rows of layer {args.layer}: sharded {sb / 1024:.0f} KiB in {sr} requests, unsharded "
        f"{ub / 1024:.0f} KiB in {ur} requests ({ub / max(sb, 1):.1f}x fewer bytes sharded)"
    )
    print(
        f"\nmachine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}"
    )
    moto.stop()
    proxy.shutdown()


if __name__ == "__main__":
    main()
