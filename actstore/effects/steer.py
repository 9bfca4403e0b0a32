"""Steering a live text (``actstore steer``): the model with one SAE feature clamped at every token, beside the
unsteered run (the SAE spliced in with its error added back, so the unsteered run is the model's own output)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.effects.config import SteerConfig
from actstore.errors import ConfigError

if TYPE_CHECKING:
    import polars as pl

    from actstore.store.reader import Store


@dataclass
class SteerResult:
    """The two runs side by side."""

    table: pl.DataFrame
    """A classifier's ``class, p_clean, p_steered, delta``; an LM's top next tokens ``rank, clean, p_clean,
    steered, p_steered``."""
    lines: list[str]
    """The prediction (classifier) or the greedy continuation (LM), clean then steered."""


def steer(store: Store, cfg: SteerConfig) -> SteerResult:
    """Run ``cfg.text`` through the store's model with ``cfg.feature`` clamped to ``cfg.value``."""
    import polars as pl
    import torch
    from transformers import AutoTokenizer

    from actstore.effects.ablate import zero_or_mean
    from actstore.effects.run import open_splice
    from actstore.effects.splice import logits, make_batch
    from actstore.models.loading import auto_device, from_pretrained

    device = auto_device(cfg.device)
    head, splice = open_splice(store, cfg.sae, cfg.model, device)
    if cfg.feature >= splice.sae.cfg.d_sae:
        raise ConfigError(
            f"--feature {cfg.feature} is not a feature of SAE {cfg.sae!r} (0..{splice.sae.cfg.d_sae - 1})"
        )
    tok = from_pretrained(AutoTokenizer, str(store.model_info(head.key).path))
    max_len = int(store.tokenization(splice.sae.cfg.tokenization).attrs.max_length or 512)
    ids = np.asarray(
        tok(cfg.text, truncation=True, max_length=max_len)["input_ids"], dtype=np.int64
    )
    edit = zero_or_mean(cfg.feature, cfg.value)

    def run(seq: np.ndarray, steered: bool) -> Any:
        with torch.no_grad(), splice(edit=edit if steered else None):
            return logits(head, make_batch([seq], np.zeros(1, np.int64), head.pad_id, device))[0]

    if head.kind == "classifier":
        p0, p1 = run(ids, False).softmax(-1).cpu().numpy(), run(ids, True).softmax(-1).cpu().numpy()
        table = pl.DataFrame(
            {"class": head.classes, "p_clean": p0, "p_steered": p1, "delta": p1 - p0}
        )
        return SteerResult(table, [
            f"clean: {head.classes[int(p0.argmax())]} ({p0.max():.3f}); feature {cfg.feature} = {cfg.value:g}: "
            f"{head.classes[int(p1.argmax())]} ({p1.max():.3f})"])  # fmt: skip
    k = max(cfg.tokens, 1)
    last = [run(ids, s)[-1].softmax(-1) for s in (False, True)]
    tops = [torch.topk(p, k) for p in last]
    words = [tok.convert_ids_to_tokens(t.indices.tolist()) for t in tops]
    table = pl.DataFrame({"rank": list(range(1, k + 1)), "clean": words[0], "p_clean": tops[0].values.cpu().numpy(),
                          "steered": words[1], "p_steered": tops[1].values.cpu().numpy()})  # fmt: skip
    lines = []
    for steered in (False, True):
        seq = ids
        for _ in range(cfg.tokens):
            seq = np.append(seq, int(run(seq, steered)[-1].argmax()))
        label = "clean" if not steered else f"feature {cfg.feature} = {cfg.value:g}"
        lines.append(f"{label}: {tok.decode(seq[len(ids) :].tolist())!r}")
    return SteerResult(table, lines)
