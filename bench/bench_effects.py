"""What ``actstore effects`` costs against a bare forward pass of the same model over the same batches.

For each SAE (its layer is the splice) the same samples, in the same length-sorted batches, are run four ways in
one process: the classifier's bare forward pass (no SAE, no autograd), attribution to the predicted class (one
backward through the layers above the splice), attribution to every class logit (one backward per class), and the
ablation of one feature (a forward pass with the feature zeroed in the splice). Ratios are of samples/s to the bare
forward pass; "above-splice forward" estimates the forward pass of the layers above the splice as the bare pass
times (n_layers - layer) / n_layers.

    python bench/bench_effects.py STORE --sae minilm-ft-l3-topk-512 --sae minilm-ft-l6-topk-512 [--samples 400]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


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

    from actstore.effects.ablate import run_pass, zero_or_mean
    from actstore.effects.attribute import attribute_block, corpus
    from actstore.effects.config import EffectsConfig
    from actstore.effects.run import open_splice
    from actstore.effects.splice import logits, make_batch
    from actstore.store.reader import open_store

    torch.set_num_threads(2)
    st = open_store(args.store)
    rows = []
    for name in args.sae:
        head, splice = open_splice(st, name, None, "cpu")
        cfg = EffectsConfig(name, max_samples=args.samples, batch_size=args.batch_size, device="cpu")
        cp = corpus(st, splice.sae.cfg.tokenization, cfg, head)
        tk = st.tokenization(splice.sae.cfg.tokenization)
        order = np.argsort(-cp.n_tokens, kind="stable")
        batches = [make_batch([tk.token_ids(int(cp.first[i]), int(cp.first[i] + cp.n_tokens[i])) for i in idx],
                              cp.samples[idx], head.pad_id, "cpu")
                   for idx in (order[a : a + args.batch_size] for a in range(0, len(order), args.batch_size))]  # fmt: skip
        n = len(cp.samples)

        def bare() -> None:
            with torch.no_grad():
                for b in batches:
                    logits(head, b)

        def attr(target: str) -> None:
            attribute_block(st, head, splice, cp, 0, n, EffectsConfig(name, target=target, batch_size=args.batch_size,
                                                                      device="cpu"), "cpu")  # fmt: skip

        def ablate() -> None:
            with torch.no_grad():
                run_pass(st, head, splice, cp, cfg, "cpu", zero_or_mean(0, 0.0), None)

        def timed(fn) -> float:  # best of repeats, samples/s
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            return n / best

        base = timed(bare)
        pred, every, abl = timed(lambda: attr("predicted")), timed(lambda: attr("logits")), timed(ablate)
        frac = (head.n_layers - splice.layer) / head.n_layers
        rows.append({"sae": name, "layer": splice.layer, "n_layers": head.n_layers, "samples": n,
                     "tokens": int(cp.n_tokens.sum()), "classes": len(head.classes),
                     "forward_samples_s": round(base, 1), "attribution_samples_s": round(pred, 1),
                     "attribution_ratio": round(pred / base, 3), "per_class_samples_s": round(every, 1),
                     "per_class_ratio": round(every / base, 3), "ablation_samples_s": round(abl, 1),
                     "ablation_ratio": round(abl / base, 3),
                     "ablation_vs_above_splice": round((base / frac) / abl, 3) if frac else None})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
