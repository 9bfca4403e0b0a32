"""Feature absorption (``actstore eval --evals absorption``): SAEBench's first-letter task, on a model that can spell.

Chanin et al. (2024) found that an SAE latent which "means" *starts with S* often stays silent on a token such as
``short``: a token-specific latent fires instead and carries the S direction itself, so the S latent's recall has
holes no one sees. SAEBench measures it this way, and this module follows it step by step (the defaults are
SAEBench's):

1. **Words.** Every token of the vocabulary that is a whole alphabetic word (WordPiece continuations, special
   tokens and anything but ``[A-Za-z]`` left out), split into training and test words (80 / 20, seeded).
2. **Prompts.** ``"{word} has the first letter:"`` after ``icl`` in-context examples such as ``"tartan has the
   first letter: T"``; the activation is read at the word's own token, at the SAE's layer and site.
3. **Ground-truth probe.** A one-vs-rest logistic probe per letter on the raw activations of the training words
   (BCE with positive weights, Adam 1e-2 decaying to 1e-5, 50 epochs); its F1 on the test words says whether the
   model knows the letter. Letters below ``min_f1`` are not scored; fewer than ``min_letters`` scored letters: the
   model cannot spell well enough for the task, and the evaluation says so instead of reporting noise.
4. **Main latents.** An L1-penalised probe on the SAE's latents ranks them per letter; for k = 1..``max_k`` a
   k-sparse logistic probe (balanced classes) on the top k is scored by F1 on the test words, and k grows while
   F1 jumps by at least ``f1_jump``: those k latents are the letter's main latents (more than one: feature
   splitting).
5. **Absorption** on each test word the ground-truth probe gets right. With ``p`` the unit probe direction and each
   latent's contribution along it ``a_i * (d_i . p)`` (``a_i`` its activation, ``d_i`` its decoder row in the
   model's activation space: SAEBench's ``a_i * cos(d_i, p)`` for unit decoder rows, and in the activation's own
   units for any):

   - *absorption fraction*: 0 when the main latents account for the activation's projection ``x . p``, or when
     the (at most 3) other latents with ``cos(d_i, p) >= 0.1`` and a positive contribution carry less than 40 % of
     it; 1 when the main latents contribute nothing; otherwise the absorbers' share of what the main latents and
     the absorbers carry between them;
   - *full absorption*: every main latent silent, and the latent contributing most along ``p`` has ``cos >= 0.025``
     and carries at least 40 % of ``x . p``.

   A letter's scores are their sums over its probe's true positives divided by their number; the SAE's, the mean
   over scored letters.

The result goes into ``evals.json`` under ``absorption`` beside the SAE (and the ``sae_evals`` view, one row per
letter). A model has to spell for the numbers to mean anything: SAEBench recommends models of 2B parameters and
more; all-MiniLM-L6-v2 gets first letters right a third of the time (no letter reaches F1 0.6).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from actstore.analysis.config import EvalConfig
from actstore.analysis.probing import fit_logistic
from actstore.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

    from actstore.sae.model import SAE
    from actstore.store.reader import Store

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = "{word} has the first letter:"
"""SAEBench's prompt; the answer of an in-context example follows it as `` T``."""
EPS = 1e-8
FULL_COS = 0.025
"""Full absorption: the top latent's cosine with the probe at least this."""
FRACTION_COS = 0.1
"""Absorption fraction: an absorbing latent's cosine with the probe at least this."""
SHARE = 0.4
"""Both: the absorbing latents carry at least this share of the activation's projection on the probe."""
MAX_ABSORBERS = 3
"""Absorption fraction: at most this many latents absorb together."""


class Vocab(NamedTuple):
    """The vocabulary's whole alphabetic words."""

    ids: np.ndarray
    """Token ids ``(n,)``."""
    words: list[str]
    """Each token as text (a byte-level BPE token keeps its leading space)."""
    letters: np.ndarray
    """Index of each word's first letter in ``LETTERS`` ``(n,)``."""


