"""Benchmark: the SAE recipes across scales. Each candidate recipe of an architecture trained on the same rows at
several token budgets (one pass over the stream for all candidates of a budget: ``train_together``), and beside
them, with ``--peers``, EleutherAI sparsify and SAELens on the same training rows and budget (sparsify also at
actstore's default optimizer and learning rate). For each: held-out FVU and L0 (on actstore's held-out rows, from
the saved weights), the fraction of latents that never fire on a full pass over the store, and the optimizer's
step rate alone (tokens/s of 40 steps on one batch, one thread: the recipes' costs, apart from the shared read).

The store is a real one (``--store``, e.g. MiniLM layer 6 over IMDb, made by ``actstore extract``) or, with
``--synthetic ROWS``, a planted one made here: 4,096 unit atoms in d 384, Zipf(0.7) firing frequencies, 32 active
per row on average, noise 0.05 (a long tail of rare features, as in real activations). Budgets are ``--tokens``
(comma-separated; a budget above the store's training rows runs more than one epoch).

    .venv/bin/python bench/bench_scale_recipes.py --store imdb2m.zarr --model minilm --layer 6 \\
        --tokens 200000,2000000 --arch topk --d-sae 3072 --k 32 --peers sparsify,saelens,sparsify-default
    .venv/bin/python bench/bench_scale_recipes.py --synthetic 10500000 --tokens 200000,2000000,10000000 --peers sparsify
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import SAELENS, SPARSIFY, run_peer, saelens_weights, sparsify_weights  # noqa: E402

CANDIDATES = {
    "default": {},
    "signum (sparsify's lr)": {
        "optimizer": "signum",
        "lr_scale": 1.0,
        "lr_warmup": 0.0,
        "lr_decay": 0.0,
    },
    "signum lr/4": {"optimizer": "signum", "lr_scale": 0.25, "lr_warmup": 0.0, "lr_decay": 0.0},
    "adam 5e-4": {"optimizer": "adam", "lr": 5e-4, "lr_warmup": 0.0, "lr_decay": 0.0},
    "adam 1e-3": {"optimizer": "adam", "lr": 1e-3, "lr_warmup": 0.0, "lr_decay": 0.0},
    "adam 5e-4, no AuxK": {
        "optimizer": "adam",
        "lr": 5e-4,
        "aux_coef": 0.0,
        "lr_warmup": 0.0,
        "lr_decay": 0.0,
    },
    "adam 5e-4 decay": {"optimizer": "adam", "lr": 5e-4, "lr_decay": 0.2},
    "adam 1e-3 decay": {"optimizer": "adam", "lr": 1e-3, "lr_decay": 0.2},
    "adam 2e-3 decay": {"optimizer": "adam", "lr": 2e-3, "lr_decay": 0.2},
    "adam 1e-3 warm-up+decay": {
        "optimizer": "adam",
        "lr": 1e-3,
        "lr_warmup": 0.05,
        "lr_decay": 0.2,
    },
    "budget lr, warm-up+decay": {"optimizer": "adam", "lr_warmup": 0.05, "lr_decay": 0.2},
    "default, resample 4": {"resample": 4},
}
"""Recipe name -> TrainConfig changes (``lr_scale`` multiplies the optimizer's default learning rate; "default" is
what ``actstore train --arch ARCH`` does with no recipe options)."""


def never_fired(sae: Any, acts: Any, block: int = 65536) -> float:
    """The fraction of ``sae``'s latents that fire on no row of ``acts`` (a full pass)."""
    import torch

    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    with torch.no_grad():
        for a in range(0, len(acts), block):
            x = torch.from_numpy(acts[a : a + block])  # (b, d_in)
            fires += sae.reconstruct(x).fired.double().cpu()
    return float((fires == 0).double().mean())


