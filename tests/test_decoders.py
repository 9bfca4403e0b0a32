"""Issue 16: decoder LMs at their scale - weights in bf16/fp16, inputs past 512 tokens, long samples in context windows.

Tiny random-init GPT-2, GPT-NeoX (Pythia) and Llama configs with the MiniLM tokenizer; each stored row is checked
against a fresh ``transformers`` forward pass of the same dtype (ground truth).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.data.corpora import DataConfig
from actstore.errors import ConfigError
from actstore.store.config import ExtractConfig
from actstore.store.extract import extract
from actstore.store.tokenize import window_of

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _decoder(kind: str, d, n_positions: int = 1100) -> str:
    from conftest import minilm_path
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2Model,
        GPTNeoXConfig,
        GPTNeoXModel,
        LlamaConfig,
        LlamaModel,
    )

    torch.manual_seed(0)
    if kind == "gpt2":
        net = GPT2Model(
            GPT2Config(vocab_size=30522, n_embd=32, n_layer=3, n_head=2, n_positions=n_positions)
        )
    elif kind == "neox":
        net = GPTNeoXModel(
            GPTNeoXConfig(
                vocab_size=30522,
                hidden_size=32,
                num_hidden_layers=3,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=n_positions,
            )
        )
    else:
        net = LlamaModel(
            LlamaConfig(
                vocab_size=30522,
                hidden_size=32,
                num_hidden_layers=3,
                num_attention_heads=2,
                num_key_value_heads=1,
                intermediate_size=64,
                max_position_embeddings=n_positions,
            )
        )
    net.save_pretrained(d)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory) -> str:
    """6 texts of 150 to 1,400 words (the longest well past 512 tokens)."""
    rng = random.Random(0)
    words = "the movie plot actor scene story bank market profit team match goal song album river city night".split()  # noqa: SIM905
    p = tmp_path_factory.mktemp("long") / "long.jsonl"
    lens = [150, 1400, 300, 900, 40, 700]
    p.write_text(
        "\n".join(
            json.dumps({"id": str(i), "text": " ".join(rng.choice(words) for _ in range(n))})
            for i, n in enumerate(lens)
        )
        + "\n"
    )
    return str(p)


def _reference(model_dir: str, ids: list[int], dtype: str) -> tuple[np.ndarray, ...]:
    """hidden_states of one input (batch of one, no padding) with the weights in ``dtype``."""
    from transformers import AutoModel

    net = AutoModel.from_pretrained(model_dir).eval().to(DTYPES[dtype])
    with torch.no_grad():
        hs = net(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return tuple(h[0].float().numpy() for h in hs)


@pytest.mark.parametrize(
    ("kind", "dtype"), [("gpt2", "bf16"), ("neox", "fp16"), ("llama", "bf16"), ("llama", "fp32")]
)
def test_decoder_lms_in_their_dtype_past_512_tokens(tmp_path, long_corpus, kind, dtype):
    d = _decoder(kind, tmp_path / kind)
    store = str(tmp_path / "s.zarr")
    r = CliRunner().invoke(
        main,
        [
            "extract",
            store,
            "--model",
            d,
            "--data",
            long_corpus,
            "--layers",
            "0,2,3",
            "--name",
            kind,
            "--dtype",
            dtype,
            "--max-length",
            "1024",
            "--codec",
            "fp32",
            "--batch-size",
            "2",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    st = actstore.open_store(store)
    assert st.model_info(kind).dtype == dtype and st.tokenization().attrs.max_length == 1024
    first, n_tok = st.tokenization().sample_rows()
    assert n_tok.max() == 1024  # the 1,400-word text, truncated at 1,024 tokens: past BERT's 512
    ids = np.asarray(st.tokenization().array("token_id")[:], dtype=np.int64)
    # batch of 2 pads the shorter sample; bf16/fp16 padding changes the arithmetic a little, so compare closely
    tol = {"fp32": 1e-5, "fp16": 2e-2, "bf16": 6e-2}[dtype]
    for s in (1, 3):
        ref = _reference(d, ids[first[s] : first[s] + n_tok[s]].tolist(), dtype)
        for layer in (0, 2, 3):
            got = st.activations(kind, layer)[int(first[s]) : int(first[s] + n_tok[s])]
            np.testing.assert_allclose(got, ref[layer], atol=tol, rtol=tol)


def test_windows_cover_every_token_once_from_its_first_window(tmp_path, long_corpus):
    d = _decoder("gpt2", tmp_path / "gpt2", n_positions=64)
    store = str(tmp_path / "w.zarr")
    window, stride = 48, 32
    cfg = ExtractConfig(
        d,
        DataConfig(long_corpus),
        "0,1,3",
        name="gpt2",
        window=window,
        stride=stride,
        codec="fp32",
        batch_size=3,
        unit_rows=512,
        chunk_rows=256,
    )
    extract(store, cfg, progress=False)
    st = actstore.open_store(store)
    tk = st.tokenization()
    assert (tk.attrs.window, tk.attrs.stride, tk.attrs.max_length) == (window, stride, None)
    first, n_tok = tk.sample_rows()
    assert n_tok.max() > 1400  # no truncation: every token of the longest sample is a row
    ids = np.asarray(tk.array("token_id")[:], dtype=np.int64)
    toks = st.tokens()
    assert "window" in toks.columns
    np.testing.assert_array_equal(
        toks["window"].to_numpy(), window_of(toks["position"].to_numpy(), window, stride)
    )
    assert actstore.sql(st, 'SELECT max("window") AS w FROM tokens')["w"][0] == toks["window"].max()
    for s in range(len(first)):
        sample_ids = ids[first[s] : first[s] + n_tok[s]]
        want = {layer: np.empty((n_tok[s], 32), np.float32) for layer in (0, 1, 3)}
        k = 0
        while k == 0 or k * stride + window - stride < n_tok[s]:  # every window that owns a token
            b = k * stride
            ref = _reference(d, sample_ids[b : b + window].tolist(), "fp32")
            own = 0 if k == 0 else window - stride
            for layer in want:
                want[layer][b + own : b + window] = ref[layer][own:]
            k += 1
        for layer in want:
            got = st.activations("gpt2", layer)[int(first[s]) : int(first[s] + n_tok[s])]
            np.testing.assert_allclose(got, want[layer], atol=1e-5, rtol=1e-5)


def test_window_and_length_limits_are_checked(tmp_path, long_corpus):
    d = _decoder("gpt2", tmp_path / "gpt2", n_positions=64)
    with pytest.raises(ConfigError, match="--window 128 exceeds"):
        extract(
            str(tmp_path / "a.zarr"),
            ExtractConfig(d, DataConfig(long_corpus), "1", window=128),
            progress=False,
        )
    with pytest.raises(ConfigError, match="--max-length 100 exceeds"):
        extract(
            str(tmp_path / "b.zarr"),
            ExtractConfig(d, DataConfig(long_corpus), "1", max_length=100),
            progress=False,
        )
    with pytest.raises(ConfigError, match="--stride needs --window"):
        ExtractConfig(d, DataConfig(long_corpus), "1", stride=8)
    with pytest.raises(ConfigError, match="unknown --dtype"):
        ExtractConfig(d, DataConfig(long_corpus), "1", dtype="int4")
