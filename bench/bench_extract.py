"""Extraction and store benchmarks on real activations (bundled MiniLM over IMDb).

Prints, each as a ratio against a baseline measured in the same run:

1. extraction end-to-end vs the bare forward pass over the same length-sorted batches;
2. cost of asking only for layers <= L of N vs a full pass;
3. bytes per token per codec relative to fp32, and each codec's fidelity;
4. streaming read MB/s of decoded float32 and peak RSS for a store ~1/4 and >1 GB.

With ``--null-model`` (issue 29), the write path's ceiling instead: extract with the forward pass replaced by
ready-made rows, per codec and number of writer threads, beside this machine's physical floor for the same bytes
(``bench/null_model.py``).

Usage: python bench/bench_extract.py [--samples 300] [--big-gb 1.2]
       python bench/bench_extract.py --null-model [--shape bert-base|decoder-4096] [--codecs int8,fp16]
              [--writer-threads 1,2] [--compression auto|none|zstd]
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
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
IMDB = ROOT.parent / "shared" / "data" / "imdb.jsonl.gz"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bare_forward_seconds(
    store: str, model: str, unit_rows: int, batch_size: int, layers: list[int] | None
) -> float:
    """The same units and length-sorted batches as extract, forward only (no copies, no writes)."""
    import actstore
    from actstore.models.loading import load_model
    from actstore.models.taps import LayerTap

    st = actstore.open_store(store)
    tok = st.tokenization()
    first_row, n_tok = tok.sample_rows()
    loaded = load_model(model)
    tap = LayerTap(loaded, layers) if layers else None
    t0 = time.perf_counter()
    n_rows = tok.n_tokens
    for u0 in range(0, n_rows, unit_rows):
        u1 = min(u0 + unit_rows, n_rows)
        lo = int(np.searchsorted(first_row, u0, side="right")) - 1
        hi = int(np.searchsorted(first_row, u1, side="left"))
        starts, lens = first_row[lo:hi], n_tok[lo:hi]
        ids = tok.token_ids(int(starts[0]), int(starts[-1] + lens[-1]))
        order = np.argsort(-lens, kind="stable")
        for b0 in range(0, len(order), batch_size):
            sel = order[b0 : b0 + batch_size]
            width = int(lens[sel].max())
            inp = np.zeros((len(sel), width), np.int64)
            mask = np.zeros((len(sel), width), np.int64)
            for j, s in enumerate(sel):
                a = int(starts[s] - starts[0])
                inp[j, : lens[s]] = ids[a : a + lens[s]]
                mask[j, : lens[s]] = 1
            with torch.inference_mode():
                if tap is None:
                    loaded.model(
                        input_ids=torch.from_numpy(inp), attention_mask=torch.from_numpy(mask)
                    )
                else:
                    tap(torch.from_numpy(inp), torch.from_numpy(mask))
    return time.perf_counter() - t0


def bench_throughput(tmp: Path, n: int, rounds: int = 2) -> dict:
    """Alternate bare forward and full extraction ``rounds`` times; compare the best of each."""
    import actstore
    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    store = tmp / "tp.zarr"
    data = DataConfig(str(IMDB), limit=n)
    extract(
        str(store),
        ExtractConfig("bundled:minilm", data, [0], codec="fp16", name="warm"),
        progress=False,
    )
    t_ext, t_bare = [], []
    for i in range(rounds):
        cfg = ExtractConfig(
            "bundled:minilm",
            data,
            "2,4,6",
            codec="fp16",
            name="minilm" if i == 0 else f"minilm-r{i}",
        )
        t0 = time.perf_counter()
        res = extract(str(store), cfg, progress=False)
        t_ext.append(time.perf_counter() - t0)
        unit_rows = actstore.open_store(str(store)).layer_attrs("minilm", 2).unit_rows
        t_bare.append(
            bare_forward_seconds(str(store), "bundled:minilm", unit_rows, cfg.batch_size, None)
        )
    te, tb = min(t_ext), min(t_bare)
    return {
        "tokens": res.n_tokens,
        "extract_s": te,
        "bare_s": tb,
        "ratio": tb / te,
        "store": str(store),
    }


def bench_depth(store: str) -> list[dict]:
    import actstore

    unit_rows = actstore.open_store(store).layer_attrs("minilm", 2).unit_rows
    full = bare_forward_seconds(store, "bundled:minilm", unit_rows, 32, None)
    rows = []
    for L in (1, 2, 3, 6):
        t = bare_forward_seconds(store, "bundled:minilm", unit_rows, 32, [L])
        rows.append({"layer": L, "of": 6, "time_ratio": t / full, "ideal": L / 6})
    return rows


def bench_codecs(tmp: Path, n: int) -> list[dict]:
    import actstore
    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    out = []
    ref = None
    for codec in ("fp32", "fp16", "bf16", "int8"):
        store = tmp / f"c-{codec}.zarr"
        extract(
            str(store),
            ExtractConfig("bundled:minilm", DataConfig(str(IMDB), limit=n), [4], codec=codec),
            progress=False,
        )
        x = actstore.open_store(str(store)).activations("minilm", 4)[:]
        size = dir_bytes(store / "models")
        if codec == "fp32":
            ref, ref_size = x, size
        cos = (x * ref).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(ref, axis=1))
        rel_mse = float(((x - ref) ** 2).sum() / (ref**2).sum())
        out.append(
            {
                "codec": codec,
                "bytes_per_token": size / len(x),
                "vs_fp32": size / ref_size,
                "mean_cos": float(cos.mean()),
                "min_cos": float(cos.min()),
                "rel_mse": rel_mse,
            }
        )
    return out


STREAM = """
import json, sys, time
import actstore
def peak_rss_mb():  # VmHWM: this process's own high-water mark (ru_maxrss inherits the parent's across fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
st = actstore.open_store(sys.argv[1])
acts = st.activations("minilm", 4)
t0 = time.perf_counter(); n = 0; s = 0.0
for c in acts.iter_chunks():
    n += c.values.nbytes; s += float(c.values[0, 0])
