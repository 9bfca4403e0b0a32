"""Benchmark: out-of-core SAE training vs an in-memory loop, peak RSS vs store size, and a quality table.

1. **throughput**: ``train_sae`` streaming from a store vs the same step function
   (``actstore.sae.loss.train_step``) over the same rows held in one in-memory tensor,
   shuffled with ``torch.randperm``; both in this process, alternated ``--reps`` times.
2. **peak RSS**: one epoch of ``train_sae`` (16 MiB shuffle buffer) on synthetic
   stores of N and 4N rows, each in a fresh subprocess (``ru_maxrss``).
3. **quality** (``--quality``): bundled MiniLM over IMDb, layers 2/4/6: relu-l1
   (paper preset) vs topk vs batchtopk at the same d_sae (1024), held-out FVU, L0, dead.

    .venv/bin/python bench/bench_train.py [--rows 100000] [--d 384] [--quality --docs 300]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synth_store(path: Path, rows: int, d: int) -> str:
    from actstore.testing.synthetic import planted_dictionary, write_synthetic_store

    if not (path / "zarr.json").exists():
        pd = planted_dictionary(d, 4 * d, 8, seed=1)
        write_synthetic_store(
            str(path), pd.rows(rows, block=16384), rows, d, sample_len=128, chunk_rows=4096
        )
    return str(path)


def in_memory_loop(x, cfg, d_sae: int, steps: int) -> float:
    """Steps/s of the same train_step over rows in memory (``x (n, d)``), fresh SAE, same init path."""
    import torch

    from actstore.sae.config import SAEConfig
    from actstore.sae.loss import train_step
    from actstore.sae.metrics import TrainTracker
    from actstore.sae.model import SAE

    d = x.shape[1]
    torch.manual_seed(0)
    sae = SAE(
        SAEConfig(
            cfg.arch,
            d,
            d_sae,
            k=cfg.resolve(d).k,
            norm_scale=math.sqrt(d / float((x[:4096] ** 2).sum(1).mean())),
        )
    )
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    tracker = TrainTracker(d_sae, cfg.dead_window)
    aux_k = cfg.resolve(d).aux_k
    done, t0 = 0, time.perf_counter()
    while done < steps:
        perm = torch.randperm(len(x))
        for a in range(0, len(x), cfg.batch_size):
            train_step(sae, opt, x[perm[a : a + cfg.batch_size]], tracker, cfg, aux_k)
            done += 1
            if done >= steps:
                break
    return steps / (time.perf_counter() - t0)


def throughput(args) -> None:
    import numpy as np
    import torch

    import actstore
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae

    path = synth_store(Path(args.dir) / f"synth-{args.rows}-{args.d}.zarr", args.rows, args.d)
    st = actstore.open_store(path, writable=True)  # train_sae saves into it
    acts = st.activations("synth", 0)
    # (rows, d) in memory
    x = torch.from_numpy(np.concatenate([c.values for c in acts.iter_chunks()]))
    print(
        f"throughput: {args.rows:,} rows x {args.d} (fp32 synthetic store, 4096-row chunks), d_sae {4 * args.d}, "
        f"arch {args.arch}, batch {args.batch}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    ratios: list[float] = []
    bare: list[float] = []
    for rep in range(args.reps):
        cfg = TrainConfig(
            model="synth",
            layer=0,
            arch=args.arch,
            d_sae=4 * args.d,
            epochs=1,
            batch_size=args.batch,
            name="bench",
            overwrite=True,
            device="cpu",
            eval_fraction=0.01,
            checkpoint_every=0,
        )
        res = train_sae(st, cfg, progress=False)
        mem = in_memory_loop(x, cfg, 4 * args.d, res.steps)
        # without the curve evals
        steps_only = res.steps / max(res.steps / res.steps_per_s - res.eval_seconds, 1e-9)
        ratios.append(res.steps_per_s / mem)
        bare.append(steps_only / mem)
        print(
            f"  rep {rep}: store {res.steps_per_s:.2f} steps/s ({res.steps} steps; {steps_only:.2f} without the "
            f"{cfg.eval_points} curve evals), in-memory {mem:.2f} steps/s, ratio {ratios[-1]:.3f} ({bare[-1]:.3f})",
            flush=True,
        )
    print(
        f"  median ratio store / in-memory: {sorted(ratios)[len(ratios) // 2]:.3f}, steps only "
        f"{sorted(bare)[len(bare) // 2]:.3f}"
    )


def rss_child(path: str) -> None:
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae

    cfg = TrainConfig(
        model="synth",
        layer=0,
        arch="topk",
        k=16,
        expansion=2,
        epochs=1,
        batch_size=1024,
        buffer_mb=16,
        name="rss",
        overwrite=True,
        device="cpu",
        checkpoint_every=0,
    )
    res = train_sae(path, cfg, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak, "tokens": res.tokens, "steps": res.steps}))


def peak_rss(args) -> None:
    base = args.rss_rows
    print(f"peak RSS: one topk epoch, 16 MiB shuffle buffer, d {args.d}", flush=True)
    out = []
    for mult in (1, 4):
        n = base * mult
        path = synth_store(Path(args.dir) / f"synth-{n}-{args.d}.zarr", n, args.d)
        data_mb = n * args.d * 4 / 2**20
        r = subprocess.run(
            [sys.executable, __file__, "--rss-child", path],
            capture_output=True,
            text=True,
            check=True,
        )
        m = json.loads(r.stdout.strip().splitlines()[-1])
        out.append(m["peak_mb"])
        print(
            f"  {mult}x: {n:,} rows ({data_mb:,.0f} MiB float32): peak RSS {m['peak_mb']:,.0f} MiB, "
            f"{m['tokens']:,} tokens trained",
            flush=True,
        )
    print(f"  4x / 1x peak RSS: {out[1] / out[0]:.3f}")


def quality(args) -> None:
    import actstore
    from actstore.data.corpora import DataConfig
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    path = Path(args.dir) / f"imdb-minilm-{args.docs}.zarr"
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb.jsonl.gz"
    if not (path / "models").exists():
        ecfg = ExtractConfig(
            model="bundled:minilm",
            data=DataConfig(str(data), limit=args.docs),
            layers=[2, 4, 6],
            name="minilm",
            max_length=128,
            codec="fp16",
            device="cpu",
            batch_size=16,
        )
        extract(str(path), ecfg, progress=False)
    st = actstore.open_store(str(path))
    n = len(st.activations("minilm", 2))
    print(
        f"quality: bundled MiniLM over {args.docs} IMDb reviews ({n:,} tokens, max length 128), d_sae 1024, "
        f"{args.q_epochs} epochs (all runs, the paper preset included), batch 1024, 5% held out",
        flush=True,
    )
    runs = [
        ("relu-l1 (paper)", {"preset": "paper", "epochs": args.q_epochs}),
        (
            "relu-l1 l1=0.1 lr=5e-4",
            {"arch": "relu-l1", "d_sae": 1024, "l1": 0.1, "epochs": args.q_epochs},
        ),
        ("topk k=32", {"arch": "topk", "k": 32, "d_sae": 1024, "epochs": args.q_epochs}),
        ("batchtopk k=32", {"arch": "batchtopk", "k": 32, "d_sae": 1024, "epochs": args.q_epochs}),
    ]
    print("| layer | SAE | held-out FVU | L0 | dead (train) | dense | steps/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for layer in (2, 4, 6):
        for label, kw in runs:
            cfg = TrainConfig(
                model="minilm",
                layer=layer,
                batch_size=1024,
                overwrite=True,
                device="cpu",
                name="q",
                checkpoint_every=0,
                **kw,
            )
            r = train_sae(st, cfg, progress=False)
            ev = r.metrics["eval"]
            print(
                f"| {layer} | {label} | {ev['fvu']:.3f} | {ev['l0']:.1f} | {r.metrics['train']['dead_fraction']:.3f} | "
                f"{ev['dense_fraction']:.3f} | {r.steps_per_s:.1f} |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/actstore-bench-train")
    ap.add_argument("--rows", type=int, default=100_000, help="rows of the throughput store")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--arch", default="topk")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rss-rows", type=int, default=100_000)
    ap.add_argument(
        "--quality", action="store_true", help="also the MiniLM/IMDb quality table (slow)"
    )
    ap.add_argument("--only", choices=["throughput", "rss", "quality"], default=None)
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--q-epochs", type=int, default=10)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.rss_child:
        return rss_child(args.rss_child)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    if args.only in (None, "throughput"):
        throughput(args)
    if args.only in (None, "rss"):
        peak_rss(args)
    if args.only == "quality" or (args.only is None and args.quality):
        quality(args)


if __name__ == "__main__":
    main()
