"""The relu-l1 FVU-L0 frontier (issue 10): actstore's relu-l1 (Adam on the unit-norm gradient, b_dec from zeros,
decoder-norm-weighted L1 with a 5% warm-up) at a
few L1 coefficients against SAELens's standard SAE (its ``StandardTrainingSAE`` and ``SAETrainer``: the same
decoder-norm-weighted L1, its L1 warm-up, Adam 3e-4) at the same coefficients mapped to its loss's scale, plus the
paper preset (lambda 1e-3, Adam 2e-5, no warm-up) at the same token budget.

Every trainer sees the same training rows for ``--epochs`` passes (default 1); held-out FVU, L0 and dead latents
are computed with numpy from the weights each tool saved. The coefficients map between the tools exactly:
actstore's loss is the per-element MSE on inputs scaled by ``s`` (mean squared norm ``d_in``) plus
``lambda * sum_i h_i ||W_dec_i||``; SAELens's is the per-token squared error on raw inputs plus
``lambda_SL * sum_i h_i ||W_dec_i||``; multiplied by ``d_in / s^2`` the first is the second with
``lambda_SL = lambda * d_in / s``.

Usage: python bench/bench_frontier.py STORE --model minilm --layer 4 [--d-sae 3072 --batch 4096 --threads 1]
       [--l1 1e-3,3e-3,1e-2,3e-2,1e-1] [--epochs 1] [--saelens-python /tmp/peers/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_peers import sae_metrics  # noqa: E402

SAELENS_STANDARD = r"""
import json, sys, time
import numpy as np, torch
from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
x = torch.from_numpy(np.load(args["rows"]))  # (n_train, d_in), float32, shuffled once by the driver
n = (x.shape[0] // args["batch"]) * args["batch"]
for lam in args["l1"]:
    torch.manual_seed(args["seed"])
    steps = n // args["batch"] * args["epochs"]
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=x.shape[1], d_sae=args["d_sae"], l1_coefficient=lam,
                                                        l1_warm_up_steps=max(1, steps // 20)))
    batches = iter(x[b0 : b0 + args["batch"]] for _ in range(args["epochs"]) for b0 in range(0, n, args["batch"]))
    tcfg = SAETrainerConfig(total_training_samples=n * args["epochs"], train_batch_size_samples=args["batch"],
                            lr=args["lr"], lr_end=args["lr"])
    t0 = time.perf_counter()
    SAETrainer(tcfg, sae, batches).fit()
    secs = time.perf_counter() - t0
    sae.save_inference_model(f"{args['out']}/{lam:g}")
    print(json.dumps({"l1": lam, "tokens": n * args["epochs"], "seconds": secs}), flush=True)
"""


def actstore_relu(store, name: str, x: np.ndarray, x_train: np.ndarray) -> dict[str, float]:
    from safetensors.numpy import load

    from actstore.format import layout

    w = load(store.loc.read_bytes(layout.sae_file(name, layout.SAE_WEIGHTS)))
    s = float(
        json.loads(store.loc.read_bytes(layout.sae_file(name, layout.SAE_CONFIG)))["norm_scale"]
    )

    def enc(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        acts = np.maximum((rows * s - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
        return acts, (acts @ w["W_dec"] + w["b_dec"]) / s

    return sae_metrics(x, x_train, enc)


def saelens_relu(folder: Path, x: np.ndarray, x_train: np.ndarray) -> dict[str, float]:
    from safetensors.numpy import load_file

    w = load_file(str(folder / "sae_weights.safetensors"))
    cfg = json.loads((folder / "cfg.json").read_text())
    shift = w["b_dec"] if cfg.get("apply_b_dec_to_input", True) else 0.0

    def enc(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        acts = np.maximum((rows - shift) @ w["W_enc"] + w["b_enc"], 0)
        return acts, acts @ w["W_dec"] + w["b_dec"]

    return sae_metrics(x, x_train, enc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--d-sae", type=int, default=3072)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--l1", default="1e-3,3e-3,1e-2,3e-2,1e-1")
    ap.add_argument("--saelens-python", default=None)
    ap.add_argument(
        "--epochs", type=int, default=1, help="passes over the training rows, for every trainer"
    )
    ap.add_argument("--skip-paper", action="store_true", help="leave out the paper preset's run")
    ap.add_argument(
        "--saelens-lr",
        type=float,
        default=3e-4,
        help="SAELens's Adam learning rate (its default 3e-4)",
    )
    args = ap.parse_args()

    import torch

    import actstore
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae

    torch.set_num_threads(args.threads)
    lams = [float(v) for v in args.l1.split(",")]
    rows: list[dict] = []
    common = dict(
        model=args.model,
        layer=args.layer,
        arch="relu-l1",
        d_sae=args.d_sae,
        batch_size=args.batch,
        epochs=args.epochs,
        overwrite=True,
        device="cpu",
        task_samples=0,
        checkpoint_every=0,
        threads=args.threads,
    )
    runs = [
        (
            f"actstore relu-l1, lambda {lam:g}",
            TrainConfig(l1=lam, name=f"frontier-{lam:g}", **common),
        )
        for lam in lams
    ]
    runs = [
        (
            f"{label}, Adam {cfg.lr:g}{', unit gradient' if cfg.unit_grad else ''}, b_dec {cfg.b_dec_init}",
            cfg,
        )
        for label, cfg in runs
    ]
    if not args.skip_paper:
        runs.append(
            (
                "actstore --preset paper (lambda 1e-3, Adam 2e-5, no warm-up), same tokens",
                TrainConfig(
                    preset="paper", name="frontier-paper", **{**common, "d_sae": args.d_sae}
                ),
            )
        )
    split = scale = None
    for label, cfg in runs:
        t0 = time.perf_counter()
        res = train_sae(args.store, cfg, progress=False)
        secs = time.perf_counter() - t0
        st = actstore.open_store(args.store)
        if split is None:
            split, acts = res.split, st.activations(args.model, args.layer)
            eval_x = acts.take(split.eval_rows)
            keep = np.ones(len(acts), bool)
            keep[split.eval_rows] = False
            x_train = acts.take(np.flatnonzero(keep))
            scale = res.sae.cfg.norm_scale
        rows.append(
            {
                "trainer": label,
                "l1": cfg.l1,
                "tok_s": res.tokens / secs,
                **actstore_relu(st, str(cfg.name), eval_x, x_train),
            }
        )

    if args.saelens_python:
        work = Path(tempfile.mkdtemp(prefix="frontier-"))
        rng = np.random.default_rng(0)
        np.save(work / "rows.npy", x_train[rng.permutation(len(x_train))])
        d_in = x_train.shape[1]
        sl_lams = [lam * d_in / scale for lam in lams]
        spec = {
            "rows": str(work / "rows.npy"),
            "d_sae": args.d_sae,
            "batch": args.batch,
            "threads": args.threads,
            "seed": 0,
            "out": str(work / "saelens"),
            "l1": sl_lams,
            "epochs": args.epochs,
            "lr": args.saelens_lr,
        }
        out = subprocess.run(
            [args.saelens_python, "-c", SAELENS_STANDARD, json.dumps(spec)],
            capture_output=True,
            text=True,
            env={**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"},
        )
        if out.returncode:
            print(f"saelens failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        for line, lam in zip(
            [ln for ln in out.stdout.splitlines() if ln.startswith("{")], lams, strict=False
        ):
            info = json.loads(line)
            m = saelens_relu(work / "saelens" / f"{info['l1']:g}", eval_x, x_train)
            label = f"SAELens standard, Adam {args.saelens_lr:g}, lambda_SL {info['l1']:.3g} (= {lam:g} here)"
            rows.append(
                {"trainer": label, "l1": lam, "tok_s": info["tokens"] / info["seconds"], **m}
            )

    print(
        f"\n{args.model} layer {args.layer}: relu-l1, d_sae {args.d_sae}, batch {args.batch}, {len(x_train):,} "
        f"training rows ({args.epochs} epochs), {len(eval_x):,} held-out rows, {args.threads} threads, "
        f"input scale s {scale:.4f}"
    )
    print(
        "| trainer | tokens/s | held-out FVU | L0 | L0 / d_sae | dead |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['trainer']} | {r['tok_s']:,.0f} | {r['fvu']:.3f} | {r['l0']:.1f} | {r['l0'] / args.d_sae:.1%} | "
            f"{r['dead']:.1%} |"
        )


if __name__ == "__main__":
    main()