class Prompts(NamedTuple):
    """Tokenized prompts, right-padded, and where each one's word is."""

    input_ids: np.ndarray
    """``(n, seq)`` int64."""
    attention_mask: np.ndarray
    """``(n, seq)`` int64."""
    position: np.ndarray
    """The word's token index in each prompt ``(n,)``."""
    keep: np.ndarray
    """Which of the words asked for tokenized to their own token in place ``(n_asked,)`` bool (the rows above are
    those words')."""


@dataclass
class LetterAbsorption:
    """One letter's result."""

    letter: str
    probe_f1: float
    """F1 of the ground-truth probe on the test words."""
    n_true_positives: int
    """Test words of this letter the probe gets right: the words scored."""
    main_latents: list[int]
    """The k-sparse probe's latents (more than one: the letter split)."""
    sparse_f1: float
    """F1 of the k-sparse probe on those latents."""
    absorption_fraction: float
    """Mean absorption fraction over the true positives."""
    full_absorption: float
    """Fraction of the true positives fully absorbed by one latent."""
    scored: bool
    """Probe F1 at least ``min_f1`` (only scored letters enter the means)."""


@dataclass
class AbsorptionResult:
    """What ``actstore eval --evals absorption`` reports."""

    sae: str
    model: str
    layer: int
    site: str
    n_words: int
    """Words prompted (training and test)."""
    letters: list[LetterAbsorption]
    absorption_fraction: float
    """Mean over scored letters (SAEBench's ``mean_absorption_fraction_score``)."""
    full_absorption: float
    """Mean over scored letters (SAEBench's ``mean_full_absorption_score``)."""
    split_latents: float
    """Mean number of main latents per scored letter."""
    probe_f1: float
    """Mean ground-truth probe F1 over all 26 letters (how well the model spells)."""
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- words and prompts
def alpha_vocab(tokenizer: Any) -> Vocab:
    """The tokens that are whole alphabetic words (not special, not a ``##`` continuation)."""
    special = set(tokenizer.all_special_ids or [])
    ids, words, letters = [], [], []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or not tok or tok.startswith("##"):
            continue
        text = tokenizer.convert_tokens_to_string([tok])
        if re.fullmatch(r" ?[A-Za-z]+", text):
            ids.append(i)
            words.append(text)
            letters.append(LETTERS.index(text.strip()[0].lower()))
    return Vocab(np.asarray(ids, dtype=np.int64), words, np.asarray(letters, dtype=np.int64))


def prompt_text(word: str, examples: list[str]) -> tuple[str, int]:
    """``(prompt, character offset of the word)``: the in-context examples with their answers, one per line, then
    the word's own prompt."""
    lines = [TEMPLATE.format(word=w) + " " + w.strip()[0].upper() for w in examples]
    head = "".join(line + "\n" for line in lines)
    return head + TEMPLATE.format(word=word), len(head)


