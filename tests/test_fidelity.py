"""Spliced fidelity (``metrics.json``'s ``task``): a classifier's KL of class probabilities and a decoder LM's
next-token loss recovered, each against a computation by hand with the splice placed by hand; an SAE that
reconstructs exactly recovers everything."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import actstore
from actstore.sae.config import SAEConfig, TrainConfig
from actstore.sae.model import SAE
from actstore.sae.train import train_sae


def _exact(st, model: str, layer: int, d: int) -> SAE:
    """An SAE that reconstructs exactly: h = [relu(x), relu(-x)], x_hat = h[:d] - h[d:]."""
    sae = SAE(SAEConfig("relu-l1", d, 2 * d, model=model, layer=layer,
                        tokenization=st.model_tokenization(model).key))  # fmt: skip
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _hand_splice(block, fn):
    """Replace block's input hidden state by ``fn(h)`` (a hook placed by hand)."""

    def pre(_m, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return block.register_forward_pre_hook(pre, with_kwargs=True)


def test_a_classifiers_kl_equals_one_computed_by_hand(clf_store):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from actstore.sae.fidelity import task_accuracy

    path, model_dir = clf_store
    st = actstore.open_store(path, writable=True)
    res = train_sae(st, TrainConfig(model="clf", layer=2, d_sae=64, epochs=1, batch_size=64, device="cpu",
                                    eval_fraction=0.3, name="kl"), progress=False)  # fmt: skip
    task = res.metrics["task"]
    sae = res.sae.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    samples = st.samples().filter(
        st.samples()["sample"].is_in([int(s) for s in res.split.eval_samples])
    )
    enc = tok(
        samples["text"].to_list(),
        padding=True,
        truncation=True,
        max_length=128,
        return_tensors="pt",
    )
    with torch.no_grad():
        clean = model(**enc).logits.log_softmax(-1)
        h = _hand_splice(
            model.bert.encoder.layer[2], lambda x: sae(x.reshape(-1, 32)).x_hat.reshape(x.shape)
        )
        spliced = model(**enc).logits.log_softmax(-1)
        h.remove()
        h = _hand_splice(model.bert.encoder.layer[2], torch.zeros_like)
        zero = model(**enc).logits.log_softmax(-1)
        h.remove()
    kl = float((clean.exp() * (clean - spliced)).sum(-1).mean())
    kl_zero = float((clean.exp() * (clean - zero)).sum(-1).mean())
    assert task["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert task["kl_zero_ablated"] == pytest.approx(kl_zero, rel=1e-3, abs=1e-6)
    assert task["kl_recovered"] == pytest.approx(1 - kl / kl_zero, rel=1e-3)
    same = task_accuracy(st, _exact(st, "clf", 2, 32), res.split.eval_samples)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["kl_recovered"] == pytest.approx(
        1.0, abs=1e-5
    )


@pytest.fixture()
def lm_store(tmp_path, lm_store_ro):
    """A private copy of the tiny GPT-2's store, and its model directory."""
    import shutil

    shutil.copytree(lm_store_ro[0], tmp_path / "s.zarr")
    return str(tmp_path / "s.zarr"), lm_store_ro[1]


def test_a_decoder_lms_loss_recovered_equals_one_computed_by_hand(lm_store):
    from transformers import AutoModelForCausalLM

    from actstore.sae.fidelity import lm_loss_recovered

    path, model_dir = lm_store
    st = actstore.open_store(path, writable=True)
    res = train_sae(st, TrainConfig(model="lm", layer=1, arch="topk", k=4, d_sae=64, epochs=1, batch_size=64,
                                    device="cpu", eval_fraction=0.3, name="lm"), progress=False)  # fmt: skip
    task = res.metrics["task"]
    assert task is not None and task["n_samples"] == len(res.split.eval_samples)
    sae = res.sae.eval()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tk = st.tokenization()
    first, n_tok = tk.sample_rows()
    total = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    count = 0
    fns = {
        "clean": None,
        "sae": lambda x: sae(x.reshape(-1, 32)).x_hat.reshape(x.shape),
        "zero": torch.zeros_like,
    }
    for s in res.split.eval_samples:  # one unpadded sample at a time, the splice placed by hand
        ids = torch.tensor([tk.token_ids(int(first[s]), int(first[s] + n_tok[s]))])
        for name, fn in fns.items():
            h = _hand_splice(model.transformer.h[1], fn) if fn is not None else None
            with torch.no_grad():
                out = model(input_ids=ids, labels=ids)
            if h is not None:
                h.remove()
            total[name] += float(out.loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    ce = {k: v / count for k, v in total.items()}
    assert task["ce_loss"] == pytest.approx(ce["clean"], rel=1e-4)
    assert task["ce_loss_with_sae"] == pytest.approx(ce["sae"], rel=1e-4)
    assert task["ce_loss_zero_ablated"] == pytest.approx(ce["zero"], rel=1e-4)
    want = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"])
    assert task["ce_recovered"] == pytest.approx(want, rel=1e-3)
    same = lm_loss_recovered(st, _exact(st, "lm", 1, 32), res.split.eval_samples)
    assert same["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert np.isfinite(task["ce_recovered"])
