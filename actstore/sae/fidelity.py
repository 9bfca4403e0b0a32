"""Spliced fidelity: what the store's model does with the SAE's reconstruction in place of its layer.

The layer's hidden state (``hidden_states[layer]``, :func:`actstore.models.taps.splice`) is replaced by the SAE's
reconstruction at every position and the rest of the model runs as usual; so is it by zeros, the baseline that
SAEBench's "loss recovered" is measured against.

- **Classifiers** (a model saved with a sequence-classification head, e.g. by ``actstore finetune``): accuracy with
  and without the SAE, their agreement, and the mean KL divergence ``KL(p_clean || p_spliced)`` of the class
  probabilities (nats), beside the zero-ablated one's; ``kl_recovered = 1 - KL_sae / KL_zero``.
- **Decoder LMs** (a model saved with its LM head, ``*ForCausalLM`` / ``*LMHeadModel``): the next-token cross
  entropy on the samples' stored tokens, clean, spliced and zero-ablated; ``ce_recovered = (CE_zero - CE_sae) /
  (CE_zero - CE_clean)`` (1: the SAE costs nothing; 0: as bad as deleting the layer).

What ``train`` records in ``metrics.json`` under ``task``, on the run's held-out samples (``--task-samples``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from actstore.sae.model import SAE

CLASSIFIER = "ForSequenceClassification"
LANGUAGE_MODEL = ("ForCausalLM", "LMHeadModel")


def spliced_fidelity(
    store: Any,
    sae: SAE,
    samples: Any,
    device: str = "cpu",
    max_samples: int = 256,
    batch_size: int = 16,
) -> dict[str, Any] | None:
    """The fidelity of ``sae`` spliced into the store's model on ``samples``: :func:`task_accuracy` for a
    classifier, :func:`lm_loss_recovered` for a decoder LM, None for a model without a head or a crosscoder."""
    if (
        sae.cfg.is_crosscoder or sae.cfg.is_transcoder
    ):  # a splice replaces a layer by its own reconstruction
        return None
    arch = str(store.model_info(sae.cfg.model).architecture or "")
    if CLASSIFIER in arch:
        return task_accuracy(store, sae, samples, device, max_samples, batch_size)
    if any(s in arch for s in LANGUAGE_MODEL):
        return lm_loss_recovered(store, sae, samples, device, max_samples, batch_size)
    return None


def _sites(model: Any, sae: SAE, device: str) -> dict[str, Callable[[], Any]]:
    """The three runs: clean, the SAE spliced in, the layer zeroed."""
    from actstore.models.taps import splice

    n_layers = int(model.config.num_hidden_layers)
    layer = int(sae.cfg.layer)  # type: ignore[arg-type]
    sae_dev = sae.to(device)

    def recon(h: torch.Tensor) -> torch.Tensor:  # (batch, seq, d_model)
        return sae_dev(h.reshape(-1, h.shape[-1])).x_hat.reshape(h.shape).to(h.dtype)

    return {
        "clean": contextlib.nullcontext,
        "sae": lambda: splice(model, n_layers, layer, recon),
        "zero": lambda: splice(model, n_layers, layer, torch.zeros_like),
    }


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Mean over rows of ``KL(p || q)`` from log-probabilities ``(n, c)``."""
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


