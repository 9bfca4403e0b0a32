"""Extraction ground truth: stored rows == a fresh transformers forward pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import reference_hidden_states, stored_by_sample
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actstore
from actstore.data.corpora import DataConfig
from actstore.errors import ConfigError, ModelError, StoreError, TokenizerMismatchError
from actstore.format import codecs
from actstore.models.loading import load_model
from actstore.models.taps import LayerTap
from actstore.store.config import ExtractConfig, parse_layers
from actstore.store.extract import extract


def test_fp32_rows_equal_fresh_forward(tiny_store_ro, tiny_bert_dir):
    st_ = actstore.open_store(tiny_store_ro)
    texts = st_.samples()["text"].to_list()
    ref = reference_hidden_states(tiny_bert_dir, texts)
    for layer in range(4):
        got = stored_by_sample(st_, "tiny", layer)
        for g, r in zip(got, ref, strict=True):
            assert g.shape == r[layer].shape
            np.testing.assert_allclose(g, r[layer], atol=1e-5, rtol=0)
    toks = st_.tokens()
    assert toks.height == st_.tokenization().n_tokens == st_.activations("tiny", 0).shape[0]
    # special tokens kept, padding dropped
    first = toks.filter(toks["position"] == 0)["token"].unique().to_list()
    assert first == ["[CLS]"]
    import polars as pl

    last = toks.group_by("sample").agg(pl.col("token").sort_by("position").last())["token"]
    assert (last == "[SEP]").all()


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8"])
def test_codecs_against_forward_minilm(tmp_path, codec):
    """The real MiniLM: each codec's rows against a fresh forward pass."""
    texts = [
        "I love this movie!",
        "The plot was dull, the acting worse.",
        "Quarterly profits rose 5% at the bank.",
    ]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"id": str(i), "text": t}) for i, t in enumerate(texts)))
    store = tmp_path / "s.zarr"
    extract(
        str(store),
        ExtractConfig("bundled:minilm", DataConfig(str(p)), [0, 3, 6], codec=codec, device="cpu"),
        progress=False,
    )
    from conftest import minilm_path

    ref = reference_hidden_states(minilm_path(), texts)
    st_ = actstore.open_store(str(store))
    for layer in (0, 3, 6):
        got = np.concatenate(stored_by_sample(st_, "minilm", layer))
        want = np.concatenate([r[layer] for r in ref])
        if codec in ("fp16", "bf16"):
            # half a unit in the last place, relative
            eps = 2.0**-11 if codec == "fp16" else 2.0**-8
            assert np.all(np.abs(got - want) <= np.abs(want) * eps + 1e-5)
        else:
            cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
            assert cos.mean() >= 0.9999, cos.mean()


