"""Extraction past one process (issue 14): the cost of unit markers and of Ray, measured on real MiniLM over IMDb.

Prints, each against a baseline measured in the same run, on a store whose token index exists already (so every
run does the same forward passes and writes):

1. the in-process extraction of a format-3 store (claims + markers per unit) vs a format-2 store (one lock, a
   prefix counter): the price of units that complete in any order;
2. Ray with 1 actor x T threads vs the plain process with T threads (end to end, and per unit once the actor is
   up: the engine's overhead);
3. Ray with 2 actors x 1 thread vs the plain process with 2 threads (this machine's cores);
4. a projection of 100M tokens of bert-base (layers 3, 6, 12) on 8 GPUs from the measured per-unit overhead,
   with its assumptions printed.

Usage: python bench/bench_distributed.py [--samples 600] [--max-length 128] [--unit-rows 4096]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
IMDB = ROOT.parent / "shared" / "data" / "imdb.jsonl.gz"
sys.path.insert(0, str(ROOT))


def set_format(path: str, fmt: int) -> None:
    meta_path = Path(path) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["actstore"]["format"] = fmt
    meta_path.write_text(json.dumps(meta))


def timed_extract(
    base: str, work: Path, name: str, cfg, fmt: int = 3, ray: str | None = None
) -> tuple[float, object]:
    """Extract ``cfg`` into a fresh copy of the tokenized store ``base``; (seconds, result)."""
    from actstore.store.extract import extract

    path = str(work / name)
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, path)
    set_format(path, fmt)
    t0 = time.perf_counter()
    res = extract(path, cfg, progress=False, ray_address=ray)
    return time.perf_counter() - t0, res


def actor_startup_seconds(ray, cfg, store: str) -> float:
    """Seconds to start one extraction actor (a process, torch and the model loaded) and hear back from it."""
    import actstore
    from actstore.store.distributed import ExtractActor
    from actstore.store.worker import ExtractJob

    st = actstore.open_store(store)
    tok = st.tokenization()
    job = ExtractJob(
        store=store,
        storage_options=None,
        model=cfg.model,
        model_key="minilm",
        layers=[0],
        tokenization=tok.key,
        n_rows=tok.n_tokens,
        unit_rows=cfg.unit_rows,
        codec=cfg.codec,
        batch_size=cfg.batch_size,
        device="cpu",
        threads=cfg.threads,
    )
    t0 = time.perf_counter()
    a = ray.remote(ExtractActor).options(num_cpus=1).remote(job.to_dict())
    ray.get(a.pid.remote())
    secs = time.perf_counter() - t0
    ray.kill(a)
    return secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--unit-rows", type=int, default=4096)
    ap.add_argument("--layers", default="2,4,6")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are printed")
    args = ap.parse_args()

    import ray
    import torch

    import actstore
    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    data = DataConfig(str(IMDB), limit=args.samples)
    base_cfg = ExtractConfig(
        "bundled:minilm",
        data,
        args.layers,
        codec="fp16",
        max_length=args.max_length,
        unit_rows=args.unit_rows,
        chunk_rows=4096,
        batch_size=32,
        device="cpu",
        threads=1,
    )
    base = str(work / "base.zarr")
    extract(
        base, dataclasses.replace(base_cfg, layers=[0]), progress=False
    )  # the token index (and layer 0)
    n_tokens = actstore.open_store(base).tokenization().n_tokens
    n_units = -(-n_tokens // args.unit_rows)
    print(
        f"# {args.samples} IMDb reviews at <= {args.max_length} tokens: {n_tokens:,} tokens, MiniLM layers "
        f"{args.layers}, {n_units} units of {args.unit_rows} rows, fp16, torch {torch.__version__}, "
        f"{os.cpu_count()} cores"
    )

    import statistics

    runs: dict[str, list[float]] = {k: [] for k in ("f2", "f3", "r1", "p2", "r2")}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        startup = statistics.median(actor_startup_seconds(ray, base_cfg, base) for _ in range(2))
        for r in range(args.rounds):  # alternate, so drifts of the machine hit every variant alike
            runs["f2"].append(timed_extract(base, work, "f2.zarr", base_cfg, fmt=2)[0])
            runs["f3"].append(timed_extract(base, work, "f3.zarr", base_cfg, fmt=3)[0])
            runs["r1"].append(
                timed_extract(
                    base, work, "r1.zarr", dataclasses.replace(base_cfg, ray_workers=1), ray="local"
                )[0]
            )
            runs["p2"].append(
                timed_extract(base, work, "p2.zarr", dataclasses.replace(base_cfg, threads=2))[0]
            )
            runs["r2"].append(
                timed_extract(
                    base, work, "r2.zarr", dataclasses.replace(base_cfg, ray_workers=2), ray="local"
                )[0]
            )
            print(
                f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in runs.items()),
                flush=True,
            )
    finally:
        ray.shutdown()
    t2, t3, tr1, tp2, tr2 = (statistics.median(runs[k]) for k in ("f2", "f3", "r1", "p2", "r2"))
    rows = [
        ("in-process, 1 thread: format 3 (claims + markers) vs format 2 (lock + prefix)", t2, t3),
        ("Ray 1 actor x 1 thread vs plain 1 thread (end to end)", t3, tr1),
        ("Ray 1 actor x 1 thread vs plain 1 thread (actor start-up excluded)", t3, tr1 - startup),
        ("Ray 2 actors x 1 thread vs plain 1 process x 2 threads (end to end)", tp2, tr2),
        (
            "Ray 2 actors x 1 thread vs plain 1 process x 2 threads (start-up excluded)",
            tp2,
            tr2 - startup,
        ),
    ]
    print(f"\nmedians of {args.rounds} rounds (a Ray session already up, as on a cluster)")
    print("| what | baseline s | measured s | speed vs baseline |\n|---|---|---|---|")
    for what, b, m in rows:
        print(f"| {what} | {b:.2f} | {m:.2f} | {b / m:.2f}x |")
    per_unit_s = max(0.0, (tr1 - startup - t3) / n_units)
    print(
        f"\nactor start-up (process + torch + model): {startup:.2f} s; Ray overhead per unit of {args.unit_rows} rows: "
        f"{per_unit_s * 1000:.0f} ms; plain per unit {t3 / n_units:.2f} s"
    )

    # 4. projection
    unit_rows, tokens, gpus = 65536, 100_000_000, 8
    print(
        f"\n## projection: {tokens / 1e6:.0f}M tokens of bert-base, layers 3,6,12, fp16, {gpus} GPUs, units of {unit_rows}"
    )
    print(
        "assumed, not measured here (no GPU): a bf16 bert-base forward rate per GPU R (tokens/s, 512-token batches)"
        "; storage that takes every worker's writes (3 x 768 x 2 B = 4.6 kB per token) at that rate; the measured"
        " per-unit overhead above (scaled by rows: it is claims, markers and listing, not data) and actor start-up"
    )
    units = -(-tokens // unit_rows)
    for rate in (50_000, 150_000, 400_000):
        compute = tokens / (gpus * rate)
        overhead = units * per_unit_s / gpus + startup
        write_gbps = gpus * rate * 3 * 768 * 2 / 1e9
        print(
            f"- R = {rate:,} tok/s/GPU: {compute / 60:.1f} min of forward + {overhead / 60:.1f} min of engine overhead"
            f" = {(compute + overhead) / 60:.1f} min; needs {write_gbps:.1f} GB/s of store writes"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
