"""The GPU check's table (issue 29 item 7), run by ``bench/gpu_check.sh`` on a machine with a CUDA device.

1. **Extraction vs the bare forward pass** over the same batches (the same units, length-sorted, bf16 autocast, no
   copies or writes), per codec: a random-init bert-base (512 tokens, layers 3, 6, 12) and a small Llama-shape
   decoder (2,048 tokens, d_model 2048, 8 layers; layers 2, 4, 6). Extraction's time is its unit phase (the token
   index is built before and not timed). The goal: extract >= 0.9x the bare forward pass.
2. **SAE training** tokens/s on the same rows (bert-base layer 6, int8): actstore's topk and batchtopk against
   EleutherAI sparsify's ``SparseCoder`` (TopK) with Adam at the same width, k, batch and learning rate, its rows fed
   from GPU memory (sparsify's own loop reads activations from a live model, not from a store).

Everything is made on the machine: a word-level tokenizer over a synthetic vocabulary, random-init models, a corpus
of random words (nothing to download, nothing from ``../shared``). ``--device cpu --small`` runs every step of it
at toy sizes, to check the script without a GPU.

Usage: python bench/bench_gpu.py [--device cuda] [--small] [--bert-tokens 4e6] [--llama-tokens 1e6]
       [--codecs fp16,bf16,int8] [--sae-tokens 3e7] [--no-sparsify]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
VOCAB = 4000


def tokenizer(path: Path, max_length: int) -> None:
    """A word-level tokenizer over ``w0 .. w3999`` with [CLS] ... [SEP] around each text, saved at ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3} | {
        f"w{i}": i + 4 for i in range(VOCAB - 4)
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=max_length,
    ).save_pretrained(path)


def model(path: Path, kind: str, small: bool) -> int:
    """A random-init model of ``kind`` saved at ``path`` with its tokenizer; returns its context length."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    if kind == "bert-base":
        n_ctx = 64 if small else 512
        cfg = BertConfig(vocab_size=VOCAB, max_position_embeddings=n_ctx)
        if small:
            cfg.update(
                dict(
                    hidden_size=64,
                    num_hidden_layers=12,
                    num_attention_heads=4,
                    intermediate_size=128,
                )
            )
        BertModel(cfg).save_pretrained(path)
    else:
        n_ctx = 128 if small else 2048
        width, heads = (64, 4) if small else (2048, 16)
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=width,
            intermediate_size=width * 11 // 4,
            num_hidden_layers=8,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=n_ctx,
        )
        LlamaModel(cfg).save_pretrained(path)
    tokenizer(path, n_ctx)
    return n_ctx


def corpus(path: Path, tokens: int, n_ctx: int) -> None:
    """JSONL of texts of ``n_ctx - 2`` random words (``n_ctx`` tokens each) until ``tokens`` tokens."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(-(-tokens // n_ctx)):
            words = " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(n_ctx - 2))
            f.write(json.dumps({"id": f"t{i}", "text": words, "label": "ab"[i % 2]}) + "\n")


def bare_forward(
    store: str, model_dir: str, layers: list[int], device: str, batch_size: int, unit_rows: int
) -> float:
    """Seconds of the forward passes of every unit's batches (the same as extract's), nothing else."""
    import actstore
    from actstore.models.loading import load_model, resolve_dtype
    from actstore.models.taps import LayerTap
    from actstore.store.forward import UnitIndex, packed_batches

    st = actstore.open_store(store)
    tk = st.tokenization()
    loaded = load_model(model_dir, device, resolve_dtype("auto", device))
    tap = LayerTap(loaded, layers)
    index = UnitIndex(st.loc, tk.key, tk.n_tokens, unit_rows)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    first = min(unit_rows, tk.n_tokens)
    for _ in packed_batches(tap, index.samples(0, first), 0, first, batch_size, device):
        break  # warm-up
    sync()
    t0 = time.perf_counter()
    for u0, u1 in index.bounds(0):
        for _batch in packed_batches(tap, index.samples(u0, u1), u0, u1, batch_size, device):
            pass
    sync()
    return time.perf_counter() - t0