def test_gpt2_decoder_and_truncated_pass(tmp_path, tiny_bert_dir, corpus_file):
    """A decoder-only LM: stored rows match hidden_states, including the final (ln_f) layer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    d = tmp_path / "gpt2"
    torch.manual_seed(1)
    GPT2Model(
        GPT2Config(vocab_size=30522, n_embd=32, n_layer=4, n_head=2, n_positions=128)
    ).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(d)
    store = tmp_path / "g.zarr"
    extract(
        str(store),
        ExtractConfig(
            str(d), DataConfig(corpus_file, limit=8), "0,2,4", batch_size=3, codec="fp32"
        ),
        progress=False,
    )
    st_ = actstore.open_store(str(store))
    ref = reference_hidden_states(str(d), st_.samples()["text"].to_list())
    for layer in (0, 2, 4):
        for g, r in zip(stored_by_sample(st_, "gpt2", layer), ref, strict=True):
            np.testing.assert_allclose(g, r[layer], atol=1e-5)


def test_blocks_above_deepest_layer_do_not_run(tiny_bert_dir):
    loaded = load_model(tiny_bert_dir)
    from actstore.models.taps import find_blocks

    calls = []
    blocks = find_blocks(loaded.model, loaded.n_layers)
    hooks = [
        b.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, b in enumerate(blocks)
    ]
    ids = torch.tensor([[101, 2023, 2003, 102]])
    LayerTap(loaded, [1])(ids, torch.ones_like(ids))
    assert calls == [0]
    calls.clear()
    LayerTap(loaded, [0, 3])(ids, torch.ones_like(ids))
    assert calls == [0, 1, 2]
    for h in hooks:
        h.remove()


def _texts_file(tmp_path: Path, lengths: list[int]) -> str:
    p = tmp_path / "ragged.jsonl"
    p.write_text(
        "\n".join(
            json.dumps({"id": f"r{i}", "text": " ".join(["word"] * n), "label": i % 3})
            for i, n in enumerate(lengths)
        )
    )
    return str(p)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lengths=st.lists(st.integers(1, 70), min_size=1, max_size=12),
    chunk_rows=st.sampled_from([8, 16, 64]),
)
def test_ragged_round_trip(tmp_path_factory, tiny_bert_dir, lengths, chunk_rows):
    """Random ragged lengths, chunks and units smaller than samples: every row lands once, in corpus order."""
    tmp = tmp_path_factory.mktemp("ragged")
    cfg = ExtractConfig(
        tiny_bert_dir,
        DataConfig(_texts_file(tmp, lengths)),
        "1,3",
        codec="fp32",
        chunk_rows=chunk_rows,
        unit_rows=chunk_rows,
        batch_size=3,
        max_length=40,
    )
    extract(str(tmp / "s.zarr"), cfg, progress=False)
    st_ = actstore.open_store(str(tmp / "s.zarr"))
    samples = st_.samples()
    expect_n = [min(n + 2, 40) for n in lengths]
    assert samples["n_tokens"].to_list() == expect_n
    assert samples["first_row"].to_list() == list(np.concatenate([[0], np.cumsum(expect_n)[:-1]]))
    assert samples["truncated"].to_list() == [n + 2 > 40 for n in lengths]
    toks = st_.tokens()
    assert toks["row"].to_list() == list(range(sum(expect_n)))
    assert toks["position"].to_list() == [p for n in expect_n for p in range(n)]
    ref = reference_hidden_states(tiny_bert_dir, samples["text"].to_list(), max_length=40)
    for layer in (1, 3):
        for g, r in zip(stored_by_sample(st_, st_.models[0], layer), ref, strict=True):
            np.testing.assert_allclose(g, r[layer], atol=1e-5)


def test_small_units_straddle_samples(tmp_path, tiny_bert_dir):
    """Units of one chunk (smaller than a sample): samples computed in two units still match."""
    lengths = [30, 5, 50, 12, 3, 60, 7]
    cfg = ExtractConfig(
        tiny_bert_dir,
        DataConfig(_texts_file(tmp_path, lengths)),
        [2],
        codec="fp32",
        chunk_rows=8,
        unit_rows=8,
        batch_size=2,
    )
    extract(str(tmp_path / "s.zarr"), cfg, progress=False)
    st_ = actstore.open_store(str(tmp_path / "s.zarr"))
    ref = reference_hidden_states(tiny_bert_dir, st_.samples()["text"].to_list())
    for g, r in zip(stored_by_sample(st_, st_.models[0], 2), ref, strict=True):
        np.testing.assert_allclose(g, r[2], atol=1e-5)


def test_second_model_rows_align_and_tokenizer_mismatch(tmp_path, tiny_store, corpus_file):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(7)
    d2 = tmp_path / "bert2"
    BertModel(
        BertConfig(
            vocab_size=30522,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=128,
        )
    ).save_pretrained(d2)
    from conftest import minilm_path
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(d2)
    before = actstore.open_store(tiny_store).tokens()
    extract(
        tiny_store,
        ExtractConfig(str(d2), DataConfig(corpus_file), "1,2", name="second", codec="fp32"),
        progress=False,
    )
    st_ = actstore.open_store(tiny_store)
    assert st_.models == ["second", "tiny"] and len(st_.tokenization_keys()) == 1
    assert st_.tokens().equals(before)
    ref = reference_hidden_states(str(d2), st_.samples()["text"].to_list())
    for g, r in zip(stored_by_sample(st_, "second", 2), ref, strict=True):
        np.testing.assert_allclose(g, r[2], atol=1e-5)

    # a model with another tokenizer: clear error, store untouched; allowed with new_tokenization
    d3 = tmp_path / "other_tok"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text(
        "\n".join(
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "great", "awful", "was"]
        )
    )
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(d3)
    BertModel(
        BertConfig(
            vocab_size=10,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=128,
        )
    ).save_pretrained(d3)
    snap = _snapshot(tiny_store)
    with pytest.raises(TokenizerMismatchError, match="--new-tokenization"):
        extract(tiny_store, ExtractConfig(str(d3), DataConfig(corpus_file), [1]), progress=False)
    assert _snapshot(tiny_store) == snap
    extract(
        tiny_store,
        ExtractConfig(str(d3), DataConfig(corpus_file), [1], new_tokenization=True, codec="fp32"),
        progress=False,
    )
    st_ = actstore.open_store(tiny_store)
    assert len(st_.tokenization_keys()) == 2
    assert st_.model_tokenization("other_tok").key != st_.model_tokenization("tiny").key
    assert st_.tokenization().key == st_.model_tokenization("tiny").key  # default stays the first


def _snapshot(path: str) -> dict[str, bytes]:
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = p.read_bytes()
    return out


def test_more_layers_later_and_rerun_is_noop(tiny_store, corpus_file, tiny_bert_dir):
    # the store has all layers of 'tiny'; a rerun writes nothing and changes nothing
    snap = _snapshot(tiny_store)
    res = extract(
        tiny_store,
        ExtractConfig(tiny_bert_dir, DataConfig(corpus_file), "all", name="tiny", codec="fp32"),
        progress=False,
    )
    assert res.rows_written == 0
    assert _snapshot(tiny_store) == snap


def test_layers_added_later(tmp_path, tiny_bert_dir, corpus_file):
    s = str(tmp_path / "s.zarr")
    extract(
        s, ExtractConfig(tiny_bert_dir, DataConfig(corpus_file), [1], codec="fp16"), progress=False
    )
    extract(
        s,
        ExtractConfig(tiny_bert_dir, DataConfig(corpus_file), [1, 3], codec="fp16"),
        progress=False,
    )
    st_ = actstore.open_store(s)
    assert st_.layers(st_.models[0]) == [1, 3]
    with pytest.raises(StoreError, match="--codec fp16"):
        extract(
            s,
            ExtractConfig(tiny_bert_dir, DataConfig(corpus_file), [1], codec="int8"),
            progress=False,
        )
    with pytest.raises(StoreError, match="one corpus"):
        extract(
            s, ExtractConfig(tiny_bert_dir, DataConfig(corpus_file, limit=3), [2]), progress=False
        )


def test_config_errors(tiny_bert_dir, corpus_file, tmp_path):
    with pytest.raises(ConfigError):
        ExtractConfig(tiny_bert_dir, DataConfig(corpus_file), "2,x")
    with pytest.raises(ConfigError):
        ExtractConfig(tiny_bert_dir, DataConfig(corpus_file), [1], codec="fp8")
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(ModelError, match="out of range"):
        extract(
            str(tmp_path / "s"),
            ExtractConfig(tiny_bert_dir, DataConfig(corpus_file), [4]),
            progress=False,
        )
    with pytest.raises(ModelError, match="cannot load model"):
        extract(
            str(tmp_path / "s"),
            ExtractConfig(str(tmp_path / "nope"), DataConfig(corpus_file), [1]),
            progress=False,
        )


def test_bert_base_shape():
    """The paper's bert-base geometry (768 wide, 12 layers), random init: layers 3/6/12 have the right shapes."""
    from transformers import BertConfig, BertModel

    from actstore.models.loading import LoadedModel

    cfg = BertConfig(vocab_size=1000)  # bert-base defaults: hidden 768, 12 layers
    model = BertModel(cfg).eval()
    loaded = LoadedModel("bert-base-random", "-", model, None, 12, 768, 512, None)
    ids = torch.randint(5, 1000, (2, 9))
    hs = LayerTap(loaded, [3, 6, 12])(ids, torch.ones_like(ids))
    assert {k: tuple(v.shape) for k, v in hs.items()} == {
        3: (2, 9, 768),
        6: (2, 9, 768),
        12: (2, 9, 768),
    }
    with torch.no_grad():
        ref = model(
            input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True
        ).hidden_states
    for k in (3, 6, 12):
        torch.testing.assert_close(hs[k], ref[k])


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(
        st.lists(st.floats(-1e4, 1e4, width=32), min_size=4, max_size=4), min_size=1, max_size=20
    ),
    codec=st.sampled_from(codecs.CODECS),
)
def test_codec_round_trip(data, codec):
    x = np.array(data, dtype=np.float32)
    enc = codecs.encode(x, codec)
    y = codecs.decode(enc.values, enc.scale, codec)
    assert y.dtype == np.float32 and y.shape == x.shape
    if codec == "fp32":
        assert np.array_equal(x, y)
    elif codec == "fp16":
        assert np.all(np.abs(x - y) <= np.abs(x) * 2**-11 + 2**-24)
    elif codec == "bf16":
        assert np.all(np.abs(x - y) <= np.abs(x) * 2**-8 + 1e-38)
    else:
        # rounded up
        assert enc.scale.dtype == np.float16 and np.all(
            enc.scale.astype(np.float32) * 127 >= np.abs(x).max(1)
        )
        assert np.all(
            np.abs(x - y) <= np.abs(x).max(1, keepdims=True) / 127 * 0.5 * (1 + 2**-10) + 1e-6
        )


