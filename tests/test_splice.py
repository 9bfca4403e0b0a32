"""One place for a layer's site (issue 12): ``models.splice`` edits exactly the hidden state ``LayerTap`` reads."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

from actstore.models.taps import splice


@pytest.mark.parametrize(
    "make",
    [
        lambda: GPT2Model(
            GPT2Config(vocab_size=100, n_embd=16, n_layer=3, n_head=2, n_positions=32)
        ),
        lambda: BertModel(
            BertConfig(
                vocab_size=100,
                hidden_size=16,
                num_hidden_layers=3,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=32,
            )
        ),
    ],
    ids=["gpt2-with-ln_f", "bert"],
)
def test_splice_sees_and_replaces_hidden_states(make):
    torch.manual_seed(0)
    model = make().eval()
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states  # n_layers + 1 tensors
    n = len(ref) - 1
    for layer in range(n + 1):
        seen = []
        with (
            splice(model, n, layer, lambda h, seen=seen: seen.append(h.clone()) or h),
            torch.no_grad(),
        ):
            out = model(input_ids=ids).last_hidden_state
        # the site is hidden_states[layer] (after ln_f for the last)
        torch.testing.assert_close(seen[0], ref[layer])
        torch.testing.assert_close(out, ref[-1])  # an identity splice changes nothing
    with (
        splice(model, n, n, lambda h: h * 0),
        torch.no_grad(),
    ):  # the final state itself is replaced
        assert model(input_ids=ids).last_hidden_state.abs().max() == 0
