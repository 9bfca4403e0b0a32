"""Remote stores: bytes fetched by one top-tokens query vs the store's size, and streaming read MB/s over S3 vs local.

A real S3 API (moto's server on 127.0.0.1) sits behind a small counting HTTP
proxy, so "bytes fetched" is every response byte that crossed the wire,
including metadata reads and listings.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_remote.py [--docs 200] [--layer 6]
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


class Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = 0
        self.requests = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n
            self.requests += 1

    def reset(self) -> None:
        with self.lock:
            self.bytes = self.requests = 0


def counting_proxy(target_port: int, counter: Counter) -> ThreadingHTTPServer:
    """A forwarding HTTP proxy to 127.0.0.1:target_port that counts response bytes (headers excluded)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else None
            conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            counter.add(len(data))
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(k, v)
            length = len(data) if self.command != "HEAD" else resp.getheader("Content-Length") or 0
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


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
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.server_address[1]}",
    )  # fmt: skip
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
    extract(local, ExtractConfig(model="bundled:minilm", data=DataConfig(str(SHARED / "imdb.jsonl.gz"), limit=args.docs),
                                 layers=[args.layer], codec="fp16", chunk_rows=4096, device="cpu"), progress=False)  # fmt: skip
    st = open_store(local, writable=True)
    train_sae(st, TrainConfig(model="minilm", layer=args.layer, d_sae=1536, epochs=1, batch_size=1024, name="s", device="cpu"),
              progress=False)  # fmt: skip
    encode(st, EncodeConfig(sae="s", row_group_rows=4096, n_buckets=8), progress=False)
    n_tokens = len(st.activations("minilm", args.layer))
    print(f"built local store: {n_tokens} tokens, layer {args.layer}, in {time.perf_counter() - t:.0f}s")

    url = "s3://bench/store"
    counter.reset()
    t = time.perf_counter()
    res = copy_store(CopyConfig(local, url, jobs=8))
    up_s = time.perf_counter() - t
    store_bytes = sum(p.stat().st_size for p in Path(local).rglob("*") if p.is_file())
    feat_bytes = sum(p.stat().st_size for p in (Path(local) / "features").rglob("*.parquet"))
    print(f"copy local -> s3: {res.n_objects} objects, {store_bytes / 2**20:.1f} MiB in {up_s:.1f}s "
          f"({store_bytes / 2**20 / up_s:.1f} MiB/s)")  # fmt: skip

    # 1) bytes fetched by one top-tokens query, opening the store cold by URL
    rows = []
    for feature in (0, 7, 100):
        counter.reset()
        t = time.perf_counter()
        remote = open_store(url)
        top = top_tokens(remote, feature=feature, sae="s", n=20)
        secs = time.perf_counter() - t
        rows.append((feature, counter.bytes, counter.requests, secs, top.height))
    print(f"\nstore size {store_bytes / 2**20:.2f} MiB (features tables {feat_bytes / 2**20:.2f} MiB)")
    print("top-tokens over s3 (cold open + query): feature, bytes fetched, requests, fraction of store, seconds")
    for f, b, r, s, h in rows:
        print(f"  {f:>4}  {b / 2**20:8.2f} MiB  {r:5d}  {b / store_bytes:6.1%}  {s:5.2f}s  ({h} rows)")

    # 2) streaming read MB/s: local vs s3 on loopback
    def stream(path: str) -> float:
        best = 0.0
        for _ in range(args.repeat):
            acts = open_store(path).activations("minilm", args.layer)
            t = time.perf_counter()
            n = sum(c.values.nbytes for c in acts.iter_chunks(prefetch=4))
            best = max(best, n / (time.perf_counter() - t) / 2**20)
        return best

    loc_mb, s3_mb = stream(local), stream(url)
    print(f"\nstreaming read of layer {args.layer} (decoded float32 MiB/s, best of {args.repeat}):")
    print(f"  local {loc_mb:8.1f} MiB/s   (baseline 1.00)")
    print(f"  s3    {s3_mb:8.1f} MiB/s   ({s3_mb / loc_mb:.2f}x local)")
    print(f"\nmachine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}")
    moto.stop()
    proxy.shutdown()


if __name__ == "__main__":
    main()
