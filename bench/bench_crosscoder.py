"""Crosscoder training speed and memory (issue 15).

1. **vs an SAE**: ``train-crosscoder`` on two models' activations of the same tokens against ``train`` of an SAE of
   the same width and recipe on one model's (goal >= 0.5x: it reads, and reconstructs, two models per token).
2. **vs in memory**: the same crosscoder's steps (actstore's own ``train_step``, same batches of the same rows,
   same optimizer) on a tensor already in RAM: the cost of streaming (goal >= 0.9x).
3. **memory**: peak RSS of ``train-crosscoder`` on planted crosscoder stores of growing size (a fresh process
   each): flat as the store grows, since rows stream through a bounded shuffle buffer.

Usage: python bench/bench_crosscoder.py STORE --models minilm,minilm-imdb --layer 3 [--k 32 --d-sae 1536
       --batch 4096 --threads 2 --tokens 300000 --rss-rows 100000,400000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RSS = """
import json, sys
import torch
from actstore.sae.config import TrainConfig
from actstore.sae.train import train_sae
torch.set_num_threads(int(sys.argv[2]))
def peak_rss_mb():  # VmHWM: this process's own high-water mark
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
res = train_sae(sys.argv[1], TrainConfig(model="a", layer=0, models="a,b", arch="batchtopk", k=32, d_sae=1536,
                batch_size=4096, epochs=1, buffer_mb=64, device="cpu", task_samples=0, eval_points=0), progress=False)
print(json.dumps({"tokens": res.tokens, "seconds": res.seconds, "peak_rss_mb": peak_rss_mb()}))
"""


def train(store: str, name: str, **kw):
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae

    cfg = TrainConfig(name=name, overwrite=True, device="cpu", task_samples=0, eval_points=0, **kw)
    return train_sae(store, cfg, progress=False)


def in_memory(store: str, res, batch: int, steps: int) -> float:
    """Seconds for ``steps`` of the same crosscoder's training step on its training rows held in RAM."""
    import numpy as np
    import torch

    import actstore
    from actstore.sae.config import TrainConfig
    from actstore.sae.loss import train_step
    from actstore.sae.metrics import TrainTracker
    from actstore.sae.model import SAE, check_fits
    from actstore.sae.optim import make_optimizer

    st = res.split
    cfg = res.sae.cfg
    acts = check_fits(actstore.open_store(store), cfg, res.name)
    rows = np.flatnonzero(st.train_mask)
    x = torch.from_numpy(acts.take(rows))  # (n_train, n_sources * d_in) in RAM
    sae = SAE(cfg)
    tcfg = TrainConfig(**cfg.training)
    opt = make_optimizer(str(tcfg.optimizer), sae.parameters(), tcfg.learning_rate(cfg.d_sae))
    tracker = TrainTracker(cfg.d_sae, tcfg.dead_window)
    aux_k = tcfg.resolve(cfg.d_in).aux_k
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for i in range(steps):
        j = (i * batch) % max(1, len(x) - batch)
        train_step(sae, opt, x[perm[j : j + batch]], tracker, tcfg, aux_k)
    return time.perf_counter() - t0


def rss_runs(sizes: list[int], threads: int) -> list[dict]:
    from actstore.testing.synthetic import planted_crosscoder, write_crosscoder_store

    out = []
    pc = planted_crosscoder(
        d=384, n_shared=256, n_a_only=64, n_b_only=64, n_weak_a=64, k_active=16, seed=0
    )
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/cc.zarr"
            write_crosscoder_store(path, pc, n, chunk_rows=4096, sample_len=128)
            store_mb = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
            p = subprocess.run(
                [sys.executable, "-c", RSS, path, str(threads)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": str(threads)},
            )
            r = json.loads(p.stdout.strip().splitlines()[-1])
            out.append(
                {
                    "rows": n,
                    "store_mb": round(store_mb),
                    "raw_fp32_mb": round(n * 2 * 384 * 4 / 2**20),
                    **r,
                }
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--models", required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--d-sae", type=int, default=1536)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--tokens", type=int, default=None, help="training tokens per run (default: one epoch)"
    )
    ap.add_argument("--rss-rows", default="100000,400000")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    common = dict(
        arch="batchtopk",
        k=a.k,
        d_sae=a.d_sae,
        batch_size=a.batch,
        layer=a.layer,
        threads=a.threads,
        **({"tokens": a.tokens} if a.tokens else {"epochs": 1}),
    )
    first = a.models.split(",")[0]
    rows = []
    for _ in range(2):  # alternating rounds, the better of two each
        cc = train(a.store, "bench-cc", model=first, models=a.models, **common)
        sae = train(a.store, "bench-sae", model=first, **common)
        mem = in_memory(a.store, cc, a.batch, cc.steps)
        rows.append(
            {
                "cc": cc.tokens / cc.seconds,
                "sae": sae.tokens / sae.seconds,
                "mem": cc.steps * a.batch / mem,
                "cc_fvu": cc.metrics["eval"]["fvu"],
                "sae_fvu": sae.metrics["eval"]["fvu"],
                "cc_sources": cc.metrics["eval"].get("sources"),
            }
        )
    best = {k: max(r[k] for r in rows) for k in ("cc", "sae", "mem")}
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {a.threads}; "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(
        f"store {a.store}: {a.models} layer {a.layer}, batchtopk k {a.k}, d_sae {a.d_sae}, batch {a.batch}, "
        f"{cc.tokens} tokens"
    )
    print("| run | tokens/s | vs |")
    print("|---|---|---|")
    print(f"| SAE, one model ({first}) | {best['sae']:,.0f} | 1.00x |")
    print(
        f"| crosscoder, out-of-core ({a.models}) | {best['cc']:,.0f} | {best['cc'] / best['sae']:.2f}x the SAE |"
    )
    print(
        f"| the same crosscoder's steps in memory | {best['mem']:,.0f} | out-of-core = {best['cc'] / best['mem']:.2f}x |"
    )
    print(
        f"held-out FVU: crosscoder {rows[-1]['cc_fvu']:.4f} ({rows[-1]['cc_sources']}), SAE {rows[-1]['sae_fvu']:.4f}"
    )
    sizes = [int(v) for v in a.rss_rows.split(",") if v]
    if sizes:
        print("\n| planted store rows | store MiB | raw fp32 MiB | peak RSS MiB | tokens/s |")
        print("|---|---|---|---|---|")
        for r in rss_runs(sizes, a.threads):
            print(
                f"| {r['rows']:,} | {r['store_mb']} | {r['raw_fp32_mb']} | {r['peak_rss_mb']:.0f} | "
                f"{r['tokens'] / r['seconds']:,.0f} |"
            )


if __name__ == "__main__":
    main()
