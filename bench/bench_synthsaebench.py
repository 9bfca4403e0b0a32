"""SynthSAEBench side by side: actstore's trainers and SAELens's on the same rows, scored by the same code.

SAELens's SynthSAEBench-16k model is rebuilt locally from its published config and seed
(``actstore.testing.synthbench``; cached in ``--model-dir``: building it orthogonalises 16,384 directions, ~40 min
on 2 cores). ``--rows`` of its activations are written to a store; each actstore architecture trains on that store
with ``actstore train`` (``train_sae``), and SAELens's ``SAETrainer`` trains its own BatchTopK and Matryoshka
BatchTopK on the very same rows, in the same order, at the same batch size and learning rate (SynthSAEBench's:
batch 1024, lr 3e-4, constant). Each SAE is scored by ``actstore.analysis.groundtruth`` (equal to SAELens's own
``eval_sae_on_synthetic_data``: ``tests/test_groundtruth.py``) on ``--eval-rows`` fresh rows with their true codes,
two ways: as SynthSAEBench scores (``scoring: batchtopk``: SAELens evaluates the training SAE, so each batch of 1024
keeps its k x 1024 largest activations, L0 exactly k) and as the SAE encodes at inference (``scoring: threshold``:
pre-activations above the calibrated threshold, what ``actstore encode`` and SAELens's saved JumpReLU do).

    python bench/bench_synthsaebench.py --out /tmp/ssb --rows 2000000 [--d-sae 4096 --k 25] [--small]

SynthSAEBench's published figures train on 200M rows on a GPU; 2 cores reach 10-20M samples (500k rows, 20-40
passes), so the figures here compare trainers at equal rows, not against the published table. On a GPU,
``--device cuda`` builds the model, draws the rows and trains every SAE there (scoring stays on the CPU), e.g. the
published budget as 10M stored rows (31 GB fp32) over 20 passes: ``--device cuda --rows 10000000 --epochs 20``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

MATRYOSHKA_INNER = [128, 512, 2048]
"""SynthSAEBench's Matryoshka prefixes (experiments/sweeps/common.py), below d_sae."""


def store_rows(path: str, batch: int, epochs: int = 1) -> Iterator[torch.Tensor]:
    """The store's rows in order, ``(batch, d)`` at a time, ``epochs`` times (what SAELens's trainer is fed; the
    rows are independent draws, so their order does not matter)."""
    from actstore.store.reader import open_store

    arr = open_store(path).activations("synth", 0)
    n = len(arr)
    step = max(batch, arr.chunk_rows)
    for _ in range(epochs):
        pending: list[np.ndarray] = []
        have = 0
        for start in range(0, n, step):
            pending.append(np.asarray(arr[start : min(n, start + step)], dtype=np.float32))
            have += len(pending[-1])
            while have >= batch:
                block = np.concatenate(pending)
                yield torch.from_numpy(block[:batch].copy())
                pending, have = [block[batch:]], len(block) - batch


