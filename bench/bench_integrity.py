"""Benchmark: what integrity on read costs (issue 9) — top-tokens warm latency and a full training epoch.

Same store as bench_query.py (a random 3-layer 32-wide BERT over IMDb reviews, a seeded top-k SAE
on layer 2, encoded), smaller by default. Each figure is measured with the read checks on (the
default: manifest SHA-256 of every Parquet/safetensors file opened, remembered by file identity;
absent chunks raise; attributes validated) and off (``integrity.VERIFY_ON_READ`` and
``location.STRICT_READS`` False), alternating, best of ``--repeat``:

* ``top_tokens`` warm: the same lookups in one process after a first call;
* ``top_tokens`` in a new process with the on-disk verification cache warm (what a CLI call pays);
* the one-time cost of hashing every file the views read (first open, cache empty);
* two epochs of ``train`` (topk, d_sae 256) streaming the layer.

    .venv/bin/python bench/bench_integrity.py [--docs 400] [--dir /tmp/actstore-bench] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def toggle(on: bool) -> None:
    from actstore.storage import integrity, location

    integrity.VERIFY_ON_READ = on
    location.STRICT_READS = on


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "actstore-bench"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    os.environ["ACTSTORE_CACHE_DIR"] = str(root / "verify-cache")

    from bench_query import build_store

    import actstore
    from actstore.encoding.config import EncodeConfig
    from actstore.encoding.encode import encode
    from actstore.query import tables, views
    from actstore.query.lookups import top_tokens
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae
    from actstore.storage import integrity
    from actstore.storage.integrity import update_manifest

    path = build_store(root, args.docs, d_sae=512, k=32)
    st = actstore.open_store(path, writable=True)
    encode(st, EncodeConfig(sae="bench"), progress=False)
    update_manifest(st.loc)
    st = actstore.open_store(path)
    stats = actstore.feature_stats(st, "bench").collect().sort("n_active")
    feats = [int(stats["feature"][int(stats.height * q)]) for q in (0.1, 0.5, 0.9)]
    n_feature_rows = int(actstore.sql(st, "SELECT count(*) AS n FROM features")["n"][0])
    print(
        f"store: {args.docs} IMDb docs, {len(st.activations('tiny', 2)):,} tokens, {n_feature_rows:,} feature rows"
    )

    # one-time cost: hash every file the views read (verification cache empty)
    keys = views.view_sql(st).keys
    size = sum(st.loc.size(k) for k in keys)
    cold = []
    for _ in range(args.repeat):
        integrity._VERIFIED.clear()
        os.environ["ACTSTORE_CACHE_DIR"] = tempfile.mkdtemp(dir=root)
        t0 = time.perf_counter()
        integrity.check_files(st.loc, keys)
        cold.append(time.perf_counter() - t0)
    os.environ["ACTSTORE_CACHE_DIR"] = str(root / "verify-cache")
    print(
        f"first open, cache empty: {min(cold) * 1e3:.1f} ms to hash {len(keys)} files ({size / 2**20:.1f} MiB)"
    )

    def run_lookups() -> float:
        t = []
        for f in feats * 5:
            t0 = time.perf_counter()
            top_tokens(st, f, sae="bench", n=20, context=8)
            t.append(time.perf_counter() - t0)
        return statistics.median(t)

    warm = {True: [], False: []}
    for i in range(args.repeat):
        for on in (True, False) if i % 2 == 0 else (False, True):  # alternate which goes first
            toggle(on)
            run_lookups()  # warm
            warm[on].append(run_lookups())
    toggle(True)
    w_on, w_off = min(warm[True]), min(warm[False])
    print(
        f"top_tokens warm: {w_on * 1e3:.2f} ms with checks, {w_off * 1e3:.2f} ms without ({w_on / w_off:.3f}x)"
    )
    # the checks alone, timed directly (immune to the noise of the whole lookup): what one warm lookup adds
    t = tables.resolve_sae(st, sae="bench")
    enc_key = "features/bench/encoding.json"
    raw = st.loc.read_bytes(enc_key)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        # the bucket file a lookup opens (warm: one stat)
        integrity.check_file(st.loc, t.file_keys[0])
        integrity.check_file(st.loc, enc_key, raw)  # encoding.json, read twice per lookup
        integrity.check_file(st.loc, enc_key, raw)
    per = (time.perf_counter() - t0) / n
    print(
        f"the checks of one warm lookup, timed alone: {per * 1e6:.0f} us = {per / w_off:.1%} of a lookup"
    )

    # a CLI call: a new process (disk cache warm), timing only top-tokens inside it
    code = (
        "import sys, time, os; import actstore\n"
        "from actstore.storage import integrity, location; from actstore.query import lookups\n"
        "on = sys.argv[1] == '1'; integrity.VERIFY_ON_READ = on; location.STRICT_READS = on\n"
        "st = actstore.open_store(sys.argv[2]); t0 = time.perf_counter()\n"
        "lookups.top_tokens(st, int(sys.argv[3]), sae='bench', n=20, context=8); print(time.perf_counter() - t0)"
    )
    proc = {True: [], False: []}
    for i in range(args.repeat):
        for on in (True, False) if i % 2 == 0 else (False, True):
            out = subprocess.run(
                [sys.executable, "-c", code, "1" if on else "0", path, str(feats[1])],
                capture_output=True,
                text=True,
                check=True,
                env=os.environ.copy(),
            )
            proc[on].append(float(out.stdout.strip().splitlines()[-1]))
    p_on, p_off = min(proc[True]), min(proc[False])
    print(
        f"top_tokens, first call in a new process: {p_on * 1e3:.1f} ms with checks, {p_off * 1e3:.1f} ms without "
        f"({p_on / p_off:.3f}x)"
    )

    train = {True: [], False: []}
    for i in range(args.repeat):
        for on in (True, False) if i % 2 == 0 else (False, True):
            toggle(on)
            cfg = TrainConfig(
                model="tiny",
                layer=2,
                arch="topk",
                k=16,
                d_sae=256,
                epochs=2,
                batch_size=1024,
                name=f"int-{int(on)}-{i}",
                overwrite=True,
                threads=2,
            )
            t0 = time.perf_counter()
            train_sae(path, cfg, progress=False)
            train[on].append(time.perf_counter() - t0)
    toggle(True)
    t_on, t_off = min(train[True]), min(train[False])
    print(
        f"train, two epochs: {t_on:.2f} s with checks, {t_off:.2f} s without ({t_on / t_off:.3f}x)"
    )


if __name__ == "__main__":
    main()
