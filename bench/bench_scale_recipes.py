"""Benchmark: the SAE recipes across scales. Each candidate recipe of an architecture trained on the same rows at
several token budgets (one pass over the stream for all candidates of a budget: ``train_together``), and for each:
held-out FVU, the fraction of latents that never fire on a full pass over the store, and tokens/s.

The store is a real one (``--store``, e.g. MiniLM layer 6 over IMDb, made by ``actstore extract``); budgets are
``--tokens`` (comma-separated; a budget above the store's rows runs more than one epoch).

    .venv/bin/python bench/bench_scale_recipes.py --store imdb2m.zarr --model minilm --layer 6 \\
        --tokens 200000,2000000 --arch topk --d-sae 3072 --k 32
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

CANDIDATES = {
    "signum (default lr)": {"optimizer": "signum"},
    "signum lr/4": {"optimizer": "signum", "lr_scale": 0.25},
    "adam 5e-4": {"optimizer": "adam", "lr": 5e-4},
    "adam 1e-3": {"optimizer": "adam", "lr": 1e-3},
    "adam 5e-4, no AuxK": {"optimizer": "adam", "lr": 5e-4, "aux_coef": 0.0},
}
"""Recipe name -> TrainConfig changes (``lr_scale`` multiplies the optimizer's default learning rate)."""


def never_fired(sae, acts, block: int = 65536) -> float:
    """The fraction of ``sae``'s latents that fire on no row of ``acts`` (a full pass)."""
    import torch

    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    with torch.no_grad():
        for a in range(0, len(acts), block):
            x = torch.from_numpy(acts[a : a + block])  # (b, d_in)
            fires += sae.reconstruct(x).fired.double().cpu()
    return float((fires == 0).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--tokens", default="200000,2000000")
    ap.add_argument("--arch", default="topk")
    ap.add_argument("--d-sae", type=int, default=3072)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="Comma-separated candidate names (default: all).")
    args = ap.parse_args()

    import actstore
    from actstore.sae.config import TrainConfig
    from actstore.sae.group import parallel_steps, train_together

    picks = {k: v for k, v in CANDIDATES.items() if args.only is None or k in args.only.split(",")}
    src = actstore.open_store(args.store)
    acts = src.activations(args.model, args.layer)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s) per run, "
          f"{parallel_steps(args.threads, len(picks))} runs stepping at once; store {args.store}: {args.model} layer "
          f"{args.layer}, {len(acts):,} rows x {acts.d_model}; {args.arch} d_sae {args.d_sae} k {args.k}, batch "
          f"{args.batch_size}; {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print("| tokens | recipe | held-out FVU | never fire (held-out) | never fire (full pass) | tok/s (per run, together) |")
    print("|---|---|---|---|---|---|")
    for budget in [int(t) for t in args.tokens.split(",")]:
        tmp = Path(tempfile.mkdtemp(prefix="actstore-scale-"))
        try:
            work = tmp / "s.zarr"
            shutil.copytree(args.store, work, ignore=shutil.ignore_patterns("saes", "features", "locks"))
            base = TrainConfig(model=args.model, layer=args.layer, arch=args.arch, d_sae=args.d_sae, k=args.k,
                               tokens=budget, batch_size=args.batch_size, device="cpu", threads=args.threads,
                               task_samples=0)  # fmt: skip
            cfgs = []
            for change in picks.values():
                c = {k: v for k, v in change.items() if k != "lr_scale"}
                cfg = dataclasses.replace(base, name=f"r{len(cfgs)}", **c)
                if "lr_scale" in change:
                    cfg = dataclasses.replace(cfg, lr=cfg.learning_rate(args.d_sae) * change["lr_scale"])
                cfgs.append(cfg)
            t0 = time.perf_counter()
            results = train_together(str(work), cfgs, progress=False)
            secs = time.perf_counter() - t0
            st = actstore.open_store(str(work))
            rows = st.activations(args.model, args.layer)
            for name, res in zip(picks, results, strict=True):
                ev = res.metrics["eval"]
                full = never_fired(res.sae.cpu().eval(), rows)
                print(f"| {res.tokens:,} | {name} | {ev['fvu']:.4f} | {ev['dead_fraction']:.3f} | {full:.3f} | "
                      f"{res.tokens / secs:,.0f} |", flush=True)  # fmt: skip
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
