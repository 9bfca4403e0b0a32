"""Feature absorption of trained SAEs, where the truth is known: the speller model, TopK / BatchTopK vs Matryoshka.

The speller (``actstore.testing.speller``) embeds every whole word as its first letter's direction, and 600 of its
``s`` words also carry one of 30 group directions. A corpus (IMDb reviews) run through it gives rows whose true
features are *starts with letter L* (one per word token), *in group j* (on the absorbed s words) and one junk
direction (every other token). Each architecture trains on the same store rows; ``actstore eval --evals
absorption`` then measures how much of *starts with S* went into latents other than the S latent. An SAE that keeps
the hierarchy (one S latent firing on every s word, one latent per group on top) scores 0; one that learns
``e_s + u_j`` as a single latent scores near the absorbed share of the s words (about 0.25).

    python bench/bench_absorption.py [--out /tmp/absb] [--samples 2000] [--archs topk,batchtopk,matryoshka-batchtopk]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def frequent_s_words(tokenizer_path: str, data: str, samples: int, n: int) -> list[str]:
    """The ``n`` whole s words most frequent in the corpus's first ``samples`` texts, shuffled (seeded) so that each
    group mixes frequent and less frequent words."""
    import gzip
    from collections import Counter

    import numpy as np
    from transformers import AutoTokenizer

    from actstore.analysis.absorption import alpha_vocab

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    vocab = alpha_vocab(tok)
    s_ids = {
        int(i): w for i, w, c in zip(vocab.ids, vocab.words, vocab.letters, strict=True) if c == 18
    }
    counts: Counter[int] = Counter()
    with gzip.open(data, "rt") as f:
        for i, line in enumerate(f):
            if i >= samples:
                break
            counts.update(t for t in tok(json.loads(line)["text"])["input_ids"] if t in s_ids)
    top = [s_ids[t] for t, _ in counts.most_common(n)]
    np.random.default_rng(0).shuffle(top)
    return top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/actstore-bench-absorption")
    ap.add_argument("--data", default="../shared/data/imdb.jsonl.gz")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--archs", default="topk,batchtopk,matryoshka-batchtopk")
    ap.add_argument("--d-sae", type=int, default=128)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--groups", type=int, default=30)
    ap.add_argument("--per-group", type=int, default=10)
    args = ap.parse_args()

    import torch

    from actstore.analysis.absorption import absorption
    from actstore.analysis.config import EvalConfig
    from actstore.analysis.probing import save_evals
    from actstore.data.corpora import DataConfig
    from actstore.models.names import resolve_model
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract
    from actstore.store.reader import open_store
    from actstore.testing.speller import build_speller

    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    minilm = resolve_model("bundled:minilm")
    absorbed = frequent_s_words(minilm, args.data, args.samples, args.groups * args.per_group)
    sp = build_speller(out / "speller", minilm, n_groups=args.groups, per_group=args.per_group, seed=args.seed,
                       absorbed=absorbed)  # fmt: skip
    store = str(out / "speller.zarr")
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    data = DataConfig(args.data, limit=args.samples)
    extract(store, ExtractConfig(model=sp.path, data=data, layers=[0], name="speller", codec="fp32",
                                 max_length=args.max_length, device="cpu"), progress=False)  # fmt: skip
    n_rows = len(open_store(store).activations("speller", 0))
    print(f"extracted {n_rows} rows in {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    for arch in args.archs.split(","):
        name = f"{arch}-{args.d_sae}-k{args.k}"
        tc = TrainConfig(model="speller", layer=0, arch=arch, d_sae=args.d_sae, k=args.k, epochs=args.epochs,
                         device="cpu", name=name, overwrite=True, seed=args.seed)  # fmt: skip
        t0 = time.perf_counter()
        res = train_sae(store, tc, progress=False)
        secs = time.perf_counter() - t0
        st = open_store(store, writable=True)
        ab = absorption(st, EvalConfig(sae=name, device="cpu", seed=args.seed))
        save_evals(st, ab, "absorption")
        s = next(r for r in ab.letters if r.letter == "s")
        rows.append({"arch": arch, "d_sae": args.d_sae, "k": args.k, "train_s": round(secs, 1),
                     "fvu": round(float(res.metrics["eval"]["fvu"]), 4),
                     "absorption": round(ab.absorption_fraction, 4), "full": round(ab.full_absorption, 4),
                     "s_absorption": round(s.absorption_fraction, 4), "s_full": round(s.full_absorption, 4),
                     "s_main": s.main_latents, "split": round(ab.split_latents, 2),
                     "probe_f1": round(ab.probe_f1, 3), "eval_s": round(ab.seconds, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    (out / "absorption.json").write_text(json.dumps({"rows": n_rows, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
