"""An SAE spliced into a model with its reconstruction error added back, and the outputs a feature's effect is
measured on.

At the SAE's layer the hidden state ``h`` (``hidden_states[layer]``, :func:`actstore.models.taps.splice`) becomes
``decode(edit(a)) + (h - decode(a))`` with ``a = encode(h)``: without an edit the model's output is unchanged (to
float rounding), and an edit (a feature zeroed, set to its mean, clamped) changes it by exactly what the edited
feature's decoder rows carry. With ``grad`` the latents ``a`` are a leaf that autograd tracks: the model's weights
are frozen, so no graph is built below the splice and the backward pass runs through the layers above it only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actstore.errors import ConfigError
from actstore.sae.fidelity import CLASSIFIER, LANGUAGE_MODEL
from actstore.sae.model import SAE

NEXT_TOKEN = "next_token"
"""The class of a decoder LM's effects: the sample's summed next-token loss."""


@dataclass
class HeadModel:
    """A model with the head a feature's effect is measured on."""

    key: str
    """Its model key in the store."""
    kind: str
    """``classifier`` or ``lm``."""
    model: torch.nn.Module
    n_layers: int
    d_model: int
    classes: list[str]
    """A classifier's class names in logit order (``id2label``); an LM's: ``[NEXT_TOKEN]``."""
    pad_id: int