def step_rate(cfg: Any, x: np.ndarray, steps: int = 40) -> float:
    """Tokens/s of ``steps`` optimizer steps of ``cfg``'s recipe on the rows ``x (batch, d_in)``, one thread."""
    import torch

    from actstore.sae.config import SAEConfig
    from actstore.sae.loss import train_step
    from actstore.sae.metrics import TrainTracker
    from actstore.sae.model import SAE
    from actstore.sae.optim import make_optimizer

    r = cfg.resolve(x.shape[1])
    d_sae, k, aux_k = r.d_sae, r.k, r.aux_k
    sae = SAE(SAEConfig(arch=str(cfg.arch), d_in=x.shape[1], d_sae=d_sae, k=k, norm_scale=1.0))
    sae.init_from_rows(
        torch.from_numpy(x[:d_sae] if len(x) >= d_sae else np.resize(x, (d_sae, x.shape[1])))
    )
    opt = make_optimizer(str(cfg.optimizer), sae.parameters(), cfg.learning_rate(d_sae))
    tracker = TrainTracker(d_sae, cfg.dead_window, 0.1)
    xt = torch.from_numpy(x)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_step(sae, opt, xt, tracker, cfg, aux_k)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(sae, opt, xt, tracker, cfg, aux_k)
        return steps * len(x) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)


def synthetic_store(path: Path, n_rows: int, d: int) -> None:
    from actstore.testing.synthetic import planted_dictionary, write_synthetic_store

    pd = planted_dictionary(d, 4096, 32, seed=7, zipf=0.7, noise=0.05)
    write_synthetic_store(
        str(path), pd.rows(n_rows), n_rows, d, model="synth", layer=0, sample_len=128
    )


def peer_rows(acts: Any, eval_rows: np.ndarray, budget: int, path: Path, seed: int = 0) -> None:
    """``budget`` training rows (every row but the held-out ones) in a shuffled order, written as ``.npy`` for the peers:
    in memory when they fit in 4 GiB, else in store order (a synthetic store's rows are independent draws already)."""
    keep = np.ones(len(acts), bool)
    keep[eval_rows] = False
    train = np.flatnonzero(keep)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(budget, acts.d_model))
    rng = np.random.default_rng(seed)
    if len(train) * acts.d_model * 4 <= 4 << 30:
        x = acts.take(train)  # (n_train, d_in)
        done = 0
        while done < budget:
            m = min(budget - done, len(x))
            out[done : done + m] = x[rng.permutation(len(x))[:m]]
            done += m
    else:
        for a in range(0, budget, 1 << 16):
            idx = train[np.arange(a, min(budget, a + (1 << 16))) % len(train)]
            out[a : a + len(idx)] = acts.take(idx)
    out.flush()
    del out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--store", default=None)
    ap.add_argument(
        "--synthetic",
        type=int,
        default=None,
        help="Rows of a planted store made here (instead of --store).",
    )
    ap.add_argument("--model", default="synth")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--tokens", default="200000,2000000")
    ap.add_argument("--arch", default="topk")
    ap.add_argument("--d-sae", type=int, default=3072)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="Candidate names separated by ';' (default: all).")
    ap.add_argument(
        "--peers",
        default="",
        help="Peers also trained on the same rows (topk), comma-separated: "
        "sparsify, saelens, sparsify-default (sparsify's loop at actstore's default optimizer and lr).",
    )
    ap.add_argument(
        "--synthetic-d", type=int, default=384, help="Width of the --synthetic store's rows."
    )
    ap.add_argument(
        "--full-pass-rows",
        type=int,
        default=2_100_000,
        help="Rows the never-firing count reads (the whole store when smaller; a synthetic store's rows are "
        "independent draws, so its first rows are a fair sample).",
    )
    args = ap.parse_args()

    import actstore
    from actstore.sae.config import TrainConfig
    from actstore.sae.group import parallel_steps, train_together

    picks = {k: v for k, v in CANDIDATES.items() if args.only is None or k in args.only.split(";")}
    scratch = Path(tempfile.mkdtemp(prefix="actstore-scale-"))
    try:
        if args.synthetic:
            t0 = time.perf_counter()
            args.store = str(scratch / "synthetic.zarr")
            synthetic_store(Path(args.store), args.synthetic, args.synthetic_d)
            print(f"synthetic store: {args.synthetic:,} rows in {time.perf_counter() - t0:.0f} s")
        src = actstore.open_store(args.store)
        acts = src.activations(args.model, args.layer)
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch thread(s) per run, "
            f"{parallel_steps(args.threads, len(picks))} runs stepping at once; store {args.store}: {args.model} layer "
            f"{args.layer}, {len(acts):,} rows x {acts.d_model}; {args.arch} d_sae {args.d_sae} k {args.k}, batch "
            f"{args.batch_size}; {time.strftime('%Y-%m-%d')}"
        )
        budgets = [int(t) for t in args.tokens.split(",")]
        base = TrainConfig(
            model=args.model,
            layer=args.layer,
            arch=args.arch,
            d_sae=args.d_sae,
            k=args.k,
            tokens=budgets[0],
            batch_size=args.batch_size,
            device="cpu",
            threads=args.threads,
            task_samples=0,
        )
        batch = acts[: args.batch_size]
        cfgs = {name: candidate(base, change, args.d_sae) for name, change in picks.items()}
        rates = {name: step_rate(cfg, batch) for name, cfg in cfgs.items()}
        print(
            "| tokens | recipe | held-out FVU | L0 | never fire (held-out) | never fire (full pass) | step tok/s (1 thread) |"
        )
        print("|---|---|---|---|---|---|---|")
        for budget in budgets:
            one_budget(args, budget, cfgs, rates, scratch, train_together)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def candidate(base: Any, change: dict[str, Any], d_sae: int) -> Any:
    c = {k: v for k, v in change.items() if k != "lr_scale"}
    cfg = dataclasses.replace(base, **c)
    if "lr_scale" in change:
        cfg = dataclasses.replace(cfg, lr=cfg.learning_rate(d_sae) * change["lr_scale"])
    return cfg


