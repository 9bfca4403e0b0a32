"""transcoder: a BatchTopK dictionary that reads one site and writes another (Dunefsky et al. 2024; sparsify,
circuit-tracer): ``y_hat = W_dec act(W_enc x + b_enc) + b_dec (+ W_skip x)``, trained to reconstruct the target
rows ``y`` (``--target SITE@LAYER``, e.g. block 3's MLP output) from the source rows ``x`` (``--source``, e.g. its
MLP input) of the same tokens. The input is not centred by ``b_dec`` (which lives in the target's space). At
inference a latent fires above the calibrated threshold, as BatchTopK's; exported to SAELens as a JumpReLU
transcoder (``jumprelu_skip_transcoder`` with ``--skip``).

Here: its options (``--source``, ``--target``, ``--skip``) checked and resolved to ``SITE@LAYER``, its start from
paired rows, its SAELens mapping. What an SAE with a target is (its rows read side by side,
``TrainConfig.transcoder_pair``; split for the loss, ``SAE.split_rows``; the skip weights) is the SAE module's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from actstore.errors import ConfigError
from actstore.sae.archs.base import DATA_INIT_ENCODER, SAELike
from actstore.sae.archs.batchtopk import BatchTopK

if TYPE_CHECKING:
    import torch


def parse_site(spec: str, layer: int) -> str:
    """``SITE[@LAYER]`` as ``SITE@LAYER`` (``layer`` when none is given); ConfigError for an unknown site."""
    from actstore.models.names import SITES

    site, _, at = str(spec).partition("@")
    if site not in SITES:
        raise ConfigError(f"unknown site {site!r} in {spec!r}: choose one of {', '.join(SITES)}")
    try:
        n = int(at) if at else int(layer)
    except ValueError:
        raise ConfigError(
            f"the layer of {spec!r} is not a number: write SITE@LAYER, e.g. mlp_out@3"
        ) from None
    if n < 0:
        raise ConfigError(f"the layer of {spec!r} must be >= 0")
    return f"{site}@{n}"


class Transcoder(BatchTopK):
    name = "transcoder"
    transcoder = True
    crosscoder = False
    saelens_architecture = "jumprelu_transcoder"
    options = ("source", "target", "skip")

    def check(self, cfg: Any, crosscoder: bool) -> None:
        """--source / --target resolved to ``SITE@LAYER`` (so checking again changes nothing), and ``model`` /
        ``layer`` set to the source's."""
        if cfg.target is None:
            raise ConfigError(
                "--arch transcoder needs --target SITE[@LAYER], e.g. --source mlp_in --target mlp_out"
            )
        if cfg.resample:
            raise ConfigError("--resample is for SAEs, not transcoders")
        cfg.source = parse_site(cfg.source or "resid", cfg.layer)
        cfg.target = parse_site(cfg.target, cfg.layer)
        src, _ = cfg.transcoder_pair()
        cfg.model, cfg.layer = src.model, src.layer

    def default_init(self, crosscoder: bool) -> str:
        return (
            "data"  # paired rows: each latent reads a source row and writes its target row (start)
        )

    def start(self, sae: Any, rows_n: torch.Tensor, mean_n: torch.Tensor) -> None:
        """Latent ``i`` reads the direction of source row ``i`` less the source mean (the encoder at
        :data:`DATA_INIT_ENCODER`) and writes that of its target row less ``b_dec``; latents past ``m`` stay random.
        ``rows_n (m, 2 * d_in)`` / ``mean_n (2 * d_in,)``: source and target side by side. The encoder bias then
        centres every pre-activation on the source mean, since the input is not centred by ``b_dec``. Half the
        latents of a random start stayed dead; this one leaves a fifth (MiniLM block 3, docs/TRAINING.md)."""
        import torch

        d = sae.cfg.d_in
        with torch.no_grad():
            m = min(len(rows_n), sae.cfg.d_sae)
            src_mean = mean_n[:d].to(sae.W_dec)  # (d_in,)
            src = rows_n[:m, :d].to(sae.W_dec) - src_mean  # (m, d_in)
            tgt = rows_n[:m, d:].to(sae.W_dec) - sae.b_dec  # (m, d_out)
            ok = ((src.norm(dim=1) > 1e-6) & (tgt.norm(dim=1) > 1e-6)).nonzero().squeeze(1)
            sae.W_dec[ok] = tgt[ok] / tgt[ok].norm(dim=1, keepdim=True)
            sae.W_enc[:, ok] = (src[ok] / src[ok].norm(dim=1, keepdim=True)).t() * DATA_INIT_ENCODER
            sae.b_enc.copy_(-(src_mean @ sae.W_enc))

    def saelens_cfg(self, sae: SAELike) -> dict[str, Any]:
        out: dict[str, Any] = {
            "activation_fn_kwargs": {},
            "d_out": sae.cfg.d_in,
            "apply_b_dec_to_input": False,
        }
        if sae.cfg.skip:
            out["architecture"] = "jumprelu_skip_transcoder"
        return out
