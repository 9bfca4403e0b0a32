"""Benchmark: one read, many SAEs. N SAEs of one layer trained together from one pass over the shuffled stream
(``actstore.sae.group.train_together``) against the same N trained one after another (``train_sae``), in this
process, on the same store; and the weights checked bit-identical.

The store is synthetic (a planted dictionary, fp32 chunks with zstd and crc32c as extract writes them), so the read
and decode cost is a store's, not a model's.

    .venv/bin/python bench/bench_one_pass.py [--rows 400000] [--d 384] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synth_store(path: Path, rows: int, d: int) -> str:
    from actstore.testing.synthetic import planted_dictionary, write_synthetic_store

    pd = planted_dictionary(d, 4 * d, 8, seed=1)
    write_synthetic_store(
        str(path), pd.rows(rows, block=16384), rows, d, sample_len=128, chunk_rows=4096
    )
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1024)
    args = ap.parse_args()

    import torch

    import actstore
    from actstore.sae.config import TrainConfig
    from actstore.sae.group import train_together
    from actstore.sae.train import train_sae

    tmp = Path(tempfile.mkdtemp(prefix="actstore-onepass-"))
    try:
        src = synth_store(tmp / "src.zarr", args.rows, args.d)
        a, b = str(tmp / "together.zarr"), str(tmp / "apart.zarr")
        shutil.copytree(src, a)
        shutil.copytree(src, b)
        base = TrainConfig(
            model="synth",
            layer=0,
            arch="topk",
            epochs=1,
            batch_size=args.batch_size,
            device="cpu",
            threads=args.threads,
            task_samples=0,
            eval_points=4,
        )
        cfgs = [
            dataclasses.replace(base, d_sae=d, k=k, name=f"s{d}-k{k}")
            for d in (768, 1536)
            for k in (16, 32)
        ]
        t0 = time.perf_counter()
        train_together(a, cfgs, progress=False)
        together = time.perf_counter() - t0
        t0 = time.perf_counter()
        for c in cfgs:
            train_sae(b, c, progress=False)
        apart = time.perf_counter() - t0
        c2 = str(tmp / "apart-all-cores.zarr")
        shutil.copytree(src, c2)
        t0 = time.perf_counter()
        for c in cfgs:  # the same runs with every core for each step (torch's intra-op threads)
            train_sae(c2, dataclasses.replace(c, threads=os.cpu_count()), progress=False)
        apart_all = time.perf_counter() - t0
        same = all(
            torch.equal(v, actstore.load_sae(actstore.open_store(b), c.name).state_dict()[k_])
            for c in cfgs
            for k_, v in actstore.load_sae(actstore.open_store(a), c.name).state_dict().items()
        )
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}; {args.rows:,} rows x "
            f"{args.d} (fp32), batch {args.batch_size}, 1 epoch; SAEs: d_sae 768/1536 x k 16/32 (topk)"
        )
        print("| run | wall s | ratio |")
        print("|---|---|---|")
        from actstore.sae.group import parallel_steps

        par = parallel_steps(args.threads, len(cfgs))
        print(
            f"| 4 SAEs, one pass (train_together, {par} stepping at once, {args.threads} thread each) | {together:.1f} "
            f"| {together / apart:.3f} |"
        )
        print(
            f"| 4 SAEs, one after another (train_sae, {args.threads} thread) | {apart:.1f} | 1.000 |"
        )
        print(
            f"| 4 SAEs, one after another (train_sae, {os.cpu_count()} threads) | {apart_all:.1f} | "
            f"{apart_all / apart:.3f} |"
        )
        print(f"weights bit-identical: {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
