"""Whole-process CPU time of the light commands: `actstore top-tokens` and `actstore --help`.

Each command runs in a fresh process, as a user runs it; CPU time (user + system, of the child) is read with
``getrusage(RUSAGE_CHILDREN)``. The baseline in the same run is the same command in a process that first imports
torch and transformers — what every command paid before the read path was made torch-free.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_light.py [--docs 400] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_query import build_store  # noqa: E402

RUN = "import sys{pre}; from actstore.cli import main; main(sys.argv[1:], prog_name='actstore')"


def cpu_seconds(args: list[str], pre: str = "") -> float:
    """CPU seconds (user + system) of one fresh process running ``actstore ARGS``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [sys.executable, "-c", RUN.format(pre=pre), *args], check=True, capture_output=True
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "actstore-bench"))
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    store = build_store(root, args.docs)
    cases = {
        "top-tokens": ["top-tokens", store, "--sae", "bench", "--feature", "7", "-n", "20"],
        "--help": ["--help"],
    }
    heavy = "; import torch, transformers"
    print(f"whole-process CPU seconds, median of {args.repeat} (a fresh process each):")
    print(
        f"{'command':<12} {'with torch imported (before)':>30} {'as shipped (now)':>18} {'ratio':>7}"
    )
    for name, cmd in cases.items():
        cpu_seconds(cmd)  # warm the disk cache
        old = statistics.median(cpu_seconds(cmd, heavy) for _ in range(args.repeat))
        new = statistics.median(cpu_seconds(cmd) for _ in range(args.repeat))
        print(f"{name:<12} {old:>28.2f} s {new:>16.2f} s {new / old:>7.2f}")
    print("\nthe floor: a fresh process importing only the libraries the read path needs")
    for mods in (
        "numpy",
        "numpy, polars",
        "numpy, polars, pyarrow.parquet, duckdb",
        "numpy, polars, pyarrow.parquet, duckdb, zarr",
    ):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        for _ in range(args.repeat):
            subprocess.run([sys.executable, "-c", f"import {mods}"], check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (
            (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        ) / args.repeat
        print(f"  import {mods:<48} {cpu:.2f} s")
    print(
        f"\nmachine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}"
    )


if __name__ == "__main__":
    main()