dt = time.perf_counter() - t0
print(json.dumps({"rows": len(acts), "decoded_mb": n / 2**20, "mb_per_s": n / 2**20 / dt,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def make_big_store(src: str, dst: Path, gb: float) -> None:
    """A store whose layer array repeats real activations until it holds ``gb`` GB of fp16."""
    import actstore
    from actstore.format import codecs
    from actstore.storage.location import open_location
    from actstore.store.extract import inner_rows_for, layer_arrays, open_root

    real = actstore.open_store(src).activations("minilm", 4)[:]  # (n, 384) real rows
    n_rows = int(gb * 2**30 / (real.shape[1] * 2)) // 4096 * 4096
    loc = open_location(str(dst), create=True)
    root = open_root(loc)
    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig

    cfg = ExtractConfig("bundled:minilm", DataConfig("bundled:bbc"), [4], codec="fp16")
    root.create_group("models/minilm", attributes={"actstore": {"key": "minilm"}})
    arrays = layer_arrays(
        root,
        "minilm",
        [4],
        n_rows,
        4096,
        65536,
        real.shape[1],
        cfg,
        "t-bench",
        inner_rows_for(root, cfg, 4096),
    )
    arr = arrays[4][0]
    for a in range(0, n_rows, 65536):
        b = min(a + 65536, n_rows)
        idx = np.arange(a, b) % len(real)
        arr[a:b] = codecs.encode(real[idx], "fp16").values
    attrs = dict(arr.attrs["actstore"])
    attrs.update(committed_rows=n_rows, complete=True)
    arr.attrs["actstore"] = attrs


def bench_stream(tmp: Path, src: str, big_gb: float) -> list[dict]:
    rows = []
    for gb in (big_gb / 4, big_gb):
        dst = tmp / f"big-{gb:.2f}.zarr"
        make_big_store(src, dst, gb)
        out = subprocess.run(
            [sys.executable, "-c", STREAM, str(dst)], capture_output=True, text=True, check=True
        )
        r = json.loads(out.stdout)
        r["store_gb_on_disk"] = dir_bytes(dst) / 2**30
        rows.append(r)
    return rows


def bench_sharding(tmp: Path, n: int, rounds: int = 2) -> dict:
    """Extraction with sharded layer arrays (format 2, the default inner chunks) vs unsharded, alternating rounds."""
    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    data = DataConfig(str(IMDB), limit=n)
    extract(
        str(tmp / "sh-warm.zarr"),
        ExtractConfig("bundled:minilm", data, [0], codec="fp16"),
        progress=False,
    )
    from actstore.store.config import DEFAULT_INNER_ROWS as inner_rows

    times: dict[int, list[float]] = {inner_rows: [], 0: []}
    for i in range(rounds):
        for inner in (inner_rows, 0):
            store = tmp / f"sh-{inner}-{i}.zarr"
            t0 = time.perf_counter()
            extract(
                str(store),
                ExtractConfig("bundled:minilm", data, "2,4,6", codec="fp16", inner_rows=inner),
                progress=False,
            )
            times[inner].append(time.perf_counter() - t0)
    return {
        "sharded_s": min(times[inner_rows]),
        "unsharded_s": min(times[0]),
        "ratio": min(times[0]) / min(times[inner_rows]),
    }


def null_model_table(args: argparse.Namespace) -> None:
    import platform

    sys.path.insert(0, str(Path(__file__).parent))
    from null_model import SHAPES, ceiling

    d_model, layers, max_length, n = SHAPES[args.shape]
    print(
        f"null model, {args.shape}: d_model {d_model}, {len(layers)} layers, {args.samples if args.samples != 300 else n} "
        f"IMDb reviews at <= {max_length} tokens, compression {args.compression}; {platform.machine()}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    print(
        "| codec | zstd | writer threads | tokens | unit phase s | tok/s | values/s | stored MB/s | floor tok/s | of floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = ceiling(
        args.shape,
        args.codecs.split(","),
        [int(t) for t in args.writer_threads.split(",")],
        args.compression,
        args.samples if args.samples != 300 else None,
        IMDB,
    )
    for r in rows:
        zstd = "yes" if r["zstd"] else "no"
        print(
            f"| {r['codec']} | {zstd} | {r['threads']} | {r['tokens']:,} | {r['seconds']:.2f} | {r['tok_s']:,.0f} | "
            f"{r['values_s'] / 1e6:,.0f}M | {r['mb_s']:,.0f} | {r['floor_tok_s']:,.0f} | {r['vs_floor']:.2f} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--big-gb", type=float, default=1.2)
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument(
        "--sharding-only", action="store_true", help="Only compare sharded vs unsharded extraction."
    )
    ap.add_argument(
        "--null-model", action="store_true", help="The write path's ceiling without a model."
    )
    ap.add_argument(
        "--throughput-only",
        action="store_true",
        help="Only 1: extraction vs the bare forward pass.",
    )
    ap.add_argument(
        "--shape",
        default="bert-base",
        help="--null-model: bert-base (768 wide, layers 3,6,12) or decoder-4096",
    )
    ap.add_argument("--codecs", default="int8,fp16")
    ap.add_argument("--writer-threads", default="1,2")
    ap.add_argument("--compression", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.null_model:
        null_model_table(args)
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.sharding_only:
            sh = bench_sharding(tmp, args.samples)
            print(
                f"sharded layers (4096-row shards of 1024-row chunks) {sh['sharded_s']:.1f}s vs unsharded "
                f"{sh['unsharded_s']:.1f}s -> sharded extraction runs at {sh['ratio']:.2f}x unsharded speed"
            )
            return
        tp = bench_throughput(tmp, args.samples)
        print(
            f"1. extraction {tp['tokens']} tokens, layers 2,4,6 fp16: extract {tp['extract_s']:.1f}s, "
            f"bare forward {tp['bare_s']:.1f}s -> extract runs at {tp['ratio']:.2f}x the bare forward pass"
        )
        if args.throughput_only:
            return
        sh = bench_sharding(tmp, args.samples)
        print(
            f"1b. sharded layers (4096-row shards of 1024-row chunks) {sh['sharded_s']:.1f}s vs unsharded "
            f"{sh['unsharded_s']:.1f}s -> sharded extraction runs at {sh['ratio']:.2f}x unsharded speed"
        )
        print("2. truncated forward (layers <= L of 6):")
        for r in bench_depth(tp["store"]):
            print(
                f"   L={r['layer']}: {r['time_ratio']:.2f} of a full pass (ideal {r['ideal']:.2f})"
            )
        print("3. codecs (layer 4, vs fp32):")
        for r in bench_codecs(tmp, max(50, args.samples // 3)):
            print(
                f"   {r['codec']:5s} {r['bytes_per_token']:7.1f} B/token  {r['vs_fp32']:.3f}x fp32  "
                f"mean cos {r['mean_cos']:.6f}  min cos {r['min_cos']:.6f}  rel MSE {r['rel_mse']:.2e}"
            )
        if not args.skip_stream:
            print("4. streaming read (decoded float32), separate process per store:")
            for r in bench_stream(tmp, tp["store"], args.big_gb):
                print(
                    f"   store {r['store_gb_on_disk']:.2f} GB on disk, {r['rows']} rows: {r['mb_per_s']:.0f} MB/s, "
                    f"peak RSS {r['peak_rss_mb']:.0f} MB"
                )


if __name__ == "__main__":
    main()
