"""A fine-tune saved by someone else's trainer shares its base model's token index (issue 11, item 1)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
import zarr
from helpers import reference_hidden_states, stored_by_sample

import actstore
from actstore.data.corpora import DataConfig
from actstore.models.loading import tokenizer_hash, tokenizer_identity
from actstore.models.names import resolve_model
from actstore.store.config import ExtractConfig
from actstore.store.extract import extract

TEXTS = [
    "I love this movie!",
    "The plot was dull, the acting worse, and the ending made no sense at all.",
    "Quarterly profits rose 5% at the bank, beating forecasts.",
    "Unbelievably good soundtrack.",
]


def test_minilm_and_its_real_finetune_share_one_token_index(tmp_path):
    from transformers import AutoTokenizer

    a, b = (
        AutoTokenizer.from_pretrained(resolve_model("bundled:minilm")),
        AutoTokenizer.from_pretrained(resolve_model("bundled:minilm-sre")),
    )
    # saved runtime state differs (truncation 128 vs 256, padding)
    assert tokenizer_hash(a) != tokenizer_hash(b)
    assert tokenizer_identity(a) == tokenizer_identity(b)  # ... the token ids do not
    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(json.dumps({"id": str(i), "text": t}) for i, t in enumerate(TEXTS)) + "\n"
    )
    store = str(tmp_path / "s.zarr")
    for model in ("bundled:minilm", "bundled:minilm-sre"):
        extract(
            store,
            ExtractConfig(model, DataConfig(str(data)), [3, 6], codec="fp32", device="cpu"),
            progress=False,
        )
    st = actstore.open_store(store)
    assert len(st.tokenization_keys()) == 1 and sorted(st.models) == ["minilm", "minilm-sre"]
    # an independent forward pass
    ref = reference_hidden_states(resolve_model("bundled:minilm-sre"), TEXTS)
    for layer in (3, 6):
        for got, want in zip(stored_by_sample(st, "minilm-sre", layer), ref, strict=True):
            np.testing.assert_allclose(got, want[layer], atol=1e-4, rtol=0)


def test_save_pretrained_after_changing_model_max_length(tiny_store, tiny_bert_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    tok(
        ["a trainer's batch"], truncation=True, max_length=17, padding="max_length"
    )  # leaves runtime state behind
    tok.model_max_length = 64
    model = AutoModel.from_pretrained(tiny_bert_dir)
    with torch.no_grad():  # "fine-tuned": other weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ft = tmp_path / "ft"
    model.save_pretrained(ft)
    tok.save_pretrained(ft)
    saved = json.loads((ft / "tokenizer.json").read_text())
    assert saved["truncation"] is not None or saved["padding"] is not None
    st = actstore.open_store(tiny_store)
    before = st.tokenization_keys()
    extract(
        tiny_store,
        ExtractConfig(
            str(ft),
            DataConfig(st.tokenization().attrs.data["source"]),
            [2],
            name="ft",
            codec="fp32",
            chunk_rows=64,
            device="cpu",
        ),
        progress=False,
    )
    st = actstore.open_store(tiny_store)
    assert st.tokenization_keys() == before and st.model_info("ft").tokenization == before[0]
    texts = st.samples()["text"].to_list()
    ref = reference_hidden_states(str(ft), texts, max_length=st.tokenization().attrs.max_length)
    for got, want in zip(stored_by_sample(st, "ft", 2), ref, strict=True):
        np.testing.assert_allclose(got, want[2], atol=1e-5, rtol=0)


def test_stores_made_before_accept_the_same_models(tiny_store, tiny_bert_dir, tmp_path):
    """A tokenization without tokenizer_ids_sha256 (made before it existed) still takes the tokenizer that made it."""
    st = actstore.open_store(tiny_store)
    key = st.tokenization_keys()[0]
    grp = zarr.open_group(tiny_store, path=f"tokenizations/{key}", mode="r+")
    attrs = dict(grp.attrs["actstore"])
    attrs.pop("tokenizer_ids_sha256", None)
    grp.attrs["actstore"] = attrs
    old = tmp_path / "old.zarr"
    shutil.copytree(tiny_store, old)
    extract(
        str(old),
        ExtractConfig(
            tiny_bert_dir,
            DataConfig(attrs["data"]["source"]),
            [1],
            name="again",
            codec="fp32",
            device="cpu",
        ),
        progress=False,
    )
    assert actstore.open_store(str(old)).tokenization_keys() == [key]
