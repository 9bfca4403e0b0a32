"""What ``actstore effects`` costs against a bare forward pass of the same model over the same batches.

For each SAE (its layer is the splice) the same samples, in the same length-sorted batches, are run four ways in
one process: the classifier's bare forward pass (no SAE, no autograd), attribution to the predicted class (one
backward through the layers above the splice), attribution to every class logit (one backward per class), and the
ablation of one feature (the clean pass and five ablations, less the clean pass alone, per ablation: the layers
below the splice replay the clean pass's outputs). Ratios are of samples/s to the bare forward pass; the ablation
is also compared with the forward pass of the layers above the splice, estimated as the bare pass times
(n_layers - layer) / n_layers.

    python bench/bench_effects.py STORE --sae minilm-ft-l3-topk-512 --sae minilm-ft-l6-topk-512 [--samples 400]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ABLATIONS = 5
"""Ablations timed together (their cost less the clean pass's, divided by this)."""


def timed(fn: Callable[[], Any], n: int, repeats: int) -> float:
    """Samples/s of ``fn`` over ``n`` samples, best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def bench_sae(st: Any, name: str, samples: int, batch_size: int, repeats: int) -> dict[str, Any]:
    import torch

    from actstore.effects.ablate import run_passes, set_feature
    from actstore.effects.attribute import attribute_block, corpus, corpus_batches
    from actstore.effects.config import EffectsConfig
    from actstore.effects.run import open_splice
    from actstore.effects.splice import logits

    head, splice = open_splice(st, name, None, "cpu")
    cfg = EffectsConfig(name, max_samples=samples, batch_size=batch_size, device="cpu")
    cp = corpus(st, splice.sae.cfg.tokenization, cfg, head)
    # the same length-sorted batches attribution runs
    order = np.argsort(-cp.n_tokens, kind="stable")
    batches = [b for _, b, _ in corpus_batches(st, splice.sae.cfg.tokenization, cp, head.pad_id, batch_size, "cpu",
                                               order)]  # fmt: skip
    n = len(cp.samples)

    def bare() -> None:
        with torch.no_grad():
            for b in batches:
                logits(head, b)

    def attr(target: str) -> None:
        attribute_block(st, head, splice, cp, 0, n, EffectsConfig(name, target=target, batch_size=batch_size,
                                                                  device="cpu"), "cpu")  # fmt: skip

    def ablate(k: int) -> None:  # the clean pass and k ablations
        with torch.no_grad():
            run_passes(st, head, splice, cp, cfg, "cpu", [set_feature(j, 0.0) for j in range(k)])

    base = timed(bare, n, repeats)
    pred, every = (
        timed(lambda: attr("predicted"), n, repeats),
        timed(lambda: attr("logits"), n, repeats),
    )
    per_ablation = n / timed(lambda: ablate(ABLATIONS), n, repeats) - n / timed(
        lambda: ablate(0), n, repeats
    )
    abl = n * ABLATIONS / per_ablation
    frac = (head.n_layers - splice.layer) / head.n_layers
    return {"sae": name, "layer": splice.layer, "n_layers": head.n_layers, "samples": n,
            "tokens": int(cp.n_tokens.sum()), "classes": len(head.classes), "forward_samples_s": round(base, 1),
            "attribution_samples_s": round(pred, 1), "attribution_ratio": round(pred / base, 3),
            "per_class_samples_s": round(every, 1), "per_class_ratio": round(every / base, 3),
            "ablation_samples_s": round(abl, 1), "ablation_ratio": round(abl / base, 3),
            "ablation_vs_above_splice": round(base / (abl * frac), 3) if frac else None}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--sae", action="append", required=True)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()

    import torch

    from actstore.store.reader import open_store

    torch.set_num_threads(2)
    st = open_store(args.store)
    rows = []
    for name in args.sae:
        rows.append(bench_sae(st, name, args.samples, args.batch_size, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