def cached_truth(model, n: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` fresh rows with their true codes, drawn once (generating them costs more than scoring them), in
    batches of ``batch``: ``(x (batch, d), codes (batch, n_true) sparse)``."""
    from actstore.testing.synthbench import truth_batches

    return [(b.x.cpu(), b.codes.cpu().to_sparse()) for b in truth_batches(model, n, batch, seed)]


def replay(cache: list[tuple[torch.Tensor, torch.Tensor]]):
    """The cached rows as ``TruthBatch``es (codes dense again, one batch at a time)."""
    from actstore.analysis.groundtruth import TruthBatch

    for x, codes in cache:
        yield TruthBatch(x, codes.to_dense())


def saelens_threshold_encoder(sae):
    """A SAELens BatchTopK/Matryoshka training SAE as it encodes once saved for inference: a JumpReLU at its
    ``topk_threshold`` over the (decoder-norm rescaled) pre-activations."""
    from actstore.analysis.groundtruth import Encoded

    def encode(x: torch.Tensor) -> Encoded:
        _, pre = sae.encode_with_hidden_pre(x)
        acts = torch.where(pre > sae.topk_threshold, torch.relu(pre), torch.zeros_like(pre))
        return Encoded(acts, sae.decode(acts))

    return encode


def train_saelens(
    arch: str,
    path: str,
    d_in: int,
    d_sae: int,
    k: int,
    rows: int,
    batch: int,
    lr: float,
    epochs: int = 1,
    lr_decay: float = 0.0,
    inner: list[int] = MATRYOSHKA_INNER,
    device: str = "cpu",
):
    """SAELens's own trainer on the store's rows: its BatchTopK or Matryoshka BatchTopK, SynthSAEBench's
    settings (Adam 0.9/0.999, constant lr, no warm-up; with ``lr_decay``, a linear decay over that last fraction
    of the steps, as actstore's ``--lr-decay``)."""
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        LoggingConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    else:
        widths = [w for w in inner if w < d_sae]
        sae = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, k=k, matryoshka_widths=widths
            )
        )
    cfg = SAETrainerConfig(
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        total_training_samples=epochs
        * (rows // batch)
        * batch,  # whole batches: the rows there are
        device=device,
        autocast=False,
        lr=lr,
        lr_end=lr,  # with the constant scheduler SAELens decays from lr to 0 over lr_decay_steps
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        lr_decay_steps=int(lr_decay * epochs * (rows // batch)),
        n_restart_cycles=1,
        train_batch_size_samples=batch,
        dead_feature_window=1000,
        feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
        n_batches_for_norm_estimate=1000,
    )
    trainer = SAETrainer(
        cfg=cfg,
        sae=sae,
        data_provider=store_rows(path, batch, epochs),
        save_checkpoint_fn=lambda p: None,
    )
    return trainer.fit()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--model-dir", default=None, help="cache of the built synthetic model (default OUT/model)"
    )
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--eval-rows", type=int, default=100_000,
                    help="fresh rows every SAE is scored on (SynthSAEBench's: 500,000)")  # fmt: skip
    ap.add_argument("--eval-batch", type=int, default=1024,
                    help="rows per batch when scoring (batch top-k keeps k x this many: SynthSAEBench's 1024)")  # fmt: skip
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=25)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=1, help="passes over the rows, for every trainer")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lr-decay", type=float, default=0.0,
                    help="the last fraction of the steps over which the lr decays linearly, for every trainer")  # fmt: skip
    ap.add_argument("--archs", default="batchtopk,matryoshka-batchtopk")
    ap.add_argument("--matryoshka-widths", default=None,
                    help="Matryoshka's inner prefixes, e.g. 8,32,128 (default SynthSAEBench's 128,512,2048)")  # fmt: skip
    ap.add_argument("--inits", default="default",
                    help="decoder starts for each actstore arch: default (its --init default), data, random")  # fmt: skip
    ap.add_argument(
        "--saelens", default="batchtopk,matryoshka-batchtopk", help="SAELens trainers ('' for none)"
    )
    ap.add_argument("--recipe", choices=["saelens", "default"], default="saelens",
                    help="actstore's options: SynthSAEBench's (lr, batch, Adam, constant) or actstore's defaults")  # fmt: skip
    ap.add_argument(
        "--small", action="store_true", help="a 1024-feature, 128-dim model (minutes, not hours)"
    )
    ap.add_argument("--device", default="cpu",
                    help="where the model draws rows and every SAE trains (cpu, or cuda on a GPU)")  # fmt: skip
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(
            f"--device {args.device}: torch sees no CUDA device on this machine; use --device cpu"
        )

    from actstore.analysis.groundtruth import (
        Encoded,
        actstore_encoder,
        as_numpy,
        ground_truth_metrics,
    )
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae
    from actstore.testing.synthbench import (
        synthetic_model,
        synthsaebench_config,
        write_synthbench_store,
    )

    inner = (
        [int(w) for w in args.matryoshka_widths.split(",")]
        if args.matryoshka_widths
        else MATRYOSHKA_INNER
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.small:
        cfg = synthsaebench_config(num_features=1024, hidden_dim=128, root_nodes=8, ortho_steps=100)
    else:
        cfg = synthsaebench_config()
    t0 = time.perf_counter()
    model = synthetic_model(
        cfg,
        cache=args.model_dir or str(out / ("model-small" if args.small else "model")),
        device=args.device,
    )
    print(
        f"# model: {cfg.num_features} features in {cfg.hidden_dim} dims, {time.perf_counter() - t0:.0f}s",
        flush=True,
    )
    d = cfg.hidden_dim
    store = str(out / f"synth-{args.rows}.zarr")
    if not Path(store, "zarr.json").exists():
        shutil.rmtree(store, ignore_errors=True)
        t0 = time.perf_counter()
        write_synthbench_store(store, model, args.rows, seed=0)
        print(f"# store: {args.rows} rows written in {time.perf_counter() - t0:.0f}s", flush=True)
    feats = model.feature_dict.feature_vectors  # (n_true, d)
    t0 = time.perf_counter()
    truth = cached_truth(model, args.eval_rows, args.eval_batch, seed=12345)
    print(f"# {args.eval_rows} eval rows drawn in {time.perf_counter() - t0:.0f}s", flush=True)

    def score(decoder: torch.Tensor, encoders: dict) -> list[dict[str, float]]:
        return [
            {"scoring": how, **as_numpy(ground_truth_metrics(decoder, feats, replay(truth), enc))}
            for how, enc in encoders.items()
        ]

    rows = []
    for arch, init in [(a, i) for a in args.archs.split(",") if a for i in args.inits.split(",")]:
        extra: dict = {} if init == "default" else {"init": init}
        if arch == "matryoshka-batchtopk":
            extra["matryoshka_widths"] = [w for w in inner if w < args.d_sae]
        if args.recipe == "saelens":
            extra.update(lr=args.lr, lr_warmup=0.0, lr_decay=args.lr_decay, optimizer="adam")
        tc = TrainConfig(model="synth", layer=0, arch=arch, d_sae=args.d_sae, k=args.k, epochs=args.epochs,
                         batch_size=args.batch, device=args.device, name=f"{arch}-{args.recipe}-{init}", overwrite=True,
                         eval_fraction=0.01, max_eval_tokens=10_000, **extra)  # fmt: skip
        t0 = time.perf_counter()
        res = train_sae(store, tc, progress=False)
        secs = time.perf_counter() - t0
        sae = res.sae.eval().cpu()
        with torch.no_grad():
            scored = score(sae.W_dec, {"batchtopk": actstore_encoder(sae, batch_topk=True),
                                       "threshold": actstore_encoder(sae)})  # fmt: skip
        for m in scored:
            rows.append({"trainer": "actstore", "device": args.device, "arch": arch, "init": init,
                         "recipe": args.recipe, "lr": args.lr, "lr_decay": args.lr_decay, "seconds": round(secs, 1),
                         "epochs": args.epochs, "rows_per_s": round(args.epochs * args.rows / secs), **m})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    for arch in [a for a in args.saelens.split(",") if a]:
        t0 = time.perf_counter()
        sae = train_saelens(
            arch,
            store,
            d,
            args.d_sae,
            args.k,
            args.rows,
            args.batch,
            args.lr,
            args.epochs,
            args.lr_decay,
            inner,
            args.device,
        )
        secs = time.perf_counter() - t0
        sae.eval().to("cpu")

        def encode(x: torch.Tensor, sae=sae) -> Encoded:
            lat = sae.encode(x)
            return Encoded(lat, sae.decode(lat))

        with torch.no_grad():
            scored = score(
                sae.W_dec, {"batchtopk": encode, "threshold": saelens_threshold_encoder(sae)}
            )
        for m in scored:
            rows.append({"trainer": "saelens", "device": args.device, "arch": arch, "recipe": "saelens", "lr": args.lr,
                         "lr_decay": args.lr_decay, "seconds": round(secs, 1), "epochs": args.epochs,
                         "rows_per_s": round(args.epochs * args.rows / secs), **m})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    (
        out / f"synthsaebench-{args.rows}x{args.epochs}-lr{args.lr:g}-decay{args.lr_decay:g}"
        f"{'-small' if args.small else ''}{'' if args.device == 'cpu' else '-' + args.device}.json"
    ).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
