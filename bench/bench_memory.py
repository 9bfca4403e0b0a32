"""Peak memory of each stage as the corpus grows (issue 29 item 8): extract, train, encode and a query on stores of
2M and 20M tokens, bert-base width, int8.

For each size the bench writes a synthetic corpus (random words, ~256 tokens a text), extracts one layer with the
*null model* of ``bench/null_model.py`` (the pipeline without a forward pass: the memory of a model is the model's,
not the corpus's), trains a TopK SAE on a fixed token budget (what grows with the store is what is measured, not
what grows with the budget), encodes every token of the store, and asks ``top-tokens``. Each stage runs in its own
process; its peak RSS is that process's (``wait4``'s ``ru_maxrss``).

Usage: python bench/bench_memory.py [--tokens 2e6,2e7] [--d-model 768] [--d-sae 1024] [--train-tokens 500000]
       (set ACTSTORE_BENCH_DIR to a disk with room: the 20M store is ~16 GB, its encoding ~5 GB)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACTSTORE = [str(Path(sys.executable).parent / "actstore")]
WORDS = "the movie was great wonderful terrible awful boring plot actor actress music scene film story love hate".split()  # noqa: SIM905

EXTRACT = """
import sys, json
sys.path.insert(0, {bench!r})
import null_model
from actstore.data.corpora import DataConfig
from actstore.models.taps import LayerTap
from actstore.store.config import ExtractConfig
from actstore.store.extract import extract
LayerTap.__call__ = null_model.null_tap({d}, 32, 256)
r = extract({store!r}, ExtractConfig(model={model!r}, data=DataConfig({corpus!r}), layers=[1], codec="int8", name="m",
            max_length=256, batch_size=32, device="cpu"), progress=False)
print(json.dumps({{"tokens": r.n_tokens, "tok_s": r.tokens_per_s}}))
"""


def corpus(path: Path, tokens: int, seed: int = 0) -> None:
    """JSONL.gz of texts of 254 one-token words (256 MiniLM tokens with [CLS] and [SEP]) until ``tokens`` tokens."""
    rng = random.Random(seed)
    with gzip.open(path, "wt", compresslevel=1) as f:
        for i in range(-(-tokens // 256)):
            f.write(
                json.dumps(
                    {
                        "id": f"t{i}",
                        "text": " ".join(rng.choices(WORDS, k=254)),
                        "label": "ab"[i % 2],
                    }
                )
                + "\n"
            )


def run(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS in MB, seconds, stdout) of one stage in its own process (reaped with ``wait4`` for its rusage)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=err,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        secs = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{err.read()[-3000:]}")
        return usage.ru_maxrss / 1024, secs, out.read()


def measure(
    size: int, tmp: Path, model: str, args: argparse.Namespace
) -> dict[str, tuple[float, float]]:
    data, store = tmp / f"corpus-{size}.jsonl.gz", str(tmp / f"store-{size}.zarr")
    corpus(data, size)
    out: dict[str, tuple[float, float]] = {}
    script = EXTRACT.format(
        bench=str(ROOT / "bench"), d=args.d_model, store=store, model=model, corpus=str(data)
    )
    rss, secs, so = run([sys.executable, "-c", script])
    n = json.loads(so.strip().splitlines()[-1])["tokens"]
    out["extract (null model)"] = (rss, secs)
    rss, secs, _ = run(
        [
            *ACTSTORE,
            "train",
            store,
            "--model",
            "m",
            "--layer",
            "1",
            "--arch",
            "topk",
            "--d-sae",
            str(args.d_sae),
            "--k",
            "32",
            "--tokens",
            str(args.train_tokens),
            "--name",
            "s",
            "--quiet",
        ]
    )
    out[f"train ({args.train_tokens:,} tokens)"] = (rss, secs)
    rss, secs, _ = run([*ACTSTORE, "encode", store, "--sae", "s", "--quiet"])
    out["encode (every token)"] = (rss, secs)
    rss, secs, _ = run([*ACTSTORE, "top-tokens", store, "--sae", "s", "--feature", "7"])
    out["top-tokens"] = (rss, secs)
    out["_tokens"] = (n, 0.0)
    shutil.rmtree(store, ignore_errors=True)
    data.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", default="2e6,2e7")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--train-tokens", type=int, default=500_000)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from null_model import null_model

    sizes = [int(float(v)) for v in args.tokens.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="actstore-mem-", dir=os.environ.get("ACTSTORE_BENCH_DIR")))
    try:
        model = null_model(tmp / "model", args.d_model, 1)
        results = {size: measure(size, tmp, model, args) for size in sizes}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"peak RSS by stage; d_model {args.d_model}, int8, one layer; {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    head = " | ".join(f"{results[s]['_tokens'][0] / 1e6:.1f}M tokens: MB (s)" for s in sizes)
    print(f"| stage | {head} | last / first |")
    print("|---|" + "---|" * len(sizes) + "---|")
    for stage in [k for k in results[sizes[0]] if not k.startswith("_")]:
        cells = " | ".join(
            f"{results[s][stage][0]:,.0f} ({results[s][stage][1]:.0f})" for s in sizes
        )
        print(
            f"| {stage} | {cells} | {results[sizes[-1]][stage][0] / results[sizes[0]][stage][0]:.2f} |"
        )


if __name__ == "__main__":
    main()
