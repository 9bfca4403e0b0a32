"""transcoder: a BatchTopK dictionary that reads one site and writes another (Dunefsky et al. 2024; sparsify,
circuit-tracer): ``y_hat = W_dec act(W_enc x + b_enc) + b_dec (+ W_skip x)``, trained to reconstruct the target
rows ``y`` (``--target SITE@LAYER``, e.g. block 3's MLP output) from the source rows ``x`` (``--source``, e.g. its
MLP input) of the same tokens. The input is not centred by ``b_dec`` (which lives in the target's space). At
inference a latent fires above the calibrated threshold, as BatchTopK's; exported to SAELens as a JumpReLU
transcoder (``jumprelu_skip_transcoder`` with ``--skip``)."""

from __future__ import annotations

from typing import Any

from actstore.sae.archs.base import SAELike
from actstore.sae.archs.batchtopk import BatchTopK


class Transcoder(BatchTopK):
    name = "transcoder"
    transcoder = True
    saelens_architecture = "jumprelu_transcoder"

    def default_init(self, crosscoder: bool) -> str:
        return "data"  # paired rows: each latent reads a source row and writes its target row (SAE.init_transcoder)

    def saelens_cfg(self, sae: SAELike) -> dict[str, Any]:
        out: dict[str, Any] = {
            "activation_fn_kwargs": {},
            "d_out": sae.cfg.d_in,
            "apply_b_dec_to_input": False,
        }
        if sae.cfg.skip:
            out["architecture"] = "jumprelu_skip_transcoder"
        return out
