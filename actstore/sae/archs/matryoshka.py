"""matryoshka-batchtopk: BatchTopK whose dictionary is trained as nested prefixes (Bussmann et al. 2025; Nabeshima
2024): besides the whole reconstruction, the first ``w`` latents alone must reconstruct the input, for every inner
width ``w`` of ``matryoshka_widths``; the losses are summed. Early latents so learn the general features and later
ones the specific, instead of absorbing a parent into its children. At inference it is a BatchTopK SAE (its
calibrated threshold; exported to SAELens as JumpReLU, as SAELens saves its own).

Everything Matryoshka is lives here: its option (``--matryoshka-widths``) checked and resolved, and its nested
losses; the rest is BatchTopK's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from actstore.errors import ConfigError
from actstore.sae.archs.base import Entries
from actstore.sae.archs.batchtopk import BatchTopK

if TYPE_CHECKING:
    import torch


def default_widths(d_sae: int) -> list[int]:
    """The default prefixes: d_sae / 16, / 8, / 4, / 2 and d_sae (each at least 1, strictly increasing)."""
    out: list[int] = []
    for div in (16, 8, 4, 2, 1):
        w = max(1, d_sae // div)
        if not out or w > out[-1]:
            out.append(w)
    return out


class MatryoshkaBatchTopK(BatchTopK):
    name = "matryoshka-batchtopk"
    crosscoder = False
    options = ("matryoshka_widths",)

    def check(self, cfg: Any, crosscoder: bool) -> None:
        if cfg.matryoshka_widths is None:
            return
        ws = [int(w) for w in cfg.matryoshka_widths]
        if not ws or ws[0] < 1 or any(b <= a for a, b in zip(ws, ws[1:], strict=False)):
            raise ConfigError(
                f"--matryoshka-widths must increase from at least 1, e.g. 64,256,1024; got {ws}"
            )
        cfg.matryoshka_widths = ws

    def resolve(self, cfg: Any, d_sae: int) -> dict[str, Any]:
        """The prefixes below d_sae (given, or :func:`default_widths`), then d_sae: the whole dictionary."""
        widths = cfg.matryoshka_widths or default_widths(d_sae)
        return {"matryoshka_widths": [w for w in widths if w < d_sae] + [d_sae]}

    def extra_loss(
        self, sae: Any, entries: Entries, target_n: torch.Tensor, options: Mapping[str, Any]
    ) -> torch.Tensor | None:
        """For each inner width ``w`` (the last, d_sae, is the whole reconstruction's loss), the MSE of
        reconstructing the target from the kept entries of the first ``w`` latents alone, summed."""
        import torch

        from actstore.sae.sparse import decode_entries

        v, tok, lat, b = entries
        total = torch.zeros((), device=target_n.device)
        for w in (options.get("matryoshka_widths") or [])[:-1]:
            x_w = decode_entries(v * (lat < w), tok, lat, b, sae.W_dec, sae.b_dec)  # (b, d_out)
            total = total + ((x_w - target_n) ** 2).mean()
        return total