def load_head_model(store: Any, key: str, device: str, path: str | None = None) -> HeadModel:
    """The store's model ``key`` with its head (weights frozen, eval mode), from the path the store records or from
    ``path`` (a directory the user names: then its own config says what head it has), or one clear error."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from actstore.models.loading import from_pretrained

    info = store.model_info(key) if path is None else None
    arch = str(info.architecture or "") if info is not None else ""
    if path is not None:
        arch = str((from_pretrained(AutoConfig, path).architectures or [""])[0])
    cls: Any
    if CLASSIFIER in arch:
        kind, cls = "classifier", AutoModelForSequenceClassification
    elif any(s in arch for s in LANGUAGE_MODEL):
        kind, cls = "lm", AutoModelForCausalLM
    else:
        raise ConfigError(
            f"model {key!r} of {store.url} is a {arch or 'model'} without a classification or language-model head: "
            "effects are measured on a head's output (fine-tune one with actstore finetune, or pass --model KEY)"
        )
    source = path or (info.path if info is not None else None)
    if not source:
        raise ConfigError(
            f"store {store.url} records no path for model {key!r}: its weights cannot be loaded"
        )
    model = from_pretrained(cls, str(source)).to(device).eval()
    model.requires_grad_(False)
    cfg = model.config
    n_layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0))
    d_model = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))
    if kind == "classifier":
        id2label = cfg.id2label or {}
        classes = [str(id2label.get(i, i)) for i in range(int(cfg.num_labels))]
    else:
        classes = [NEXT_TOKEN]
    pad = getattr(cfg, "pad_token_id", None)
    return HeadModel(
        key, kind, model, n_layers, d_model, classes, int(pad) if pad is not None else 0
    )


def check_splice(sae: SAE, name: str, head: HeadModel) -> int:
    """The SAE's layer, after checking it can be spliced into ``head``: a one-layer SAE of the residual stream, as
    wide as the model, at a layer the model has."""
    from actstore.models.names import key_site

    c = sae.cfg
    if c.is_crosscoder:
        models, layers = list(c.models or []), list(c.layers or [])
        if head.key not in models:
            raise ConfigError(
                f"crosscoder {name!r} reads {', '.join(models)}: pass --model one of them (its side is spliced)"
            )
        if c.input_norm != "none":
            raise ConfigError(
                f"crosscoder {name!r} normalises its inputs per token: it cannot be spliced"
            )
        layer = int(layers[models.index(head.key)])
        if not 0 <= layer <= head.n_layers or c.d_in != head.d_model:
            raise ConfigError(
                f"crosscoder {name!r} does not fit model {head.key!r} (layer {layer}, width {c.d_in})"
            )
        return layer
    if c.is_transcoder or c.layer is None:
        raise ConfigError(
            f"SAE {name!r} is a transcoder: effects splice an SAE (or a crosscoder) into one layer"
        )
    if key_site(str(c.model)) != "resid":
        raise ConfigError(
            f"SAE {name!r} reads {c.model}, a site inside a block: effects splice the residual stream (hidden_states)"
        )
    if not 0 <= int(c.layer) <= head.n_layers:
        raise ConfigError(
            f"SAE {name!r} is of layer {c.layer}, but model {head.key!r} has layers 0..{head.n_layers}"
        )
    if c.d_in != head.d_model:
        raise ConfigError(
            f"SAE {name!r} reads {c.d_in}-wide rows, but model {head.key!r} is {head.d_model} wide: pass --model of "
            "the model it was trained on (or one of the same width)"
        )
    return int(c.layer)


def reconstruct(
    sae: SAE, acts: torch.Tensor, undo: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """The SAE's reconstruction ``(n, d_model)`` of latents ``acts (n, d_sae)`` in the model's activation space
    (a per-token input norm undone with ``undo``, as :meth:`SAE.forward` does)."""
    x_hat = sae.decode(acts)
    return x_hat * undo[1] + undo[0] if undo is not None else x_hat


Edit = Callable[[torch.Tensor], torch.Tensor]
"""What an intervention does to the latents ``(batch, seq, d_sae)``: returns the edited copy."""


class Splice:
    """The SAE in the model at its layer (see the module docstring); ``acts`` is the last forward's latents
    ``(batch, seq, d_sae)`` (a leaf with ``grad=True``)."""

    def __init__(
        self, head: HeadModel, sae: SAE, layer: int, sources: Sources | None = None
    ) -> None:
        self.head, self.sae, self.layer = head, sae, layer
        self.acts: torch.Tensor | None = None
        self.sources = sources
        """A crosscoder's other models' stored rows of a batch's tokens (None: an SAE)."""

    @contextlib.contextmanager
    def __call__(
        self, edit: Edit | None = None, grad: bool = False, batch: Batch | None = None
    ) -> Iterator[Splice]:
        """Inside: every forward pass of the model runs through the splice. A crosscoder's reads the other models'
        stored rows of ``batch``'s samples (its latents see every model's rows of a token; this model's hidden
        state becomes its decoder block for this model plus the error)."""
        from actstore.models.taps import splice

        sources = self.sources
        if sources is not None and batch is None:
            raise ConfigError(
                "a crosscoder splice reads the other models' stored rows: it needs the batch's samples"
            )
        d = self.sae.cfg.d_in
        # this model's columns of the reconstruction (all of an SAE's)
        mine = slice(None) if sources is None else slice(sources.own * d, (sources.own + 1) * d)

        def fn(h: torch.Tensor) -> torch.Tensor:  # (batch, seq, d_model)
            own = h.detach().to(self.sae.W_dec.dtype)
            x = own.reshape(-1, h.shape[-1])  # (n, d)
            # (n, d) for an SAE; (n, n_sources * d) for a crosscoder, this model's rows in their slot
            inputs = x if sources is None else sources.rows(batch, own).reshape(x.shape[0], -1)  # type: ignore[arg-type]
            with torch.no_grad():
                # a per-token input norm to undo (an SAE's; a crosscoder with one is refused)
                undo = self.sae._norm_in(x)[1] if sources is None else None
                acts = self.sae.encode(inputs)  # (n, d_sae)
                err = (
                    x - reconstruct(self.sae, acts, undo)[:, mine]
                )  # what the SAE misses, added back
            acts = acts.reshape(*h.shape[:-1], -1)
            if grad:
                acts.requires_grad_(True)
            self.acts = acts
            used = edit(acts) if edit is not None else acts
            out = reconstruct(self.sae, used.reshape(-1, used.shape[-1]), undo)[:, mine] + err
            return out.reshape(h.shape).to(h.dtype)

        with (
            torch.set_grad_enabled(grad),
            splice(self.head.model, self.head.n_layers, self.layer, fn),
        ):
            yield self


def stored_rows(arr: Any, first: np.ndarray, batch: Batch, out: torch.Tensor) -> None:
    """Fill ``out (b, seq, d)`` with each of ``batch``'s samples' stored rows of ``arr`` (a layer's activations;
    ``first``: each sample's first token row), as many as its real tokens; the padding is left as it is."""
    for j, (smp, n) in enumerate(
        zip(batch.samples, batch.attention_mask.sum(1).tolist(), strict=True)
    ):
        a = int(first[int(smp)])
        out[j, :n] = torch.from_numpy(np.asarray(arr[a : a + n], dtype=np.float32)).to(out)


