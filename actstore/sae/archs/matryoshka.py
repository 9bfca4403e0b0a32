"""matryoshka-batchtopk: BatchTopK whose dictionary is trained as nested prefixes (Bussmann et al. 2025; Nabeshima
2024): besides the whole reconstruction, the first ``w`` latents alone must reconstruct the input, for every inner
width ``w`` of ``matryoshka_widths``; the losses are summed. Early latents so learn the general features and later
ones the specific, instead of absorbing a parent into its children. At inference it is a BatchTopK SAE (its
calibrated threshold; exported to SAELens as JumpReLU, as SAELens saves its own)."""

from __future__ import annotations

from actstore.sae.archs.batchtopk import BatchTopK


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
    nested = True