def build_prompts(
    tokenizer: Any, vocab: Vocab, pick: np.ndarray, icl: int, rng: np.random.Generator
) -> Prompts:
    """Prompts for the words ``vocab[pick]``, each with ``icl`` examples drawn from the other words of ``pick``."""
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"absorption needs a fast tokenizer (offsets of each token); {type(tokenizer).__name__} is not one"
        )
    texts, starts = [], []
    for j in pick:
        # (icl,) other words: the word's own answer never precedes it
        others = [
            o for o in rng.choice(pick, size=min(icl + 1, len(pick)), replace=False) if o != j
        ][:icl]
        text, start = prompt_text(vocab.words[j], [vocab.words[o] for o in others])
        texts.append(text)
        starts.append(start)
    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
    rows, pos, keep = [], [], np.zeros(len(pick), dtype=bool)
    for n, (ids, offs) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
        want, at = int(vocab.ids[pick[n]]), starts[n]
        # the word's token: its id, starting at the word (a byte-level BPE offset may include the space)
        hit = [t for t, (a, b) in enumerate(offs) if ids[t] == want and at <= a + 1 and b > at]
        if hit:
            keep[n] = True
            rows.append(ids)
            pos.append(hit[0])
    width = max((len(r) for r in rows), default=1)
    input_ids = np.full((len(rows), width), int(tokenizer.pad_token_id or 0), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for n, r in enumerate(rows):  # right-padded: a causal model's real tokens never see the padding
        input_ids[n, : len(r)], mask[n, : len(r)] = r, 1
    return Prompts(input_ids, mask, np.asarray(pos, dtype=np.int64), keep)


def word_activations(
    loaded: Any, site: str, layer: int, prompts: Prompts, batch_size: int
) -> np.ndarray:
    """The activation ``(n, d_model)`` float32 at each prompt's word, at ``site`` of ``layer``."""
    import torch

    from actstore.models.sites import make_tap

    tap = make_tap(loaded, [layer], site)
    dev = next(loaded.model.parameters()).device
    out = []
    for a in range(0, len(prompts.position), batch_size):
        b = slice(a, a + batch_size)
        width = int(prompts.attention_mask[b].sum(1).max())
        ids = torch.from_numpy(prompts.input_ids[b, :width]).to(dev)
        mask = torch.from_numpy(prompts.attention_mask[b, :width]).to(dev)
        h = tap(ids, mask)[layer]  # (batch, seq, d_model)
        out.append(
            h[torch.arange(len(ids)), torch.from_numpy(prompts.position[b]).to(dev)]
            .float()
            .cpu()
            .numpy()
        )
    return np.concatenate(out) if out else np.zeros((0, loaded.d_model), dtype=np.float32)


# ---------------------------------------------------------------- probes
class Probe(NamedTuple):
    """One-vs-rest linear probes: ``score = x @ weight.T + bias``."""

    weight: np.ndarray
    """``(n_classes, d)``."""
    bias: np.ndarray
    """``(n_classes,)``."""


def train_probe(
    x: torch.Tensor, y: np.ndarray, n_classes: int, l1: float = 0.0, weight_decay: float = 1e-4,
    epochs: int = 50, batch_size: int = 4096, seed: int = 0, min_steps: int = 1000,
) -> Probe:  # fmt: skip
    """SAEBench's multi-probe: one-vs-rest logistic probes trained together on ``x (n, d)``, BCE with each class's
    positives weighted by its negatives / positives, Adam from 1e-2 decaying exponentially to 1e-5 over the epochs,
    plus ``l1`` times the mean over classes of the weights' L1 norm (the k-sparse probes' latent ranking).

    Two departures, for vocabularies smaller than a 2B model's: the weights start at zero (not at random, which an
    L1 ranking of latents would carry), and the epochs are raised until there are ``min_steps`` Adam steps (50
    epochs of a 20k-word vocabulary are 250 steps, too few to converge)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(y), n_classes).float()  # (n, n_classes)
    pos = onehot.sum(0)
    pos_weight = (len(y) - pos) / pos.clamp_min(1)
    lin = torch.nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    epochs = max(epochs, math.ceil(min_steps / math.ceil(len(y) / batch_size)))
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(
        opt, gamma=math.exp(math.log(1e-5 / 1e-2) / epochs)
    )
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for a in range(0, len(y), batch_size):
            idx = order[a : a + batch_size]
            loss = bce(lin(x[idx]), onehot[idx])
            if l1:
                loss = loss + l1 * lin.weight.abs().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return Probe(
        lin.weight.detach().numpy().astype(np.float64), lin.bias.detach().numpy().astype(np.float64)
    )


def f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """F1 of boolean predictions (0 when nothing is predicted or true)."""
    tp = float((truth & pred).sum())
    denom = float(truth.sum() + pred.sum())
    return 2 * tp / denom if denom else 0.0


def main_latents(
    lat_train: np.ndarray, y_train: np.ndarray, lat_test: np.ndarray, y_test: np.ndarray, ranking: np.ndarray,
    max_k: int, jump: float,
) -> tuple[list[int], float]:  # fmt: skip
    """``(latents, F1)`` of one letter: k-sparse probes on its ``ranking``'s top k (k = 1..max_k, balanced logistic
    regression, as scikit-learn's with ``class_weight="balanced"``), k growing while test F1 jumps by ``jump``."""
    best, chosen, chosen_f1 = -100.0, [], 0.0
    n, n_pos = len(y_train), int(y_train.sum())
    weights = np.where(y_train > 0, n / (2 * max(n_pos, 1)), n / (2 * max(n - n_pos, 1)))
    for k in range(1, max_k + 1):
        top = np.argsort(-ranking, kind="stable")[:k]
        w, b = fit_logistic(lat_train[:, top], y_train, 1.0, sample_weight=weights)
        score = f1(y_test > 0, lat_test[:, top] @ w + b > 0)
        if score <= best + jump:
            break
        best, chosen, chosen_f1 = score, [int(t) for t in top], score
    return chosen, chosen_f1


# ---------------------------------------------------------------- the scores
class WordScores(NamedTuple):
    """Absorption of each scored word."""

    fraction: np.ndarray
    """``(m,)`` in [0, 1]."""
    full: np.ndarray
    """``(m,)`` bool."""


def absorption_scores(
    acts: np.ndarray,
    latents: np.ndarray,
    decoder: np.ndarray,
    probe_dir: np.ndarray,
    main: list[int],
) -> WordScores:
    """SAEBench's two scores (module docstring, step 5) of words with activations ``acts (m, d_model)``, SAE latents
    ``latents (m, d_sae)``, decoder rows ``decoder (d_sae, d_model)`` in activation space, probe ``probe_dir (d,)``
    and main latents ``main``."""
    p = probe_dir / np.linalg.norm(probe_dir)
    dnorm = np.linalg.norm(decoder, axis=1)  # (d_sae,)
    cos = (decoder @ p) / np.maximum(dnorm, EPS)  # (d_sae,)
    contrib = latents * (
        dnorm * cos
    )  # (m, d_sae): each latent's part of the reconstruction along p
    total = acts @ p  # (m,)
    main_part = contrib[:, main].sum(1) if main else np.zeros(len(acts))
    others = contrib.copy()
    if main:
        others[:, main] = 0
    others[:, cos < FRACTION_COS] = 0
    others = np.maximum(others, 0)
    top_others = -np.sort(-others, axis=1)[:, :MAX_ABSORBERS].sum(1)  # (m,)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = top_others / total
        absorbed = np.minimum(top_others, total - main_part)
        partial = np.clip(absorbed / (absorbed + main_part), 0, 1)
    fraction = np.where(
        (main_part >= total) | ~(share >= SHARE), 0.0, np.where(main_part <= 0, 1.0, partial)
    )
    silent = (latents[:, main] < EPS).all(1) if main else np.ones(len(acts), dtype=bool)
    top = contrib.argmax(1)
    top_part = contrib[np.arange(len(acts)), top]
    with np.errstate(divide="ignore", invalid="ignore"):
        full = silent & (cos[top] >= FULL_COS) & (total >= 0) & (top_part / total >= SHARE)
    return WordScores(fraction.astype(np.float64), full)


# ---------------------------------------------------------------- the evaluation
def decoder_rows(sae: SAE) -> np.ndarray:
    """The SAE's decoder rows ``(d_sae, d_model)`` in the model's activation space."""
    return sae.raw_space_tensors()["W_dec"].float().cpu().numpy()


def encode(sae: SAE, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Latents ``(n, d_sae)`` float32 of raw activations ``x (n, d_model)``."""
    import torch

    dev = sae.W_dec.device
    with torch.no_grad():
        parts = [sae.encode(torch.from_numpy(x[a : a + batch]).to(dev)).float().cpu().numpy()
                 for a in range(0, len(x), batch)]  # fmt: skip
    return np.concatenate(parts) if parts else np.zeros((0, sae.cfg.d_sae), dtype=np.float32)


def absorption(store: Store, cfg: EvalConfig, progress: bool = False) -> AbsorptionResult:
    """SAEBench's first-letter absorption of ``cfg.sae`` (module docstring), running the store's model (or
    ``cfg.model``) on prompts of its own vocabulary."""
    import torch

    from actstore.models.loading import auto_device, load_model
    from actstore.models.names import base_key, key_site
    from actstore.sae.files import load_sae

    t0 = time.perf_counter()
    device = auto_device(cfg.device)
    sae = load_sae(store, cfg.sae, device).eval()
    c = sae.cfg
    if c.is_crosscoder or c.is_transcoder or c.model is None or c.layer is None:
        raise ConfigError(
            f"SAE {cfg.sae!r} is not an SAE of one layer (a crosscoder or a transcoder): absorption reads one site"
        )
    site, key = key_site(str(c.model)), base_key(str(c.model))
    info = store.model_info(key)
    source = cfg.model or info.path
    if not source:
        raise ConfigError(f"store {store.url} records no path for model {key!r}: pass --model PATH")
    loaded = load_model(str(source), device)
    if loaded.d_model != c.d_in:
        raise ConfigError(
            f"model {source} is {loaded.d_model} wide, SAE {cfg.sae!r} reads {c.d_in}: pass the model it was trained on"
        )
    vocab = alpha_vocab(loaded.tokenizer)
    rng = np.random.default_rng(cfg.seed)
    pick = rng.permutation(len(vocab.ids))
    if cfg.absorption_words:
        pick = pick[: cfg.absorption_words]
    if len(pick) < 100:
        raise ConfigError(
            f"model {source}'s vocabulary has {len(pick)} whole alphabetic words: absorption needs at least 100"
        )
    n_train = int(len(pick) * (1 - cfg.test_fraction))
    parts = []
    for half in (pick[:n_train], pick[n_train:]):
        prompts = build_prompts(loaded.tokenizer, vocab, half, cfg.absorption_icl, rng)
        with torch.no_grad():
            x = word_activations(loaded, site, int(c.layer), prompts, cfg.absorption_batch)
        parts.append((x, vocab.letters[half[prompts.keep]]))
    (x_tr, y_tr), (x_te, y_te) = parts
    gt = train_probe(torch.from_numpy(x_tr), y_tr, len(LETTERS), seed=cfg.seed)
    gt_scores = x_te @ gt.weight.T + gt.bias  # (n_test, 26)
    lat_tr, lat_te = encode(sae, x_tr), encode(sae, x_te)
    l1 = train_probe(
        torch.from_numpy(lat_tr), y_tr, len(LETTERS), l1=0.01, weight_decay=1e-6, seed=cfg.seed
    )
    dec = decoder_rows(sae)
    letters = []
    for i, letter in enumerate(LETTERS):
        truth, said = y_te == i, gt_scores[:, i] > 0
        probe_f1 = f1(truth, said)
        if not truth.any() or not (y_tr == i).any():
            letters.append(LetterAbsorption(letter, probe_f1, 0, [], 0.0, 0.0, 0.0, False))
            continue
        main, sparse_f1 = main_latents(lat_tr, (y_tr == i).astype(np.int64), lat_te, truth.astype(np.int64),
                                       l1.weight[i], cfg.absorption_max_k, cfg.absorption_f1_jump)  # fmt: skip
        tp = truth & said
        s = absorption_scores(x_te[tp], lat_te[tp], dec, gt.weight[i], main)
        n = int(tp.sum())
        letters.append(LetterAbsorption(
            letter, probe_f1, n, main, sparse_f1, float(s.fraction.sum() / n) if n else 0.0,
            float(s.full.sum() / n) if n else 0.0, n > 0 and probe_f1 >= cfg.absorption_min_f1,
        ))  # fmt: skip
    scored = [r for r in letters if r.scored]
    if len(scored) < cfg.absorption_min_letters:
        best = sorted(letters, key=lambda r: -r.probe_f1)[:3]
        raise ConfigError(
            f"model {source} cannot spell well enough at layer {c.layer} ({site}): {len(scored)} letters have a "
            f"first-letter probe F1 >= {cfg.absorption_min_f1} and absorption needs {cfg.absorption_min_letters} "
            f"(best: {', '.join(f'{r.letter} {r.probe_f1:.2f}' for r in best)}). Evaluate an SAE of a model that "
            "can spell (SAEBench recommends >= 2B parameters), or lower --absorption-min-letters"
        )
    return AbsorptionResult(
        sae=cfg.sae, model=str(c.model), layer=int(c.layer), site=site, n_words=len(y_tr) + len(y_te),
        letters=letters, absorption_fraction=float(np.mean([r.absorption_fraction for r in scored])),
        full_absorption=float(np.mean([r.full_absorption for r in scored])),
        split_latents=float(np.mean([len(r.main_latents) for r in scored])),
        probe_f1=float(np.mean([r.probe_f1 for r in letters])), seconds=time.perf_counter() - t0,
        config=asdict(cfg),
    )  # fmt: skip