def one_budget(
    args: Any,
    budget: int,
    cfgs: dict[str, Any],
    rates: dict[str, float],
    scratch: Path,
    train_together: Any,
) -> None:
    import actstore

    work = scratch / "s.zarr"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(
        args.store,
        work,
        ignore=shutil.ignore_patterns("saes", "features", "locks"),
        copy_function=os.link,
    )
    runs = [
        dataclasses.replace(cfg, name=f"r{i}", tokens=budget) for i, cfg in enumerate(cfgs.values())
    ]
    results = train_together(str(work), runs, progress=False)
    st = actstore.open_store(str(work))
    rows = st.activations(args.model, args.layer)
    eval_rows = results[0].split.eval_rows
    eval_x = rows.take(eval_rows)  # (n_eval, d_in)
    counted = rows if len(rows) <= args.full_pass_rows else rows[: args.full_pass_rows]  # (n, d_in)
    for name, res in zip(cfgs, results, strict=True):
        ev = res.metrics["eval"]
        full = never_fired(res.sae.cpu().eval(), counted)
        print(
            f"| {res.tokens:,} | {name} | {ev['fvu']:.4f} | {ev['l0']:.1f} | {ev['dead_fraction']:.3f} | {full:.3f} | "
            f"{rates[name]:,.0f} |",
            flush=True,
        )
    wanted = [p for p in args.peers.split(",") if p]
    if not wanted or args.arch != "topk":
        return
    npy = scratch / "rows.npy"
    peer_rows(rows, eval_rows, budget, npy)
    default = runs[list(cfgs).index("default")] if "default" in cfgs else runs[0]
    lr = default.learning_rate(args.d_sae, budget)
    spec = {
        "rows": str(npy),
        "k": args.k,
        "d_sae": args.d_sae,
        "batch": args.batch_size,
        "threads": 2,
        "seed": 0,
    }
    peers = {
        "sparsify": ("sparsify (its defaults)", SPARSIFY, {}),
        "saelens": ("SAELens (its defaults)", SAELENS, {}),
        "sparsify-default": (
            f"sparsify's loop at actstore's default ({default.optimizer} {lr:.2g}, constant)",
            SPARSIFY,
            {"optimizer": default.optimizer, "lr": lr},
        ),
    }
    for label, script, extra in (peers[p] for p in wanted):
        out = scratch / "peer"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        info = run_peer(sys.executable, script, {**spec, **extra, "out": str(out)})
        if info is None:
            continue
        secs = time.perf_counter() - t0
        if script is SPARSIFY:
            m = sparsify_weights(str(out), eval_x, counted, args.k)
        else:
            m = saelens_weights(str(out), eval_x, counted)
        print(
            f"| {info['tokens']:,} | {label} | {m['fvu']:.4f} | {m['l0']:.1f} | – | {m['dead']:.3f} | "
            f"{info['tokens'] / info['seconds']:,.0f} (2 threads, in memory; {secs:.0f} s) |",
            flush=True,
        )
    npy.unlink()


if __name__ == "__main__":
    main()
