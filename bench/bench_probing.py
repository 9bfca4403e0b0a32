"""Sparse probing per architecture (``actstore eval``) on the paper's labelled corpora.

For each corpus, a label-balanced subset (the first ``--per-label`` rows of each label, written to a temporary
JSONL: the corpora are sorted by label, so their first rows would hold one) is extracted with bundled MiniLM at
``--layers``; TopK, BatchTopK, Matryoshka BatchTopK and relu-l1 SAEs (``--archs``) of one width are trained on
each layer (one pass per layer); each is probed. Prints one row per (corpus, layer, architecture): held-out FVU
and L0, the dense probe on the raw layer and the k-sparse probes on the SAE's features, means over the one-vs-rest tasks.

    python bench/bench_probing.py --out /tmp/probing [--per-label 300] [--layers 3,6] [--epochs 3] [--l1 0.01]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPORA = {
    "imdb": (SHARED / "imdb.jsonl.gz", None),
    "app-reviews": (SHARED / "app_reviews.jsonl.gz", None),
    "huffpost5": (
        SHARED / "news_category.jsonl.gz",
        {"WELLNESS", "FOOD & DRINK", "POLITICS", "ENTERTAINMENT", "SPORTS"},
    ),
}


def balanced(src: Path, labels: set[str] | None, per_label: int, dst: Path) -> int:
    """The first ``per_label`` rows of each label (of ``labels`` when given) of ``src`` as JSONL at ``dst``."""
    counts: dict[str, int] = {}
    out = []
    with gzip.open(src, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            lab = str(r.get("label"))
            if (
                (labels is not None and lab not in labels)
                or counts.get(lab, 0) >= per_label
                or not r.get("text")
            ):
                continue
            counts[lab] = counts.get(lab, 0) + 1
            out.append({"id": str(r["id"]), "text": r["text"], "label": lab})
    dst.write_text("".join(json.dumps(r) + "\n" for r in out))
    return len(out)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-label", type=int, default=300)
    ap.add_argument("--layers", default="3,6")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--d-sae", type=int, default=1536)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument(
        "--l1",
        type=float,
        default=0.01,
        help="relu-l1's coefficient (0.01: sparse; docs/TRAINING.md)",
    )
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--corpora", default=",".join(CORPORA))
    ap.add_argument("--archs", default="topk,batchtopk,matryoshka-batchtopk,relu-l1")
    args = ap.parse_args()

    from actstore.analysis.config import EvalConfig
    from actstore.analysis.probing import save_evals, sparse_probing
    from actstore.data.corpora import DataConfig
    from actstore.sae.combos import expand
    from actstore.sae.files import list_saes
    from actstore.sae.sweep import run_sweep
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract
    from actstore.store.reader import open_store

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layers = [int(v) for v in args.layers.split(",")]
    rows = []
    for name in args.corpora.split(","):
        src, labels = CORPORA[name]
        data = out / f"{name}.jsonl"
        n = balanced(src, labels, args.per_label, data)
        store = str(out / f"{name}.zarr")
        t0 = time.perf_counter()
        extract(store, ExtractConfig(model="bundled:minilm", data=DataConfig(str(data)), layers=layers,
                                     max_length=args.max_length, device="cpu"), progress=False)  # fmt: skip
        t_extract = time.perf_counter() - t0
        values = {
            "epochs": args.epochs,
            "d_sae": args.d_sae,
            "k": args.k,
            "l1": args.l1,
            "device": "cpu",
        }
        cfgs = expand(values, {"model": ["minilm"], "layer": layers, "arch": args.archs.split(","),
                               "d_sae": [args.d_sae], "k": [args.k]})  # fmt: skip
        t0 = time.perf_counter()
        run_sweep(store, cfgs, progress=False, log=lambda s: None)
        t_train = time.perf_counter() - t0
        st = open_store(store, writable=True)
        table = list_saes(st)
        for sae in table.rows(named=True):
            res = sparse_probing(st, EvalConfig(sae=sae["name"], device="cpu"))
            save_evals(st, res)
            rows.append({"corpus": name, "samples": n, "layer": sae["layer"], "arch": sae["arch"],
                         "fvu": round(sae["fvu"], 3), "l0": round(sae["l0"], 1), "tasks": len(res.tasks),
                         "dense": round(res.dense, 3), **{f"k{k}": round(v, 3) for k, v in res.sparse.items()}})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        print(f"# {name}: {n} samples, extract {t_extract:.0f}s, train {t_train:.0f}s", flush=True)
    (out / "probing.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
