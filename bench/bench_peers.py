"""SAE trainers side by side (issue 10): actstore's out-of-core trainer against bare in-memory loops and, when it is
installed in its own venv, EleutherAI sparsify, on the same activations with the same budget.

Every trainer sees the same training rows (actstore's split: the held-out samples are left out of all of them),
in the same number of tokens; held-out FVU, L0 and dead latents are computed here, with numpy, from the weights each
tool saved (actstore's ``sae.safetensors``, sparsify's ``sae.safetensors``), not from what the tools report.

Peers run in their own interpreter (``--sparsify-python`` / ``--saelens-python /path/to/venv/bin/python``, a venv
with ``pip install torch==2.13.0 eai-sparsify sae-lens``): this script writes the training rows to a ``.npy`` file,
the peer trains with its own classes and optimizer and saves its weights. sparsify: ``SparseCoder``, ``SignSGD``
under ``ScheduleFreeWrapper``, the steps of its ``Trainer`` (``b_dec`` at the first batch's mean, decoder
renormalised before every forward, the gradient parallel to the decoder rows removed, FVU loss). SAELens:
``TopKTrainingSAE`` trained by its own ``SAETrainer`` with its defaults (Adam 3e-4), saved with
``save_inference_model``.

Usage: python bench/bench_peers.py STORE --model minilm --layer 4 [--k 32 --d-sae 3072 --batch 4096 --threads 2]
       [--sparsify-python /tmp/peers/bin/python] [--saelens-python /tmp/peers/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPARSIFY = r"""
import json, sys, time
import numpy as np, torch
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.sign_sgd import SignSGD
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(args["seed"])
x = np.load(args["rows"], mmap_mode="r")  # (n_train, d_in), float32, shuffled once by the driver
sae = SparseCoder(x.shape[1], SparseCoderConfig(k=args["k"], num_latents=args["d_sae"]))
lr = args.get("lr") or 5e-3 / (sae.num_latents / 2**14) ** 0.5  # sparsify's default for signum
adam = args.get("optimizer") == "adam"
if adam:
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
else:
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]), momentum=0.95)
    opt.train()
t0 = time.perf_counter()
n = 0
for b0 in range(0, x.shape[0] - args["batch"] + 1, args["batch"]):
    xb = torch.from_numpy(np.array(x[b0 : b0 + args["batch"]]))
    if b0 == 0:
        sae.b_dec.data = xb.mean(0)
    sae.set_decoder_norm_to_unit_norm()
    out = sae(xb)
    out.fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()
    n += xb.shape[0]
if not adam:
    opt.eval()
