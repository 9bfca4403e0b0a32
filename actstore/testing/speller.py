"""A model that spells by construction: the ground truth of the first-letter absorption evaluation.

A one-layer BERT with the MiniLM (uncased WordPiece) tokenizer whose embedding of every whole alphabetic word is its
first letter's direction ``e_letter`` (``hidden_states[0]``, after the embedding LayerNorm, reads it), and whose
other tokens share one "junk" direction. Some ``s`` words also carry a group direction ``u_j`` (``per_group`` words
per group): a feature that co-occurs with *starts with S*, as a token's identity does in a real model. An SAE of
this layer can keep *starts with S* as its own latent and give each group one more, or absorb it: a latent for
``e_s + u_j`` that fires instead of the S latent (Chanin et al. 2024). All directions are orthonormal and zero-mean,
so the LayerNorm only rescales them.

Used by ``tests/test_absorption.py`` (with a hand-built absorbing SAE) and ``bench/bench_absorption.py`` (SAEs
trained on a corpus through the model).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from actstore.analysis.absorption import LETTERS, alpha_vocab


class Speller(NamedTuple):
    """The model written, and its planted directions."""

    path: str
    """The model's directory (weights and tokenizer)."""
    letters: np.ndarray
    """``(26, d_model)`` unit directions, one per first letter."""
    groups: np.ndarray
    """``(n_groups, d_model)`` unit directions, each carried by ``per_group`` s words."""
    absorbed: list[str]
    """The s words that carry a group direction (group ``i // per_group`` for the i-th)."""


def build_speller(
    out: str | Path, tokenizer_path: str, d_model: int = 64, n_groups: int = 30, per_group: int = 20,
    noise: float = 0.01, seed: int = 0, absorbed: list[str] | None = None,
) -> Speller:  # fmt: skip
    """Write the speller to ``out`` (see the module docstring): word embeddings ``3 e_letter`` (``+ 3 u_j`` for the
    absorbed s words: ``absorbed``, in groups of ``per_group`` in order, or a seeded draw), other tokens ``3 g``,
    each plus ``noise`` per dimension; positions and token types zero."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    vocab = alpha_vocab(tok)
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((d_model, 27 + n_groups))
    q, _ = np.linalg.qr(
        basis - basis.mean(0)
    )  # orthonormal, each zero-mean (the LayerNorm keeps it)
    e, junk, u = q[:, :26], q[:, 26], q[:, 27:]  # (d, 26), (d,), (d, n_groups)
    s_words = np.flatnonzero(vocab.letters == LETTERS.index("s"))
    if absorbed is None:
        chosen = rng.choice(s_words, n_groups * per_group, replace=False)
    else:
        index = {w: i for i, w in enumerate(vocab.words)}
        chosen = np.asarray([index[w] for w in absorbed[: n_groups * per_group]])
        if (
            len(chosen) < n_groups * per_group
            or (vocab.letters[chosen] != LETTERS.index("s")).any()
        ):
            raise ValueError(
                f"absorbed needs {n_groups * per_group} whole s words of the vocabulary"
            )
    emb = 3 * np.tile(junk, (len(tok), 1)) + noise * rng.standard_normal((len(tok), d_model))
    emb[vocab.ids] = 3 * e[:, vocab.letters].T + noise * rng.standard_normal(
        (len(vocab.ids), d_model)
    )
    for j, w in enumerate(chosen):
        emb[vocab.ids[w]] += 3 * u[:, j // per_group]
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=d_model, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)  # fmt: skip
    model = BertModel(cfg)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.copy_(torch.from_numpy(emb).float())
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Speller(str(out), e.T.copy(), u.T.copy(), [vocab.words[w] for w in chosen])