def extract_table(kind: str, args: argparse.Namespace, tmp: Path) -> tuple[list[dict], str]:
    """One row per codec; returns them and the store (its int8 arrays kept for the SAE runs)."""
    from null_model import timing_units

    from actstore.data.corpora import DataConfig
    from actstore.store import extract as extract_mod
    from actstore.store.config import ExtractConfig

    mdir = tmp / kind
    n_ctx = model(mdir, kind, args.small)
    layers = [3, 6, 12] if kind == "bert-base" else [2, 4, 6]
    tokens = int(float(args.bert_tokens if kind == "bert-base" else args.llama_tokens))
    data = tmp / f"{kind}.jsonl"
    corpus(data, tokens, n_ctx)
    store = str(tmp / f"{kind}.zarr")
    batch = 32 if kind == "bert-base" else 8
    rows = []
    with timing_units() as timed:
        base = dict(
            model=str(mdir),
            data=DataConfig(str(data)),
            layers=layers,
            batch_size=batch,
            device=args.device,
            max_length=n_ctx,
        )
        extract_mod.extract(
            store,
            ExtractConfig(codec="fp16", name="tokenize", **{**base, "layers": [0]}),
            progress=False,
        )
        bare_s = 0.0
        for codec in args.codecs.split(","):
            timed.clear()
            key = f"{kind}-{codec}"
            res = extract_mod.extract(
                store, ExtractConfig(codec=codec, name=key, **base), progress=False
            )
            secs, n = timed[0], res.rows_written
            if not bare_s:  # after the first extraction (warm), over its units
                unit_rows = json.loads(
                    (Path(store) / "models" / key / f"layer_{layers[0]}" / "zarr.json").read_text()
                )
                bare_s = bare_forward(
                    store,
                    str(mdir),
                    layers,
                    args.device,
                    batch,
                    unit_rows["attributes"]["actstore"]["unit_rows"],
                )
            rows.append(
                dict(
                    model=kind,
                    codec=codec,
                    tokens=n,
                    extract_tok_s=n / secs,
                    bare_tok_s=n / bare_s,
                    ratio=bare_s / secs,
                )
            )
            print(
                f"  {kind} {codec}: extract {n / secs:,.0f} tok/s, bare forward {n / bare_s:,.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )
            if not (kind == "bert-base" and codec == "int8"):
                shutil.rmtree(Path(store) / "models" / key, ignore_errors=True)
                shutil.rmtree(Path(store) / "units" / "models" / key, ignore_errors=True)
    return rows, store


SPARSIFY_GPU = r"""
import json, sys, time
import numpy as np, torch
from sparsify import SparseCoder, SparseCoderConfig
args = json.loads(sys.argv[1])
torch.manual_seed(0)
x = torch.from_numpy(np.load(args["rows"])).to(args["device"])  # (n, d_in) float32 on the device
sae = SparseCoder(x.shape[1], SparseCoderConfig(k=args["k"], num_latents=args["d_sae"]), device=args["device"])
opt = torch.optim.Adam(sae.parameters(), lr=args["lr"])
sae.b_dec.data = x[: args["batch"]].mean(0)
def steps(n_steps):
    for i in range(n_steps):
        b0 = (i * args["batch"]) % (x.shape[0] - args["batch"] + 1)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x[b0 : b0 + args["batch"]])
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
steps(5)
sync = torch.cuda.synchronize if args["device"].startswith("cuda") else (lambda: None)
sync()
t0 = time.perf_counter()
n_steps = args["tokens"] // args["batch"]
steps(n_steps)
sync()
print(json.dumps({"tokens": n_steps * args["batch"], "seconds": time.perf_counter() - t0}))
"""


def sae_table(store: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    """actstore topk / batchtopk and sparsify on bert-base layer 6 (int8) at the same shape and budget."""
    import actstore
    from actstore.sae.config import TrainConfig
    from actstore.sae.recipe import adam_lr
    from actstore.sae.train import train_sae

    tokens = int(float(args.sae_tokens))
    d_sae, k, batch = (256, 8, 256) if args.small else (12288, 32, 4096)
    rows = []
    for arch in ("topk", "batchtopk"):
        cfg = TrainConfig(
            model="bert-base-int8",
            layer=6,
            arch=arch,
            d_sae=d_sae,
            k=k,
            tokens=tokens,
            batch_size=batch,
            device=args.device,
            name=f"gpu-{arch}",
        )
        res = train_sae(store, cfg, progress=False)
        loop = res.seconds - res.eval_seconds
        rows.append(
            dict(
                tool="actstore",
                arch=arch,
                tok_s=res.tokens / loop,
                fvu=(res.metrics.get("eval") or {}).get("fvu"),
            )
        )
        print(f"  actstore {arch}: {res.tokens / loop:,.0f} tok/s", file=sys.stderr, flush=True)
    if not args.no_sparsify:
        from bench.bench_peers import run_peer

        x = actstore.open_store(store).activations("bert-base-int8", 6)
        npy = tmp / "rows.npy"
        np.save(npy, x[: min(len(x), 1_000_000)])
        lr = adam_lr(tokens)
        out = run_peer(
            sys.executable,
            SPARSIFY_GPU,
            dict(
                rows=str(npy),
                device=args.device,
                k=k,
                d_sae=d_sae,
                batch=batch,
                lr=lr,
                tokens=tokens,
            ),
        )
        if out:
            rows.append(
                dict(
                    tool="sparsify (Adam, rows in GPU memory)",
                    arch="topk",
                    tok_s=out["tokens"] / out["seconds"],
                    fvu=None,
                )
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--small", action="store_true", help="Toy sizes (to check the script on a CPU)."
    )
    ap.add_argument("--bert-tokens", default="4e6")
    ap.add_argument("--llama-tokens", default="1e6")
    ap.add_argument("--codecs", default="fp16,bf16,int8")
    ap.add_argument("--sae-tokens", default="3e7")
    ap.add_argument("--no-sparsify", action="store_true")
    args = ap.parse_args()
    if args.small:
        args.bert_tokens, args.llama_tokens, args.sae_tokens = "2e4", "1e4", "2e4"
    name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or "cpu"
    )
    tmp = Path(tempfile.mkdtemp(prefix="actstore-gpu-", dir=os.environ.get("ACTSTORE_BENCH_DIR")))
    try:
        ext, store = [], ""
        for kind in ("llama-shape", "bert-base"):  # bert last: its int8 rows feed the SAE runs
            rows, store_k = extract_table(kind, args, tmp)
            ext += rows
            store = store_k if kind == "bert-base" else store
        saes = sae_table(store, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"GPU check: {name}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print(
        "| model | codec | tokens | extract tok/s | bare bf16 forward tok/s | extract / forward |"
    )
    print("|---|---|---|---|---|---|")
    for r in ext:
        print(
            f"| {r['model']} | {r['codec']} | {r['tokens']:,} | {r['extract_tok_s']:,.0f} | {r['bare_tok_s']:,.0f} | "
            f"{r['ratio']:.2f} |"
        )
    print("| SAE trainer | arch | tok/s | held-out FVU |")
    print("|---|---|---|---|")
    for r in saes:
        fvu = f"{r['fvu']:.3f}" if r["fvu"] is not None else "-"
        print(f"| {r['tool']} | {r['arch']} | {r['tok_s']:,.0f} | {fvu} |")


if __name__ == "__main__":
    main()
