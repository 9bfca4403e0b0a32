"""Shared fixtures: tiny real models, a small corpus, and a small real store."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

WORDS = [
    "the",
    "movie",
    "was",
    "great",
    "wonderful",
    "terrible",
    "awful",
    "boring",
    "plot",
    "actor",
    "actress",
    "music",
    "scene",
    "film",
    "story",
    "love",
    "hate",
    "good",
    "bad",
    "excellent",
    "poor",
    "funny",
    "sad",
    "long",
    "short",
    "ending",
    "beginning",
    "director",
    "camera",
]


def minilm_path() -> str:
    from actstore.models.names import resolve_model

    return resolve_model("bundled:minilm")


def make_texts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(3, 40)
        label = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(WORDS) for _ in range(k)] + (["great"] if label == "pos" else ["awful"])
        rows.append({"id": f"s{i}", "text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A random 3-layer, 32-wide BERT with the real MiniLM (uncased WordPiece) tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> str:
    """40 short labelled texts as JSONL."""
    p = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in make_texts(40)) + "\n")
    return str(p)


@pytest.fixture(scope="session")
def tiny_store_ro(tmp_path_factory, tiny_bert_dir, corpus_file) -> str:
    """A store of the tiny BERT at all layers (fp32, 64-row shards of 16-row chunks). Do not write to it: use ``tiny_store``."""
    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    path = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    cfg = ExtractConfig(
        model=tiny_bert_dir,
        data=DataConfig(corpus_file),
        layers="all",
        name="tiny",
        codec="fp32",
        chunk_rows=64,
        inner_rows=16,
        batch_size=8,
        device="cpu",
    )
    extract(str(path), cfg, progress=False)
    return str(path)


@pytest.fixture()
def tiny_store(tmp_path, tiny_store_ro) -> str:
    """A private writable copy of the tiny store."""
    dst = tmp_path / "tiny.zarr"
    shutil.copytree(tiny_store_ro, dst)
    return str(dst)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port, with credentials and endpoint in the environment."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="team")
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def clf_store(tmp_path_factory, tiny_bert_dir, corpus_file):
    """A tiny random BERT classifier (labels neg/pos) saved with its head, extracted at layer 2."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    d = tmp_path_factory.mktemp("clf")
    torch.manual_seed(1)
    labels = {"id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}}
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
        **labels,
    )
    BertForSequenceClassification(cfg).save_pretrained(d / "model")
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(d / "model")
    ecfg = ExtractConfig(
        model=str(d / "model"),
        data=DataConfig(corpus_file),
        layers=[2],
        name="clf",
        codec="fp32",
        chunk_rows=64,
        batch_size=8,
        device="cpu",
    )
    extract(str(d / "s.zarr"), ecfg, progress=False)
    return str(d / "s.zarr"), str(d / "model")


@pytest.fixture(scope="session")
def lm_store_ro(tmp_path_factory, corpus_file) -> tuple[str, str]:
    """``(store, model dir)``: a tiny random GPT-2 saved with its LM head, extracted at layer 1. Do not write to the
    store: copy it."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract

    d = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=30522, n_embd=32, n_layer=3, n_head=2, n_positions=128)
    ).save_pretrained(d / "model")
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(d / "model")
    cfg = ExtractConfig(model=str(d / "model"), data=DataConfig(corpus_file), layers=[1], name="lm", codec="fp32",
                        chunk_rows=64, batch_size=8, device="cpu")  # fmt: skip
    extract(str(d / "s.zarr"), cfg, progress=False)
    return str(d / "s.zarr"), str(d / "model")


@pytest.fixture()
def one_thread():
    """Small matmuls run fastest on one thread (and do not fight the other tests' processes)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
