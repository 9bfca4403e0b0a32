"""First-letter absorption (``actstore eval --evals absorption``): SAEBench's scores on hand-made cases, prompts that
read the word's own token, a planted absorbing SAE recovered end to end, and a model that cannot spell refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import minilm_path
from helpers import make_sae, one_line_error

import actstore
from actstore.analysis.absorption import (
    LETTERS,
    absorption_scores,
    alpha_vocab,
    build_prompts,
)
from actstore.analysis.probing import fit_logistic
from actstore.cli import main
from actstore.sae.files import list_saes

# ---------------------------------------------------------------- the scores, by hand


def _one(latents, main, decoder, acts, probe):
    s = absorption_scores(np.asarray([acts], float), np.asarray([latents], float), np.asarray(decoder, float),
                          np.asarray(probe, float), main)  # fmt: skip
    return float(s.fraction[0]), bool(s.full[0])


# probe along e0; latent 0 the main one (decoder e0), latent 1 an absorber (decoder (e0 + e1) / sqrt 2), latent 2
# off-probe (decoder e1)
DEC = [[1, 0], [2**-0.5, 2**-0.5], [0, 1]]


def test_the_main_latent_carrying_the_projection_is_no_absorption():
    assert _one([3.0, 0.0, 0.0], [0], DEC, [3.0, 0.0], [1, 0]) == (0.0, False)


def test_a_silent_main_latent_and_an_aligned_absorber_is_full_absorption():
    # the absorber contributes 4 * 0.707 = 2.83 of x.p = 3 (94 %)
    assert _one([0.0, 4.0, 0.0], [0], DEC, [3.0, 3.0], [1, 0]) == (1.0, True)


def test_partial_absorption_is_the_absorbers_share_of_what_main_and_absorbers_carry():
    # x.p = 4; main 1.0; absorber 4 * 0.707 = 2.83 (71 % of x.p, above 40 %); absorbed = min(2.83, 4 - 1) = 2.83
    frac, full = _one([1.0, 4.0, 0.0], [0], DEC, [4.0, 4.0], [1, 0])
    assert frac == pytest.approx(2.828427 / (2.828427 + 1.0), rel=1e-6)
    assert not full  # the main latent fired


def test_an_absorber_below_forty_percent_of_the_projection_is_no_absorption():
    # absorber 1 * 0.707 of x.p = 3: 24 %
    assert _one([0.0, 1.0, 0.0], [0], DEC, [3.0, 0.0], [1, 0]) == (0.0, False)


def test_a_latent_off_the_probe_does_not_absorb():
    # latent 2's decoder is orthogonal to the probe: it carries nothing along it
    assert _one([0.0, 0.0, 5.0], [0], DEC, [3.0, 5.0], [1, 0])[0] == 0.0


def test_contributions_are_in_the_activations_units_whatever_the_decoder_norm():
    # the same absorber with a decoder row twice as long contributes twice as much
    dec = [[1, 0], [2 * 2**-0.5, 2 * 2**-0.5], [0, 1]]
    assert _one([0.0, 1.2, 0.0], [0], dec, [3.0, 3.0], [1, 0]) == (
        1.0,
        True,
    )  # 1.2 * 1.41 = 1.70 of 3
    assert _one([0.0, 1.2, 0.0], [0], DEC, [3.0, 3.0], [1, 0]) == (
        0.0,
        False,
    )  # 0.85 of 3: 28 %, below 40 %


def test_balanced_logistic_weights_are_scikit_learns_class_weight_balanced():
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 3))
    y = (x[:, 0] + rng.standard_normal(300) > 1.2).astype(int)  # about 15 % positive
    ref = linear_model.LogisticRegression(class_weight="balanced", tol=1e-10, max_iter=10_000).fit(
        x, y
    )
    n, pos = len(y), y.sum()
    w, b = fit_logistic(
        x, y, 1.0, sample_weight=np.where(y > 0, n / (2 * pos), n / (2 * (n - pos)))
    )
    np.testing.assert_allclose(w, ref.coef_[0], rtol=1e-5, atol=1e-7)
    assert b == pytest.approx(ref.intercept_[0], rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------- words and prompts


def _bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2's kind: words carry their leading space), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    words = [
        "tartan",
        "has",
        "the",
        "first",
        "letter",
        "apple",
        "banana",
        "cherry",
        "short",
        "shore",
        "ship",
        "T",
        "A",
        "B",
        "C",
        "S",
        ":",
        "1",
        "2",
    ]
    text = [" ".join(words)] * 50 + ["\n".join(words)] * 50
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<eos>"], show_progress=False,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_each_prompt_reads_the_words_own_token(kind):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path()) if kind == "wordpiece" else _bpe_tokenizer()
    vocab = alpha_vocab(tok)
    wanted = {" short", " apple", " banana"} if kind == "bpe" else {"short", "apple", "banana"}
    pick = np.asarray([i for i, w in enumerate(vocab.words) if w in wanted])
    assert len(pick) == 3
    for icl in (0, 2):
        p = build_prompts(tok, vocab, pick, icl, np.random.default_rng(0))
        assert p.keep.all()
        got = p.input_ids[np.arange(3), p.position]
        np.testing.assert_array_equal(got, vocab.ids[pick])
        text = tok.decode(p.input_ids[0][p.attention_mask[0] > 0], skip_special_tokens=True)
        assert text.replace(" :", ":").count("has the first letter:") == icl + 1


def test_the_vocabulary_is_whole_alphabetic_words_with_their_letter():
    from transformers import AutoTokenizer

    vocab = alpha_vocab(AutoTokenizer.from_pretrained(minilm_path()))
    assert len(vocab.ids) > 10_000
    assert all(w.isalpha() and w.isascii() for w in vocab.words)
    assert all(LETTERS[c] == w[0].lower() for w, c in zip(vocab.words, vocab.letters, strict=True))
    assert "the" in vocab.words and "##ing" not in vocab.words and "[CLS]" not in vocab.words


# ---------------------------------------------------------------- a planted absorber, end to end

N_ABSORBERS = 30


def _planted(tmp_path: Path, corpus_file: str) -> tuple[str, set[str]]:
    """The speller (``actstore.testing.speller``: 600 of its s words carry one of 30 group directions) as a store of
    layer 0, and an SAE of it whose latent i < 26 is letter i, silenced by any group direction, and whose latent
    26 + j fires on group j with decoder (e_s + u_j) / sqrt 2: the absorption Chanin et al. describe. Returns the
    store and the absorbed words."""
    from actstore.data.corpora import DataConfig
    from actstore.sae.config import SAEConfig
    from actstore.sae.files import save_sae
    from actstore.sae.model import SAE
    from actstore.store.config import ExtractConfig
    from actstore.store.extract import extract
    from actstore.testing.speller import build_speller

    sp = build_speller(tmp_path / "speller", minilm_path(), n_groups=N_ABSORBERS)
    e, u = sp.letters.T, sp.groups.T  # (D, 26), (D, N_ABSORBERS)
    store = str(tmp_path / "s.zarr")
    extract(store, ExtractConfig(model=sp.path, data=DataConfig(corpus_file), layers=[0], name="speller",
                                 codec="fp32", device="cpu"), progress=False)  # fmt: skip
    st = actstore.open_store(store, writable=True)
    sae = SAE(SAEConfig(arch="relu-l1", d_in=e.shape[0], d_sae=26 + N_ABSORBERS, model="speller", layer=0,
                        tokenization=st.model_info("speller").tokenization, name="planted", norm_scale=1.0))  # fmt: skip
    w_enc = np.concatenate([e - 2 * u.sum(1, keepdims=True), u], axis=1)  # (D, d_sae)
    w_dec = np.concatenate(
        [e, (e[:, [LETTERS.index("s")]] + u) / np.sqrt(2)], axis=1
    ).T  # (d_sae, D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(w_enc).float())
        sae.W_dec.copy_(torch.from_numpy(w_dec).float())
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()
    save_sae(st, sae, "planted")
    return store, set(sp.absorbed)


def test_a_planted_absorber_is_measured_where_it_was_planted(tmp_path, corpus_file, one_thread):
    store, absorbed = _planted(tmp_path, corpus_file)
    r = CliRunner().invoke(main, ["eval", store, "--sae", "planted", "--evals", "absorption", "--absorption-icl",
                                  "0", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((Path(store) / "saes" / "planted" / "evals.json").read_text())["absorption"]
    by = {row["letter"]: row for row in res["letters"]}
    assert all(row["scored"] and row["probe_f1"] > 0.95 for row in by.values())
    # each letter's main latent is its own; no letter split (an absorber covers 1 % of the s words)
    assert all(row["main_latents"] == [LETTERS.index(c)] for c, row in by.items())
    # 600 s words are absorbed, every one of them fully; no other letter is
    s_rate = len(absorbed) / sum(w[0] == "s" for w in alpha_vocab_words())
    assert by["s"]["absorption_fraction"] == pytest.approx(s_rate, abs=0.06)
    assert by["s"]["full_absorption"] == pytest.approx(by["s"]["absorption_fraction"], abs=1e-9)
    assert max(row["absorption_fraction"] for c, row in by.items() if c != "s") == 0.0
    assert res["absorption_fraction"] == pytest.approx(
        by["s"]["absorption_fraction"] / 26, rel=1e-9
    )


def test_absorption_shows_in_sae_evals_and_saes(tmp_path, corpus_file, one_thread):
    store, _ = _planted(tmp_path, corpus_file)
    r = CliRunner().invoke(main, ["eval", store, "--sae", "planted", "--evals", "absorption", "--absorption-icl",
                                  "0", "--absorption-words", "6000", "--absorption-min-letters", "5"])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((Path(store) / "saes" / "planted" / "evals.json").read_text())["absorption"]
    st = actstore.open_store(store)
    got = actstore.sql(st, "SELECT task, k, accuracy, n_test, absorption_fraction, full_absorption FROM sae_evals "
                           "WHERE eval = 'absorption' ORDER BY task").rows()  # fmt: skip
    want = [(x["letter"], len(x["main_latents"]), x["sparse_f1"], x["n_true_positives"], x["absorption_fraction"],
             x["full_absorption"]) for x in res["letters"] if x["scored"]]  # fmt: skip
    assert got == want and 5 <= len(got) <= 26
    row = list_saes(st).row(0, named=True)
    assert row["absorption"] == pytest.approx(res["absorption_fraction"])
    assert row["full_absorption"] == pytest.approx(res["full_absorption"])


def alpha_vocab_words() -> list[str]:
    from transformers import AutoTokenizer

    return alpha_vocab(AutoTokenizer.from_pretrained(minilm_path())).words


def test_a_model_that_cannot_spell_is_refused_in_one_line(tiny_store):
    st = actstore.open_store(tiny_store, writable=True)
    make_sae(st, "random", "relu-l1", d_sae=16)
    r = CliRunner().invoke(main, ["eval", tiny_store, "--sae", "random", "--evals", "absorption",
                                  "--absorption-words", "2000", "--absorption-icl", "0"])  # fmt: skip
    msg = one_line_error(r)
    assert "cannot spell" in msg and "--absorption-min-letters" in msg
    assert not (Path(tiny_store) / "saes" / "random" / "evals.json").exists()


def test_an_unknown_evaluation_is_one_line(tiny_store):
    r = CliRunner().invoke(main, ["eval", tiny_store, "--sae", "x", "--evals", "spelling"])
    assert "unknown evaluation spelling" in one_line_error(r)
