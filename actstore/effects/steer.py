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


class Steerer:
    """A model with the SAE spliced in, loaded once, that runs texts with one feature clamped (``actstore steer``,
    and the browser's steering form, which names the model's directory itself: ``serve --steer-model``)."""

    def __init__(
        self, store: Store, sae: str, model: str | None, device: str, path: str | None = None
    ) -> None:
        from transformers import AutoTokenizer

        from actstore.effects.run import open_splice
        from actstore.models.loading import from_pretrained

        self.device = device
        self.head, self.splice = open_splice(store, sae, model, device, path)
        if self.splice.sources is not None:
            raise ConfigError(
                f"{sae!r} is a crosscoder: it reads every model's rows of a token, which a free text does not have in "
                "the store; steer an SAE"
            )
        self.sae = sae
        self.tok = from_pretrained(AutoTokenizer, str(path or store.model_info(self.head.key).path))
        self.max_len = int(
            store.tokenization(self.splice.sae.cfg.tokenization).attrs.max_length or 512
        )

    def run(self, feature: int, value: float, text: str, tokens: int = 10) -> SteerResult:
        """``text`` with ``feature`` clamped to ``value`` at every token, beside the unsteered run."""
        import polars as pl
        import torch

        from actstore.effects.ablate import set_feature
        from actstore.effects.splice import logits, make_batch

        head, splice, d_sae = self.head, self.splice, self.splice.sae.cfg.d_sae
        if not 0 <= feature < d_sae:
            raise ConfigError(
                f"--feature {feature} is not a feature of SAE {self.sae!r} (0..{d_sae - 1})"
            )
        ids = np.asarray(
            self.tok(text, truncation=True, max_length=self.max_len)["input_ids"], dtype=np.int64
        )
        edit = set_feature(feature, value)

        def run(seq: np.ndarray, steered: bool) -> Any:
            with torch.no_grad(), splice(edit=edit if steered else None):
                return logits(
                    head, make_batch([seq], np.zeros(1, np.int64), head.pad_id, self.device)
                )[0]

        if head.kind == "classifier":
            p0, p1 = (
                run(ids, False).softmax(-1).cpu().numpy(),
                run(ids, True).softmax(-1).cpu().numpy(),
            )
            table = pl.DataFrame(
                {"class": head.classes, "p_clean": p0, "p_steered": p1, "delta": p1 - p0}
            )
            return SteerResult(table, [
                f"clean: {head.classes[int(p0.argmax())]} ({p0.max():.3f}); feature {feature} = {value:g}: "
                f"{head.classes[int(p1.argmax())]} ({p1.max():.3f})"])  # fmt: skip
        k = max(tokens, 1)
        tops = [torch.topk(run(ids, s)[-1].softmax(-1), k) for s in (False, True)]
        words = [self.tok.convert_ids_to_tokens(t.indices.tolist()) for t in tops]
        table = pl.DataFrame({"rank": list(range(1, k + 1)), "clean": words[0], "p_clean": tops[0].values.cpu().numpy(),
                              "steered": words[1], "p_steered": tops[1].values.cpu().numpy()})  # fmt: skip
        lines = []
        for steered in (False, True):
            seq = ids
            for _ in range(tokens):
                seq = np.append(seq, int(run(seq, steered)[-1].argmax()))
            label = "clean" if not steered else f"feature {feature} = {value:g}"
            lines.append(f"{label}: {self.tok.decode(seq[len(ids) :].tolist())!r}")
        return SteerResult(table, lines)


def steer(store: Store, cfg: SteerConfig) -> SteerResult:
    """Run ``cfg.text`` through the store's model with ``cfg.feature`` clamped to ``cfg.value``."""
    from actstore.models.loading import auto_device

    return Steerer(store, cfg.sae, cfg.model, auto_device(cfg.device)).run(
        cfg.feature, cfg.value, cfg.text, cfg.tokens
    )