# ---------------------------------------------------------------- kill -9 and resume
RUNNER = """
import sys
from actstore.data.corpora import DataConfig
from actstore.store.extract import ExtractConfig, extract
store, model, data = sys.argv[1:4]
cfg = ExtractConfig(model, DataConfig(data), "1,3", codec="fp16", chunk_rows=32, unit_rows=256, batch_size=4)
extract(store, cfg, progress=False)
"""


def _run(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", RUNNER, *args], env=env)


def _committed(store: Path, layer: int) -> int:
    meta = store / "models" / "tiny-bert" / f"layer_{layer}" / "zarr.json"
    try:
        return json.loads(meta.read_text())["attributes"]["actstore"]["committed_rows"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.slow
def test_kill_9_then_resume_is_byte_identical(tmp_path, tiny_bert_dir):
    from conftest import make_texts

    model = tmp_path / "tiny-bert"
    import shutil

    shutil.copytree(tiny_bert_dir, model)
    data = tmp_path / "big.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in make_texts(3000, seed=3)))
    ref, killed = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    assert _run([str(ref), str(model), str(data)]).wait(300) == 0
    total = json.loads((ref / "models/tiny-bert/layer_1/zarr.json").read_text())["attributes"][
        "actstore"
    ]["n_rows"]

    proc = _run([str(killed), str(model), str(data)])
    deadline = time.time() + 120
    while _committed(killed, 3) == 0 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    # a reader sees the completed prefix (by the unit markers: the attribute, written after them, may lag one unit)
    st_ = actstore.open_store(str(killed))
    acts = st_.activations("tiny-bert", 3)
    partial = len(acts)
    assert 0 < _committed(killed, 3) <= partial < total, "the run should have been killed mid-way"
    ref_acts = actstore.open_store(str(ref)).activations("tiny-bert", 3)
    assert np.array_equal(acts[:], ref_acts[:partial])

    assert _run([str(killed), str(model), str(data)]).wait(300) == 0
    for layer in (1, 3):
        a = zarr.open_array(str(killed), path=f"models/tiny-bert/layer_{layer}", mode="r")
        b = zarr.open_array(str(ref), path=f"models/tiny-bert/layer_{layer}", mode="r")
        assert np.array_equal(a[:], b[:])
        chunks_a = {
            p.relative_to(killed): p.read_bytes()
            for p in (killed / f"models/tiny-bert/layer_{layer}/c").rglob("*")
            if p.is_file()
        }
        chunks_b = {
            p.relative_to(ref): p.read_bytes()
            for p in (ref / f"models/tiny-bert/layer_{layer}/c").rglob("*")
            if p.is_file()
        }
        assert chunks_a == chunks_b
        assert a.attrs["actstore"]["committed_rows"] == total
