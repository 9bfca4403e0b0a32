"""Transcoders on a real model: MiniLM's block-3 MLP input to its output, against the best linear map and an SAE.

The first ``--samples`` IMDb reviews are extracted with bundled MiniLM at ``--layer``'s two sites (``--site
mlp_in``, ``--site mlp_out``) into one store; transcoders from one to the other train with each ``--inits`` (the
decoder's start: ``random``, or ``data``: paired source and target rows), with and without ``--skip``; a BatchTopK SAE
of the MLP output (reconstructing its own input: a bound, not a rival) trains beside them. The best linear map from
MLP input to output is fitted by least squares on the first 90% of the rows and scored on the last 10%. Prints one
row per run: held-out FVU of the MLP output, L0, dead fraction, seconds.

    python bench/bench_transcoder.py --out /tmp/tc [--samples 300] [--layer 3] [--d-sae 1536 --k 32 --epochs 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--d-sae", type=int, default=1536)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--inits", default="random,data")
    args = ap.parse_args()

    from actstore.data.corpora import DataConfig
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract
    from actstore.store.reader import open_store

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "imdb.jsonl"
    with gzip.open(SHARED / "imdb.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(args.samples)]
    data.write_text("".join(lines))
    store = str(out / "sites.zarr")
    if not Path(store, "zarr.json").exists():
        for site in ("mlp_in", "mlp_out"):
            extract(store, ExtractConfig(model="bundled:minilm", data=DataConfig(str(data)), layers=[args.layer],
                                         max_length=args.max_length, site=site, device="cpu"), progress=False)  # fmt: skip
    st = open_store(store)
    x = np.asarray(st.activations("minilm.mlp_in", args.layer)[:], dtype=np.float64)
    y = np.asarray(st.activations("minilm.mlp_out", args.layer)[:], dtype=np.float64)
    cut = int(0.9 * len(x))
    xa = np.hstack([x, np.ones((len(x), 1))])
    w, *_ = np.linalg.lstsq(xa[:cut], y[:cut], rcond=None)
    held = y[cut:]
    linear = float(((xa[cut:] @ w - held) ** 2).sum() / ((held - held.mean(0)) ** 2).sum())
    rows = [{"run": "linear map (least squares)", "rows": len(x), "fvu": round(linear, 3)}]
    print(json.dumps(rows[-1]), flush=True)
    runs: list[tuple[str, dict]] = []
    for init in args.inits.split(","):
        for skip in (False, True):
            runs.append((f"transcoder{' --skip' if skip else ''} --init {init}",
                         dict(model="minilm", arch="transcoder", source="mlp_in", target="mlp_out", skip=skip,
                              init=init)))  # fmt: skip
    runs.append(("batchtopk SAE of mlp_out", dict(model="minilm.mlp_out", arch="batchtopk")))
    for i, (label, kw) in enumerate(runs):
        cfg = TrainConfig(layer=args.layer, d_sae=args.d_sae, k=args.k, epochs=args.epochs, device="cpu",
                          task_samples=0, name=f"run{i}", overwrite=True, **kw)  # fmt: skip
        t0 = time.perf_counter()
        m = train_sae(store, cfg, progress=False).metrics
        ev = m["eval"]
        rows.append({"run": label, "fvu": round(ev["fvu"], 3), "l0": round(ev["l0"], 1),
                     "dead": round(ev["dead_fraction"], 3), "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    (out / "transcoder.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