secs = time.perf_counter() - t0
sae.save_to_disk(args["out"])
print(json.dumps({"tokens": n, "seconds": secs}))
"""

SAELENS = r"""
import json, sys, time
import numpy as np, torch
from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
torch.manual_seed(args["seed"])
x = np.load(args["rows"], mmap_mode="r")  # (n_train, d_in), float32, shuffled once by the driver
n = (x.shape[0] // args["batch"]) * args["batch"]
sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=args["k"], d_in=x.shape[1], d_sae=args["d_sae"]))
batches = iter(torch.from_numpy(np.array(x[b0 : b0 + args["batch"]])) for b0 in range(0, n, args["batch"]))
tcfg = SAETrainerConfig(total_training_samples=n, train_batch_size_samples=args["batch"], lr_end=3e-4)  # the runner sets lr_end
trainer = SAETrainer(tcfg, sae, batches)
t0 = time.perf_counter()
trainer.fit()
secs = time.perf_counter() - t0
sae.save_inference_model(args["out"])  # cfg.json + sae_weights.safetensors, decoder norms folded in
print(json.dumps({"tokens": n, "seconds": secs}))
"""


def run_peer(python: str, script: str, spec: dict) -> dict | None:
    """Run a peer's training ``script`` in ``python`` with ``spec`` (its JSON argument); its last stdout line (tokens,
    seconds), or None (the error on stderr) when it failed."""
    out = subprocess.run(
        [python, "-c", script, json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"},
    )
    if out.returncode:
        print(f"peer failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def topk_encode(x: np.ndarray, w_enc: np.ndarray, b_enc: np.ndarray, k: int) -> np.ndarray:
    """Dense ``(n, d_sae)`` TopK activations (ReLU of the k largest pre-activations)."""
    pre = x @ w_enc + b_enc
    idx = np.argpartition(-pre, k - 1, axis=1)[:, :k]
    out = np.zeros_like(pre)
    np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, axis=1), 0), axis=1)
    return out


def metrics(
    x: np.ndarray, acts: np.ndarray, x_hat: np.ndarray, fired: np.ndarray
) -> dict[str, float]:
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    return {"fvu": fvu, "l0": float((acts > 0).sum(1).mean()), "dead": float((~fired).mean())}


def sae_metrics(
    x: np.ndarray, x_train: np.ndarray, run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
) -> dict:
    """FVU and L0 of ``run`` (rows -> (acts, x_hat)) on the held-out ``x``; dead latents over all training rows."""
    acts, x_hat = run(x)
    fired = np.zeros(acts.shape[1], bool)
    for b0 in range(0, len(x_train), 8192):
        fired |= (run(x_train[b0 : b0 + 8192])[0] > 0).any(0)
    return metrics(x, acts, x_hat, fired)


def actstore_weights(store, name: str, x: np.ndarray, x_train: np.ndarray) -> dict[str, float]:
    """FVU / L0 / dead from actstore's saved sae.safetensors and cfg.json (numpy only)."""
    from safetensors.numpy import load

    from actstore.format import layout

    w = load(store.loc.read_bytes(layout.sae_file(name, layout.SAE_WEIGHTS)))
    cfg = json.loads(store.loc.read_bytes(layout.sae_file(name, layout.SAE_CONFIG)))
    s, k = float(cfg["norm_scale"]), int(cfg["k"])

    def run(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if cfg["arch"] == "batchtopk":  # inference: pre-activations above the learned threshold
            pre = (rows * s - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
            acts = np.where(pre > float(w["threshold"]), pre, 0.0)
            return acts, (acts @ w["W_dec"] + w["b_dec"]) / s
        acts = topk_encode(rows * s - w["b_dec"], w["W_enc"], w["b_enc"], k)
        return acts, (acts @ w["W_dec"] + w["b_dec"]) / s

    return sae_metrics(x, x_train, run)


def sparsify_weights(folder: str, x: np.ndarray, x_train: np.ndarray, k: int) -> dict[str, float]:
    from safetensors.numpy import load_file

    w = load_file(str(Path(folder) / "sae.safetensors"))
    w_enc, b_enc, w_dec, b_dec = w["encoder.weight"].T, w["encoder.bias"], w["W_dec"], w["b_dec"]

    def run(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        acts = topk_encode(rows - b_dec, w_enc, b_enc, k)
        return acts, acts @ w_dec + b_dec

    return sae_metrics(x, x_train, run)


def saelens_weights(folder: str, x: np.ndarray, x_train: np.ndarray) -> dict[str, float]:
    """FVU / L0 / dead from SAELens's saved inference weights (``apply_b_dec_to_input``, TopK then ReLU)."""
    from safetensors.numpy import load_file

    w = load_file(str(Path(folder) / "sae_weights.safetensors"))
    cfg = json.loads((Path(folder) / "cfg.json").read_text())
    shift = w["b_dec"] if cfg.get("apply_b_dec_to_input", True) else 0.0
    norms = (
        np.linalg.norm(w["W_dec"], axis=1)
        if cfg.get("rescale_acts_by_decoder_norm")
        else np.ones(len(w["W_dec"]))
    )

    def run(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        acts = topk_encode(rows - shift, w["W_enc"] * norms, w["b_enc"] * norms, int(cfg["k"]))
        return acts, (acts / norms) @ w["W_dec"] + w["b_dec"]

    return sae_metrics(x, x_train, run)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--d-sae", type=int, default=3072)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsify-python", default=None)
    ap.add_argument("--saelens-python", default=None)
    args = ap.parse_args()

    import torch

    import actstore
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae

    torch.set_num_threads(args.threads)
    rows_out: list[dict] = []
    for arch, opt in (("topk", "signum"), ("topk", "adam"), ("batchtopk", "signum")):
        name = f"peers-{arch}-{opt}"
        cfg = TrainConfig(
            model=args.model,
            layer=args.layer,
            arch=arch,
            k=args.k,
            d_sae=args.d_sae,
            batch_size=args.batch,
            epochs=1,
            optimizer=opt,
            name=name,
            overwrite=True,
            device="cpu",
            task_samples=0,
            checkpoint_every=0,
            threads=args.threads,
        )
        t0 = time.perf_counter()
        res = train_sae(args.store, cfg, progress=False)
        secs = time.perf_counter() - t0
        st = actstore.open_store(args.store)
        acts = st.activations(args.model, args.layer)
        eval_x = acts.take(res.split.eval_rows)
        keep = np.ones(len(acts), bool)
        keep[res.split.eval_rows] = False
        train_rows = np.flatnonzero(keep)
        x_train = acts.take(train_rows)
        m = actstore_weights(st, name, eval_x, x_train)
        rows_out.append(
            {
                "trainer": f"actstore train --arch {arch} --optimizer {opt} (out-of-core)",
                "tokens": res.tokens,
                "tok_s": res.tokens / res.seconds,
                "steps_only": res.tokens / (res.seconds - res.eval_seconds),
                "e2e": res.tokens / secs,
                **m,
            }
        )

    # the same recipe as actstore's signum run, in memory: the bare loop the out-of-core trainer is measured against
    from actstore.sae.config import SAEConfig
    from actstore.sae.loss import train_step
    from actstore.sae.metrics import TrainTracker
    from actstore.sae.model import SAE
    from actstore.sae.optim import ScheduleFreeSignSGD

    rng = np.random.default_rng(0)
    shuffled = x_train[rng.permutation(len(x_train))]
    scale = float(np.sqrt(shuffled.shape[1] / (shuffled[:65536] ** 2).sum(1).mean()))
    sae = SAE(
        SAEConfig(arch="topk", d_in=shuffled.shape[1], d_sae=args.d_sae, k=args.k, norm_scale=scale)
    )
    with torch.no_grad():
        sae.b_dec.copy_(torch.from_numpy(shuffled[: args.batch].mean(0) * scale))
    # --init data, as the trainer's default
    sae.init_from_rows(torch.from_numpy(shuffled[-args.d_sae :] * scale))
    opt_ = ScheduleFreeSignSGD(sae.parameters(), lr=5e-3 / (args.d_sae / 2**14) ** 0.5)
    tracker = TrainTracker(args.d_sae, 1_000_000, 0.1)
    bare_cfg = TrainConfig(
        model=args.model, layer=args.layer, arch="topk", k=args.k, d_sae=args.d_sae
    )
    xt = torch.from_numpy(shuffled)
    t0 = time.perf_counter()
    n = 0
    for b0 in range(0, len(xt) - args.batch + 1, args.batch):
        train_step(
            sae,
            opt_,
            xt[b0 : b0 + args.batch],
            tracker,
            bare_cfg,
            min(args.d_sae, shuffled.shape[1] // 2),
        )
        n += args.batch
    bare_s = time.perf_counter() - t0
    rows_out.append(
        {
            "trainer": "bare in-memory loop, the same recipe (signum)",
            "tokens": n,
            "tok_s": n / bare_s,
            "fvu": float("nan"),
            "l0": float("nan"),
            "dead": float("nan"),
        }
    )

    work = Path(tempfile.mkdtemp(prefix="peers-"))
    np.save(work / "rows.npy", shuffled)
    peers = [
        (
            "sparsify",
            args.sparsify_python,
            SPARSIFY,
            "EleutherAI sparsify (SignSGD + Schedule-Free, its defaults)",
        ),
        (
            "saelens",
            args.saelens_python,
            SAELENS,
            "SAELens (TopKTrainingSAE + SAETrainer, its defaults)",
        ),
    ]
    for key, python, script, label in peers:
        if not python:
            continue
        spec = {
            "rows": str(work / "rows.npy"),
            "k": args.k,
            "d_sae": args.d_sae,
            "batch": args.batch,
            "threads": args.threads,
            "seed": 0,
            "out": str(work / key),
        }
        info = run_peer(python, script, spec)
        if info is None:
            continue
        if key == "sparsify":
            m = sparsify_weights(str(work / key), eval_x, x_train, args.k)
        else:
            m = saelens_weights(str(work / key), eval_x, x_train)
        rows_out.append(
            {
                "trainer": label,
                "tokens": info["tokens"],
                "tok_s": info["tokens"] / info["seconds"],
                **m,
            }
        )

    base = next(r for r in rows_out if r["trainer"].startswith("bare"))["tok_s"]
    print(
        f"\n{args.model} layer {args.layer}: TopK k {args.k}, d_sae {args.d_sae}, batch {args.batch}, "
        f"{len(x_train):,} training rows (one epoch), {len(eval_x):,} held-out rows, {args.threads} threads"
    )
    print(
        "tokens/s: the training loop (streaming, shuffling, steps and the held-out curve points; actstore's own clock); "
        "steps only: the same without the held-out evaluations; end to end adds opening the store, the input "
        "statistics, the held-out rows and saving"
    )
    print(
        "| trainer | tokens | tokens/s | vs bare loop | steps only | end to end | held-out FVU | L0 | dead |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        e2e = f"{r['e2e']:,.0f} ({r['e2e'] / base:.2f}x)" if "e2e" in r else ""
        steps = (
            f"{r['steps_only']:,.0f} ({r['steps_only'] / base:.2f}x)" if "steps_only" in r else ""
        )
        print(
            f"| {r['trainer']} | {r['tokens']:,} | {r['tok_s']:,.0f} | {r['tok_s'] / base:.2f}x | {steps} | {e2e} | "
            f"{r['fvu']:.3f} | {r['l0']:.1f} | {r['dead']:.1%} |"
        )


if __name__ == "__main__":
    main()
