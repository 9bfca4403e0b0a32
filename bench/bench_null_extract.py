"""The extractor's ceiling without a model (issue 29): ``extract`` with every forward pass replaced by a *null model*
that hands back preallocated hidden states, so what is timed is the rest of the pipeline: building the batches,
picking the owned rows, the codec, the copies, the chunk writes and the markers.

The model is a random-init BERT of the chosen width (bert-base: 768) whose blocks never run: ``LayerTap.__call__``
returns slices of one preallocated ``(batch, width, d_model)`` tensor per layer. Prints tokens/s and stored
values/s per codec.

Usage: python bench/bench_null_extract.py [--samples 2000] [--max-length 256] [--d-model 768] [--layers 3,6,12]
       [--codecs int8,fp16]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
IMDB = ROOT.parent / "shared" / "data" / "imdb.jsonl.gz"


def random_bert(path: Path, d_model: int, n_layers: int) -> str:
    """A random BERT of width ``d_model`` with the bundled MiniLM's tokenizer, saved at ``path``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from actstore.models.names import resolve_model

    cfg = BertConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=max(1, d_model // 64),
                     intermediate_size=4 * d_model, max_position_embeddings=512)  # fmt: skip
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model("bundled:minilm")).save_pretrained(path)
    return str(path)


def null_tap(d_model: int, max_batch: int, max_len: int):
    """A ``LayerTap.__call__`` that runs no model: slices of one preallocated tensor per layer."""
    cache: dict[int, torch.Tensor] = {}

    def call(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
        b, w = input_ids.shape
        out = {}
        for layer in self.layers:
            if layer not in cache:
                cache[layer] = torch.randn(max_batch, max_len, d_model, generator=torch.Generator().manual_seed(layer))
            out[layer] = cache[layer][:b, :w]
        return out

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", default="3,6,12")
    ap.add_argument("--codecs", default="int8,fp16")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    from actstore.data.corpora import DataConfig
    from actstore.models.taps import LayerTap
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    layers = [int(v) for v in args.layers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="actstore-null-"))
    try:
        model = random_bert(tmp / "model", args.d_model, max(layers))
        LayerTap.__call__ = null_tap(args.d_model, args.batch_size, args.max_length)  # type: ignore[method-assign]
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.samples} IMDb reviews at <= "
              f"{args.max_length} tokens, d_model {args.d_model}, layers {args.layers}, null model; "
              f"{time.strftime('%Y-%m-%d')}")  # fmt: skip
        print("| codec | tokens | seconds | tok/s | values/s |")
        print("|---|---|---|---|---|")
        for codec in args.codecs.split(","):
            store = tmp / f"{codec}.zarr"
            cfg = ExtractConfig(model=model, data=DataConfig(str(IMDB), limit=args.samples), layers=args.layers,
                                codec=codec, max_length=args.max_length, batch_size=args.batch_size, device="cpu")  # fmt: skip
            t0 = time.perf_counter()
            res = extract(str(store), cfg, progress=False)
            secs = time.perf_counter() - t0
            n = res.n_tokens
            print(f"| {codec} | {n:,} | {secs:.1f} | {n / secs:,.0f} | {n * len(layers) * args.d_model / secs / 1e6:,.0f}M |",
                  flush=True)  # fmt: skip
            shutil.rmtree(store, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
