"""Issue 16's figures: importing a 16k-wide SAELens SAE (read, fold, held-out fit check, save) and exporting an
encoded SAE's feature table as delphi's latent cache and as Neuronpedia batch files, against the table's size.

Usage: python bench/bench_interop.py STORE --model minilm --layer 4 --sae NAME [--d-sae 16384] [--features 100]
STORE is modified: the imported SAE is saved in it, and NAME is encoded if it is not yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def saelens_folder(folder: Path, d_in: int, d_sae: int, k: int, seed: int = 0) -> None:
    """A SAELens TopK inference folder (cfg.json + sae_weights.safetensors) in its documented layout."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    w_dec = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "W_enc": np.ascontiguousarray(w_dec.T),
            "b_enc": np.zeros(d_sae, np.float32),
            "W_dec": w_dec,
            "b_dec": np.zeros(d_in, np.float32),
        },
        str(folder / "sae_weights.safetensors"),
    )
    cfg = {
        "architecture": "topk",
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "rescale_acts_by_decoder_norm": True,
        "metadata": {"hook_name": "blocks.4.hook_resid_pre", "model_name": "minilm"},
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--sae", required=True)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--features", type=int, default=100)
    args = ap.parse_args()

    import actstore
    from actstore.encoding.config import EncodeConfig
    from actstore.encoding.encode import encode
    from actstore.query.config import FeatureExportConfig
    from actstore.query.exports import export_features
    from actstore.query.tables import feature_tables
    from actstore.sae.config import ImportConfig
    from actstore.sae.imports import import_sae

    st = actstore.open_store(args.store, writable=True)
    d_in = st.activations(args.model, args.layer).d_model
    work = Path(tempfile.mkdtemp(prefix="interop-"))
    saelens_folder(work / "sl", d_in, args.d_sae, 32)
    t0 = time.perf_counter()
    res = import_sae(
        st,
        ImportConfig(
            path=str(work / "sl"),
            format="saelens",
            model=args.model,
            layer=args.layer,
            name=f"bench-import-{args.d_sae}",
            force=True,
            overwrite=True,
        ),
    )
    t_import = time.perf_counter() - t0
    w_bytes = (work / "sl" / "sae_weights.safetensors").stat().st_size
    print(
        f"import-sae of a {d_in}->{args.d_sae} SAELens TopK SAE ({w_bytes / 2**20:.1f} MiB of weights), fit check on "
        f"{res.eval['n_tokens']:,} rows: {t_import:.2f} s"
    )

    if args.sae not in {t.sae for t in feature_tables(st)}:
        t0 = time.perf_counter()
        encode(st, EncodeConfig(sae=args.sae), progress=False)
        print(f"(encoded {args.sae} first: {time.perf_counter() - t0:.1f} s)")
    st = actstore.open_store(args.store)
    rows = []
    for fmt, extra in (("delphi", {}), ("neuronpedia", {"features": list(range(args.features))})):
        out = work / fmt
        t0 = time.perf_counter()
        r = export_features(
            st, FeatureExportConfig(sae=args.sae, format=fmt, out=str(out), **extra)
        )
        rows.append((fmt, time.perf_counter() - t0, r))
    t = next(t for t in feature_tables(st) if t.sae == args.sae)
    print(
        f"\nexport-features of {args.sae}: {t.n_feature_rows:,} non-zero values over {t.n_rows:,} rows, feature table "
        f"{rows[0][2].table_bytes / 2**20:.1f} MiB"
    )
    print("| format | what | seconds | bytes written | vs feature table |\n|---|---|---|---|---|")
    for fmt, secs, r in rows:
        what = (
            f"{r.n_entries:,} values"
            if fmt == "delphi"
            else f"{args.features} features, {r.n_entries:,} contexts"
        )
        print(
            f"| {fmt} | {what} | {secs:.2f} | {r.n_bytes / 2**20:.1f} MiB | {r.n_bytes / r.table_bytes:.2f}x |"
        )


if __name__ == "__main__":
    main()
