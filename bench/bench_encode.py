"""Benchmark: encode throughput vs the bare SAE forward over the same chunks, and Parquet bytes per feature row.

Uses the store of ``bench_query.py`` (tiny random BERT over IMDb, top-k SAE d_sae 1024, k 128)
at a smaller size. Baseline: stream the same layer and run ``sae.encode`` on each chunk,
discarding the result. Then a full ``actstore encode`` (spill + sort + write), timed by phase.

    .venv/bin/python bench/bench_encode.py [--docs 400] [--dir /tmp/actstore-bench]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--dir", default="/tmp/actstore-bench")
    args = ap.parse_args()
    import torch
    from bench_query import build_store

    import actstore
    from actstore.encode import EncodeConfig, encode

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    st = actstore.open_store(build_store(root, args.docs), writable=True)
    sae = st.load_sae("bench").eval()
    acts = st.activations("tiny", 2)
    cfg = EncodeConfig(sae="bench", overwrite=True)

    t0 = time.perf_counter()
    with torch.inference_mode():
        for ch in acts.iter_chunks(rows=cfg.batch_rows, prefetch=2):
            sae.encode(torch.from_numpy(ch.values))
    t_bare = time.perf_counter() - t0

    res = encode(st, cfg, progress=False)
    n = acts.n_rows
    print(f"{n:,} token rows -> {res.n_feature_rows:,} feature rows ({res.n_feature_rows / n:.0f} per token)")
    print(f"bare SAE forward : {t_bare:6.1f} s  {n / t_bare:>10,.0f} tok/s  (baseline)")
    print(f"actstore encode  : {res.seconds:6.1f} s  {n / res.seconds:>10,.0f} tok/s  {t_bare / res.seconds:.2f}x of baseline")
    spill = sum(v for k, v in res.timings.items() if k != "sort")
    print(f"  streaming phase (read+encode+nonzero+spill): {spill:.1f} s = {t_bare / spill:.2f}x of baseline")
    print(f"  sort+write phase: {res.timings['sort']:.1f} s;  timings { ({k: round(v, 1) for k, v in res.timings.items()}) }")
    print(f"parquet: {res.n_bytes / res.n_feature_rows:.2f} bytes per feature row ({res.n_bytes / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