class Sources:
    """A crosscoder's inputs for a batch: this model's live hidden state in its slot, each other model's stored
    rows of the same tokens (row-aligned: one token index) in theirs."""

    def __init__(self, store: Any, sae: SAE, own_key: str) -> None:
        c = sae.cfg
        models, layers = list(c.models or []), list(c.layers or [])
        self.own = models.index(own_key)
        self.arrays = {i: store.activations(m, int(layer)) for i, (m, layer) in enumerate(zip(models, layers, strict=True))
                       if i != self.own}  # fmt: skip
        self.first, _ = store.tokenization(c.tokenization).sample_rows()
        self.n, self.d = len(models), c.d_in

    def rows(self, batch: Batch, own: torch.Tensor) -> torch.Tensor:
        """``(b, seq, n_sources * d)``: ``own`` (b, seq, d) and the others' stored rows, zero at padding."""
        b, seq, _ = own.shape
        out = own.new_zeros(b, seq, self.n, self.d)
        out[:, :, self.own] = own
        for i, arr in self.arrays.items():
            stored_rows(arr, self.first, batch, out[:, :, i])
        return out.reshape(b, seq, self.n * self.d)


class BelowSplice:
    """The blocks below the splice, recorded once and replayed: ``with below.record():`` a forward pass keeps each
    block's output; ``with below.replay():`` those blocks return it without computing (the layers below an edit
    see nothing of it), so an edited pass costs the splice and the layers above it."""

    def __init__(self, head: HeadModel, layer: int) -> None:
        from actstore.models.taps import find_blocks

        self.blocks = list(find_blocks(head.model, head.n_layers))[: min(layer, head.n_layers)]
        self.out: dict[int, Any] = {}

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        self.out = {}

        def keep(i: int) -> Any:
            def hook(_m: Any, _a: Any, out: Any) -> None:
                self.out[i] = out

            return hook

        handles = [b.register_forward_hook(keep(i)) for i, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        if len(self.out) != len(self.blocks):
            raise RuntimeError("BelowSplice.replay without a recorded forward pass")
        for i, b in enumerate(self.blocks):
            # an instance attribute shadows the method: the block returns its recorded output
            b.forward = lambda *_a, _o=self.out[i], **_k: _o
        try:
            yield
        finally:
            for b in self.blocks:
                del b.forward


# ---------------------------------------------------------------- batches and outputs
@dataclass
class Batch:
    """Samples' stored token ids, right-padded."""

    samples: np.ndarray
    """``(b,)`` sample ids."""
    input_ids: torch.Tensor
    """``(b, seq)``."""
    attention_mask: torch.Tensor
    """``(b, seq)``, 1 at real tokens."""


def make_batch(seqs: list[np.ndarray], samples: np.ndarray, pad_id: int, device: str) -> Batch:
    """Right-pad token id sequences into one batch (a causal model's real tokens never see the padding)."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return Batch(samples, torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))


def logits(head: HeadModel, batch: Batch) -> torch.Tensor:
    """The head's output: a classifier's ``(b, n_classes)`` logits, an LM's ``(b, seq, vocab)``, in float32 (or
    float64 for a float64 model)."""
    out = head.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return out.logits.to(torch.promote_types(out.logits.dtype, torch.float32))


def lm_losses(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Each sample's summed next-token cross entropy ``(b,)`` from LM logits ``(b, seq, vocab)``."""
    ce = torch.nn.functional.cross_entropy(
        out[:, :-1].transpose(1, 2), batch.input_ids[:, 1:], reduction="none"
    )  # (b, seq - 1)
    return (ce * batch.attention_mask[:, 1:]).sum(1)


def targets(
    head: HeadModel, out: torch.Tensor, batch: Batch, target: str, labels: np.ndarray | None
) -> list[tuple[str, torch.Tensor]]:
    """``[(class column, per-sample values (b,))]`` an attribution is to: one pair per class for ``logits``, else
    one whose class column is each sample's class (``"*"``: read it from :func:`target_classes`)."""
    if head.kind == "lm":
        return [(NEXT_TOKEN, lm_losses(out, batch))]
    if target == "logits":
        return [(c, out[:, i]) for i, c in enumerate(head.classes)]
    b = torch.arange(out.shape[0], device=out.device)
    if target == "predicted":
        pred = out.detach().argmax(-1)
        return [("*", out.log_softmax(-1)[b, pred])]
    y = torch.from_numpy(np.asarray(labels)).to(
        out.device
    )  # label: logit margin over the best other class
    others = out.masked_fill(torch.nn.functional.one_hot(y, out.shape[1]).bool(), float("-inf"))
    return [("*", out[b, y] - others.max(-1).values)]


def target_classes(
    head: HeadModel, out: torch.Tensor, target: str, labels: np.ndarray | None
) -> list[str]:
    """Each sample's class column for the ``"*"`` targets: the predicted class, or the true label."""
    idx = out.detach().argmax(-1).cpu().numpy() if target == "predicted" else np.asarray(labels)
    return [head.classes[int(i)] for i in idx]