@torch.no_grad()
def task_accuracy(
    store: Any,
    sae: SAE,
    samples: Any,
    device: str = "cpu",
    max_samples: int = 256,
    batch_size: int = 16,
) -> dict[str, Any] | None:
    """A classifier's accuracy on ``samples`` with and without the SAE spliced in, and the KL divergence of its
    class probabilities (see the module docstring); None for a model without a classification head. Labels are
    matched through the model's ``label2id``; samples whose label the head does not know are skipped."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    c = sae.cfg
    info = store.model_info(c.model)
    if CLASSIFIER not in str(info.architecture or "") or not info.path:
        return None
    model = AutoModelForSequenceClassification.from_pretrained(info.path).to(device).eval()
    tok = AutoTokenizer.from_pretrained(info.path)
    label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
    df = store.samples(c.tokenization)
    df = df.filter(df["sample"].is_in(list(map(int, samples))))
    rows = [
        (t, label2id[str(lab)])
        for t, lab in zip(df["text"].to_list(), df["label"].to_list(), strict=True)
        if str(lab) in label2id
    ][:max_samples]
    if not rows:
        return None
    max_len = int(store.tokenization(c.tokenization).attrs.max_length or 512)

    def log_probs(site: Callable[[], Any]) -> torch.Tensor:  # (n, n_classes)
        out = []
        with site():
            for a in range(0, len(rows), batch_size):
                enc = tok(
                    [t for t, _ in rows[a : a + batch_size]],
                    truncation=True,
                    max_length=max_len,
                    padding=True,
                    return_tensors="pt",
                ).to(device)
                out.append(model(**enc).logits.float().log_softmax(-1).cpu())
        return torch.cat(out)

    runs = {name: log_probs(site) for name, site in _sites(model, sae, device).items()}
    y = torch.tensor([lab for _, lab in rows])
    base, spliced = runs["clean"].argmax(-1), runs["sae"].argmax(-1)
    kl, kl_zero = _kl(runs["clean"], runs["sae"]), _kl(runs["clean"], runs["zero"])
    return {
        "n_samples": len(rows),
        "accuracy": float((base == y).float().mean()),
        "accuracy_with_sae": float((spliced == y).float().mean()),
        "agreement": float((base == spliced).float().mean()),
        "accuracy_zero_ablated": float((runs["zero"].argmax(-1) == y).float().mean()),
        "kl": kl,
        "kl_zero_ablated": kl_zero,
        "kl_recovered": 1 - kl / kl_zero if kl_zero > 0 else None,
    }


@torch.no_grad()
def lm_loss_recovered(
    store: Any,
    sae: SAE,
    samples: Any,
    device: str = "cpu",
    max_samples: int = 256,
    batch_size: int = 16,
) -> dict[str, Any] | None:
    """A decoder LM's next-token cross entropy on the stored tokens of ``samples``: clean, with the SAE spliced in
    and with the layer zeroed, and the fraction of the loss the SAE recovers (see the module docstring); None for
    a model without an LM head."""
    from transformers import AutoModelForCausalLM

    c = sae.cfg
    info = store.model_info(c.model)
    if not any(s in str(info.architecture or "") for s in LANGUAGE_MODEL) or not info.path:
        return None
    model = AutoModelForCausalLM.from_pretrained(info.path).to(device).eval()
    tk = store.tokenization(c.tokenization)
    first, n_tok = tk.sample_rows()
    chosen = [int(s) for s in samples if n_tok[int(s)] >= 2][:max_samples]
    if not chosen:
        return None
    seqs = [tk.token_ids(int(first[s]), int(first[s] + n_tok[s])) for s in chosen]

    def loss(site: Callable[[], Any]) -> float:  # mean next-token CE over every predicted token
        total, count = 0.0, 0
        with site():
            for a in range(0, len(seqs), batch_size):
                part = seqs[a : a + batch_size]
                width = max(len(s) for s in part)
                ids = np.zeros((len(part), width), dtype=np.int64)
                mask = np.zeros((len(part), width), dtype=np.int64)
                for i, s in enumerate(
                    part
                ):  # right-padded: a causal model's real tokens never see the padding
                    ids[i, : len(s)], mask[i, : len(s)] = s, 1
                ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
                logits = model(
                    input_ids=ids_t, attention_mask=mask_t
                ).logits.float()  # (b, t, vocab)
                ce = torch.nn.functional.cross_entropy(
                    logits[:, :-1].transpose(1, 2), ids_t[:, 1:], reduction="none"
                )  # (b, t - 1)
                keep = mask_t[:, 1:].bool()
                total += float(ce[keep].sum())
                count += int(keep.sum())
        return total / count

    runs = {name: loss(site) for name, site in _sites(model, sae, device).items()}
    gap = runs["zero"] - runs["clean"]
    return {
        "n_samples": len(chosen),
        "ce_loss": runs["clean"],
        "ce_loss_with_sae": runs["sae"],
        "ce_loss_zero_ablated": runs["zero"],
        "ce_recovered": (runs["zero"] - runs["sae"]) / gap if gap != 0 else None,
    }
