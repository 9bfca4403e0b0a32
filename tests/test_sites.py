"""``extract --site``: a block's MLP input, MLP output and attention output, stored as their own arrays of the same
row-aligned store; every stored row equals a hook placed by hand on the named module of tiny BERT, GPT-2 and
Llama (ground truth), and a bad site or block is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import one_line_error
from test_decoders import _decoder

import actstore
from actstore.cli import main

# by hand, per family: (module path in block i, read its input?, take element 0 of a tuple output?)
HAND = {
    "bert": {
        "mlp_in": ("intermediate", True),
        "mlp_out": ("output.dense", False),
        "attn_out": ("attention.output.dense", False),
    },
    "gpt2": {"mlp_in": ("ln_2", False), "mlp_out": ("mlp", False), "attn_out": ("attn", False)},
    "llama": {
        "mlp_in": ("post_attention_layernorm", False),
        "mlp_out": ("mlp", False),
        "attn_out": ("self_attn", False),
    },
}


def _blocks(net, kind):
    return net.encoder.layer if kind == "bert" else net.h if kind == "gpt2" else net.layers


def _by_hand(model_dir: str, kind: str, site: str, layer: int, ids: list[int]) -> np.ndarray:
    """The site's activations ``(n_tokens, d)`` of one unpadded input, from a hook on the named module."""
    from transformers import AutoModel

    net = AutoModel.from_pretrained(model_dir).eval()
    path, reads_input = HAND[kind][site]
    mod = _blocks(net, kind)[layer]
    for part in path.split("."):
        mod = getattr(mod, part)
    got = {}

    def hook(_m, args, out=None):
        v = args[0] if reads_input else out
        got["v"] = (v[0] if isinstance(v, tuple) else v)[0].detach()

    h = mod.register_forward_pre_hook(hook) if reads_input else mod.register_forward_hook(hook)
    with torch.no_grad():
        net(input_ids=torch.tensor([ids]))
    h.remove()
    return got["v"].float().numpy()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_bert_dir):
    d = tmp_path_factory.mktemp("site_models")
    return {
        "bert": tiny_bert_dir,
        "gpt2": _decoder("gpt2", d / "gpt2", n_positions=256),
        "llama": _decoder("llama", d / "llama", n_positions=256),
    }


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_every_site_row_equals_a_hook_placed_by_hand(tmp_path, corpus_file, models, kind):
    store = str(tmp_path / "s.zarr")
    for site in ("resid", "mlp_in", "mlp_out", "attn_out"):
        args = ["extract", store, "--model", models[kind], "--data", corpus_file, "--layers", "0,2"]
        args += ["--name", kind, "--site", site, "--codec", "fp32", "--batch-size", "4", "--quiet"]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
    st = actstore.open_store(store)
    assert sorted(st.models) == sorted(
        [kind, f"{kind}.attn_out", f"{kind}.mlp_in", f"{kind}.mlp_out"]
    )
    assert st.model_info(f"{kind}.mlp_out").site == "mlp_out" and st.model_info(kind).site is None
    tk = st.tokenization()
    first, n_tok = tk.sample_rows()
    ids = np.asarray(tk.array("token_id")[:], dtype=np.int64)
    for site in ("mlp_in", "mlp_out", "attn_out"):
        for layer in (0, 2):
            acts = st.activations(f"{kind}.{site}", layer)
            for s in (0, 7):
                rows = acts[int(first[s]) : int(first[s] + n_tok[s])]
                ref = _by_hand(
                    models[kind], kind, site, layer, ids[first[s] : first[s] + n_tok[s]].tolist()
                )
                np.testing.assert_allclose(
                    rows, ref, rtol=1e-4, atol=1e-4, err_msg=f"{kind} {site} {layer}"
                )
    # not the residual stream: the arrays differ from hidden_states of the same block
    assert not np.allclose(st.activations(f"{kind}.mlp_out", 2)[:50], st.activations(kind, 2)[:50])


def test_a_site_trains_and_encodes_as_a_model_does(tmp_path, corpus_file, tiny_bert_dir):
    store = str(tmp_path / "s.zarr")
    args = ["extract", store, "--model", tiny_bert_dir, "--data", corpus_file, "--layers", "1"]
    r = CliRunner().invoke(
        main, [*args, "--name", "tiny", "--site", "mlp_out", "--codec", "fp32", "--quiet"]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        main,
        ["train", store, "--model", "tiny.mlp_out", "--layer", "1", "--arch", "topk", "--k", "4",
         "--d-sae", "64", "--epochs", "1", "--device", "cpu", "--quiet"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    from actstore.sae.files import read_config, sae_names

    st = actstore.open_store(store)
    names = sae_names(st)
    assert len(names) == 1 and read_config(st, names[0]).model == "tiny.mlp_out"
    r = CliRunner().invoke(main, ["encode", store, "--sae", names[0], "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["info", store])
    assert (
        r.exit_code == 0
        and "model tiny.mlp_out:" in r.output
        and "site mlp_out of each block" in r.output
    )


def test_a_block_past_the_last_is_one_line_and_writes_no_model(
    tmp_path, corpus_file, tiny_bert_dir
):
    store = tmp_path / "s.zarr"
    args = ["extract", str(store), "--model", tiny_bert_dir, "--data", corpus_file]
    r = CliRunner().invoke(main, [*args, "--site", "mlp_out", "--layers", "3"])
    one_line_error(r, "layer 3 has no --site mlp_out", "blocks 0 to 2")
    assert not (store / "models").exists()
    r = CliRunner().invoke(main, [*args, "--site", "mlp", "--layers", "1"])
    assert (
        r.exit_code == 2
        and "'mlp' is not one of 'resid', 'mlp_in', 'mlp_out', 'attn_out'" in r.output
    )
