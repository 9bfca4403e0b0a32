"""Sparse autoencoder architectures and their on-disk form.

``relu-l1``   the paper's: ``h = ReLU(W_enc (x - b_dec) + b_enc)``, ``x_hat = W_dec h + b_dec``;
              trained with ``MSE + l1 * sum_i h_i * ||W_dec_i||`` (the L1 is weighted by
              decoder row norms, so it cannot be dodged by shrinking the code).
``topk``      Gao et al. 2024: keep the k largest pre-activations (after ReLU); decoder
              rows kept at unit norm; an auxiliary loss revives dead latents.
``batchtopk`` top ``k * batch`` over the whole batch while training, a learned global
              threshold at inference (``threshold`` buffer).
``jumprelu``  ``h = ReLU(pre) * (pre > theta)`` with a threshold per feature (``threshold (d_sae,)``);
              imported from SAELens (``actstore import-sae``), not trained here.

An imported SAE may also normalise each token before encoding (``cfg.input_norm``, SAELens's
``constant_norm_rescale`` or ``layer_norm``); :meth:`SAE.forward` undoes it on the reconstruction.

Inputs are multiplied by ``cfg.norm_scale`` before encoding (so the training
data has a fixed mean squared norm, ``d_in``) and reconstructions divided by it,
so callers always work in the model's own activation space.

A **crosscoder** (``cfg.models``: several row-aligned sources, e.g. a pretrained and a fine-tuned model at one
layer; Lindsey et al. 2024) is the same module on the sources' activations side by side: input ``(n, n_sources *
d_in)``, each source scaled by its own ``cfg.norm_scales`` entry, one encoder summing the per-source projections,
one decoder block per source. It is stored with the source axis explicit: ``W_enc (n_sources, d_in, d_sae)``,
``W_dec (d_sae, n_sources, d_in)``, ``b_dec (n_sources, d_in)``. For topk / batchtopk each latent's decoder rows
have unit norm jointly over the sources (so each source's share of it is free: the decoder norms the diff
reads); relu-l1's L1 weights each activation by the *sum* of its per-source decoder norms (Lindsey et al.).

Weights are stored as ``sae.safetensors`` (``W_enc (d_in, d_sae)``, ``b_enc
(d_sae,)``, ``W_dec (d_sae, d_in)``, ``b_dec (d_in,)``, ``threshold ()``) with
``cfg.json`` beside them and ``metrics.json`` from training, under
``STORE/saes/NAME/``. ``cfg.json`` is written last: a folder without it is an
unfinished run (it may hold ``checkpoint/``) and is not listed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from actstore.errors import ConfigError, IntegrityError
from actstore.sae.archs import get_arch
from actstore.sae.archs.base import DATA_INIT_ENCODER
from actstore.sae.config import SAEConfig, parse_config
from actstore.sae.sparse import decode_topk

if TYPE_CHECKING:
    from actstore.store.reader import Store


class SAEOutput(NamedTuple):
    """One SAE pass."""

    x_hat: torch.Tensor
    """Reconstruction ``(n, d_in)`` in the model's activation space."""
    acts: torch.Tensor
    """Feature activations ``(n, d_sae)``."""
    pre: torch.Tensor
    """Pre-activations ``(n, d_sae)`` (before ReLU / top-k)."""


TOPK_ENCODER_INIT = 0.5
"""topk / batchtopk: the encoder starts as the decoder's transpose times this. Sign descent moves every weight by
the same step, so a smaller encoder lets the first steps reshape it (sparsify's ``nn.Linear`` encoder starts near
0.4 of its unit decoder rows); 0.5 kept the planted atoms a smaller one lost. Measured: docs/benchmarks/LOG.md,
"Issue 10"."""


RELU_DECODER_INIT_NORM = 0.1
"""relu-l1: decoder rows start at this norm (the encoder is their transpose), as SAELens's standard SAE
(``decoder_init_norm``, after Anthropic's April 2024 update): unit rows make every feature expensive under the
decoder-norm-weighted L1 from the first step (docs/benchmarks/LOG.md, "Issue 10")."""


def threshold_like(cfg: SAEConfig) -> torch.Tensor:
    """A zero ``threshold`` buffer of the architecture's shape: one per feature ``(d_sae,)`` (jumprelu) or ``()``."""
    return torch.zeros(cfg.d_sae) if get_arch(cfg.arch).per_feature_threshold else torch.tensor(0.0)


class Reconstruction(NamedTuple):
    """:meth:`SAE.reconstruct`'s answer."""

    x_hat: torch.Tensor
    """(n, d_in) reconstruction in the model's activation space."""
    fired: torch.Tensor
    """(d_sae,) int64 tokens each feature was active on."""


class SAE(nn.Module):
    """A sparse autoencoder; see the module docstring for the architectures."""

    threshold: torch.Tensor
    """jumprelu: per-feature thresholds ``(d_sae,)``; batchtopk: the inference threshold ``()``."""
    scale: torch.Tensor
    """Input scale to mean squared norm d_in: ``()``, or ``(n_sources * d_in,)`` for a crosscoder (each source's
    columns its own)."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = (
            cfg.n_sources * cfg.d_in,
            cfg.d_sae,
        )  # a crosscoder's input: its sources side by side
        w = torch.randn(d_sae, d_in)
        w = w / w.norm(dim=1, keepdim=True)
        # (a crosscoder keeps unit rows: not measured for it)
        if get_arch(cfg.arch).l1_penalty and not cfg.is_crosscoder:
            # rows of norm 0.1, the encoder their transpose (SAELens's standard SAE)
            w = w * RELU_DECODER_INIT_NORM
        enc_scale = self._encoder_scale(TOPK_ENCODER_INIT)
        # (d_sae, d_in): unit rows (topk, batchtopk) or RELU_DECODER_INIT_NORM
        self.W_dec = nn.Parameter(w.clone())
        self.W_enc = nn.Parameter(w.t() * enc_scale)  # (d_in, d_sae) = W_dec^T, scaled
        self.b_enc = nn.Parameter(torch.zeros(d_sae))  # (d_sae,)
        self.b_dec = nn.Parameter(torch.zeros(d_in))  # (d_in,), in normalised space
        # batchtopk: one inference threshold (); jumprelu: one per feature (d_sae,)
        self.register_buffer("threshold", threshold_like(cfg))
        # the input scale: () for an SAE, (n_sources * d_in,) for a crosscoder (each source's columns its own scale)
        if cfg.is_crosscoder:
            scale = torch.tensor(cfg.norm_scales, dtype=torch.float32).repeat_interleave(cfg.d_in)
        else:
            scale = torch.tensor(float(cfg.norm_scale))
        self.register_buffer("scale", scale, persistent=False)
        # the scale of the rows it reconstructs: a transcoder's target's, else its input's (a crosscoder's per column)
        out_scale = torch.tensor(cfg.target_scale) if cfg.is_transcoder else scale.clone()
        self.register_buffer("out_scale", out_scale, persistent=False)
        if cfg.skip:  # transcoder: x_hat += x W_skip^T, in the normalised spaces; starts at zero
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_in))  # (d_out, d_in)

    def _encoder_scale(self, topk_scale: float) -> float:
        """The encoder starts as ``W_dec^T`` times this: 1 for relu-l1, ``topk_scale`` for topk / batchtopk."""
        return 1.0 if get_arch(self.cfg.arch).l1_penalty else topk_scale

    @torch.no_grad()
    def init_from_rows(self, rows_n: torch.Tensor) -> None:
        """``--init data``: decoder row ``i`` points along ``rows_n[i] - b_dec`` (``rows_n (m, d_input)``: training
        rows in normalised space, after ``b_dec`` is set), keeping its norm; rows past ``m`` stay random. The encoder
        becomes the decoder's transpose times :data:`DATA_INIT_ENCODER` (relu-l1: 1)."""
        m = min(len(rows_n), self.cfg.d_sae)
        centred = rows_n[:m].to(self.W_dec) - self.b_dec  # (m, d_input)
        norms = centred.norm(dim=1, keepdim=True)
        # a row equal to the mean has no direction: keep it random
        ok = (norms[:, 0] > 1e-6).nonzero().squeeze(1)
        keep = self.W_dec[:m].norm(dim=1, keepdim=True)  # (m, 1)
        self.W_dec[ok] = centred[ok] / norms[ok] * keep[ok]
        self.W_enc.copy_(self.W_dec.t() * self._encoder_scale(DATA_INIT_ENCODER))

    @property
    def d_input(self) -> int:
        """Width of the rows it reads: ``d_in`` for an SAE, ``n_sources * d_in`` for a crosscoder."""
        return self.cfg.n_sources * self.cfg.d_in

    def decoder_norms(self) -> torch.Tensor:
        """``(d_sae, n_sources)``: the norm of each latent's decoder row in each source, in the normalised space
        (every source scaled to mean squared norm ``d_in``), so that a latent equally present in two models whose
        activations differ in scale has equal norms."""
        c = self.cfg
        return self.W_dec.detach().view(c.d_sae, c.n_sources, c.d_in).norm(dim=-1)

    def l1_weights(self) -> torch.Tensor:
        """``(d_sae,)``: what relu-l1's L1 multiplies each activation by: its decoder row's norm (an SAE) or the sum of
        its per-source decoder norms (a crosscoder, Lindsey et al. 2024), in the normalised space."""
        c = self.cfg
        if not c.is_crosscoder:
            return self.W_dec.norm(dim=1)
        return self.W_dec.view(c.d_sae, c.n_sources, c.d_in).norm(dim=-1).sum(-1)

    # ---- core ----------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``(n, d_sae)`` of raw activations ``x (n, d_in)``."""
        return self._pre_from(self._norm_in(x.to(self.W_enc.dtype))[0])

    def _pre_from(self, x_normed: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``(n, d_sae)`` of inputs already through ``input_norm`` (not yet scaled by norm_scale)."""
        xc = self.centred(x_normed * self.scale)  # (n, d_in)
        if xc.dim() == 2:  # the bias added inside the matmul: one pass over (n, d_sae) fewer
            return torch.addmm(self.b_enc, xc, self.W_enc)
        return xc @ self.W_enc + self.b_enc

    def centred(self, x_scaled: torch.Tensor) -> torch.Tensor:
        """What the encoder reads of scaled inputs ``(n, d_in)``: ``x - b_dec``; a transcoder's as they are (its
        ``b_dec`` is in its target's space)."""
        return x_scaled if self.cfg.is_transcoder else x_scaled - self.b_dec

    def _norm_in(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(x normalised per token, (shift, scale) to undo it)`` for ``cfg.input_norm`` (as SAELens computes it)."""
        how = self.cfg.input_norm
        if how == "none":
            return x, None
        if how == "constant_norm_rescale":
            coeff = self.cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True)  # (n, 1)
            return x * coeff, (torch.zeros_like(coeff), 1 / coeff)
        mu = x.mean(dim=-1, keepdim=True)  # layer_norm: (n, 1)
        std = (x - mu).std(dim=-1, keepdim=True)
        return (x - mu) / (std + 1e-5), (mu, std)

    def activate(self, pre: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Feature activations from pre-activations ``(n, d_sae)``.

        ``train`` selects batchtopk's batch-level top-k; at inference batchtopk
        keeps pre-activations above the learned threshold (per-token top-k if
        no threshold was learned).
        """
        return get_arch(self.cfg.arch).activate(self, pre, train)

    def decode_normalised(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``(n, d_in)`` in the normalised input space (what training compares)."""
        if acts.dim() == 2 and self.b_dec.dim() == 1:
            return torch.addmm(self.b_dec, acts, self.W_dec)
        return acts @ self.W_dec + self.b_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``(n, d_sae)`` of raw activations ``x (n, d_in)`` (inference)."""
        return self.activate(self.pre_acts(x), train=False)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``(n, d_in)`` in the model's activation space (an SAE with a per-token ``input_norm``:
        in the normalised space; :meth:`forward` undoes it). A transcoder's is of its target, less the skip
        connection's part (:meth:`forward` adds it: it needs the input)."""
        return self.decode_normalised(acts) / self.out_scale

    def skip_normalised(self, x_scaled: torch.Tensor) -> torch.Tensor:
        """A skip transcoder's linear part ``(n, d_in)`` from its scaled input (normalised output space)."""
        return x_scaled @ self.W_skip.T

    def forward(self, x: torch.Tensor, train: bool = False) -> SAEOutput:
        # normalised once: pre-activations and the undo
        x_normed, undo = self._norm_in(x.to(self.W_enc.dtype))
        pre = self._pre_from(x_normed)
        acts = self.activate(pre, train=train)
        x_hat = self.decode(acts)
        if self.cfg.skip:
            x_hat = x_hat + self.skip_normalised(x_normed * self.scale) / self.out_scale
        if undo is not None:  # back from the per-token normalised space
            x_hat = x_hat * undo[1] + undo[0]
        return SAEOutput(x_hat, acts, pre)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> Reconstruction:
        """Inference reconstruction of raw ``x (n, d_in)`` and how many tokens each feature fired on, as
        :meth:`forward` computes them; topk without the dense ``(n, d_sae)`` activations (its top-k entries and an
        embedding-bag decoder: a third of the time, what held-out evaluation during training runs)."""
        if not get_arch(self.cfg.arch).fixed_topk:
            out = self(x)
            return Reconstruction(out.x_hat, (out.acts > 0).sum(0))
        x_normed, undo = self._norm_in(x.to(self.W_enc.dtype))
        vals, idx = self._pre_from(x_normed).topk(int(self.cfg.k), dim=-1, sorted=False)  # type: ignore[arg-type]
        vals = vals.clamp_min(0)  # (n, k)
        x_hat = decode_topk(vals, idx, self.W_dec, self.b_dec) / self.scale  # (n, d_in)
        if undo is not None:
            x_hat = x_hat * undo[1] + undo[0]
        return Reconstruction(x_hat, torch.bincount(idx[vals > 0], minlength=self.cfg.d_sae))

    # ---- training helpers ----------------------------------------------
    @torch.no_grad()
    def set_decoder_norm(self) -> None:
        """Scale decoder rows to unit norm (topk / batchtopk keep them there)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the part of W_dec's gradient that would change row norms (Gao et al. 2024)."""
        if self.W_dec.grad is None:
            return
        w, g = self.W_dec, self.W_dec.grad  # (d_sae, d_in)
        g.sub_((g * w).sum(dim=1, keepdim=True) * w)

    # ---- persistence ---------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as stored: a crosscoder's with its source axis (``W_enc (n_sources, d_in, d_sae)``, ``W_dec
        (d_sae, n_sources, d_in)``, ``b_dec (n_sources, d_in)``), an SAE's as they are."""
        t = self.state_tensors()
        c = self.cfg
        if c.is_crosscoder:
            m, d = c.n_sources, c.d_in
            t["W_enc"] = t["W_enc"].view(m, d, c.d_sae).contiguous()
            t["W_dec"] = t["W_dec"].view(c.d_sae, m, d).contiguous()
            t["b_dec"] = t["b_dec"].view(m, d).contiguous()
        return t

    def to_bytes(self) -> tuple[bytes, bytes]:
        """``(sae.safetensors bytes, cfg.json bytes)``."""
        kind = "actstore-crosscoder" if self.cfg.is_crosscoder else "actstore-sae"
        return st_save(self.file_tensors(), metadata={"format": kind}), self.cfg.to_json().encode()

    @classmethod
    def from_bytes(cls, weights: bytes, cfg_json: bytes, where: str = "SAE") -> SAE:
        cfg = parse_config(cfg_json, where)
        sae = cls(cfg)
        try:
            tensors = st_load(weights)
        except (
            Exception
        ) as exc:  # safetensors raises its own SafetensorError on truncated or garbled files
            raise IntegrityError(
                f"{where}: sae.safetensors does not load ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                "the file is damaged: re-train the SAE or re-copy the store"
            ) from None
        expect = {
            "W_enc": (cfg.d_in, cfg.d_sae),
            "b_enc": (cfg.d_sae,),
            "W_dec": (cfg.d_sae, cfg.d_in),
            "b_dec": (cfg.d_in,),
        }
        if cfg.skip:
            expect["W_skip"] = (cfg.d_in, cfg.d_in)
        if cfg.is_crosscoder:
            m = cfg.n_sources
            expect |= {
                "W_enc": (m, cfg.d_in, cfg.d_sae),
                "W_dec": (cfg.d_sae, m, cfg.d_in),
                "b_dec": (m, cfg.d_in),
            }
        for name, shape in expect.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape) if name in tensors else "missing"
                raise ConfigError(
                    f"SAE weights {name} should have shape {shape} for cfg.json, got {got}"
                )
        if cfg.is_crosscoder:  # the module holds them flat: sources side by side
            tensors["W_enc"] = tensors["W_enc"].reshape(sae.d_input, cfg.d_sae)
            tensors["W_dec"] = tensors["W_dec"].reshape(cfg.d_sae, sae.d_input)
            tensors["b_dec"] = tensors["b_dec"].reshape(sae.d_input)
        tensors.setdefault("threshold", threshold_like(cfg))
        if tuple(tensors["threshold"].shape) != tuple(sae.threshold.shape):
            raise ConfigError(
                f"SAE weights threshold should have shape {tuple(sae.threshold.shape)} for cfg.json, "
                f"got {tuple(tensors['threshold'].shape)}"
            )
        sae.load_state_dict(tensors)
        return sae.eval()

    def raw_space_tensors(self) -> dict[str, torch.Tensor]:
        """Weights with ``norm_scale`` folded in, so they act on raw activations directly.

        ``acts = act_fn((x - b_dec) @ W_enc + b_enc)`` and ``x_hat = acts @ W_dec + b_dec``
        with ``x`` and ``x_hat`` in the model's activation space; feature
        activations are unchanged.
        """
        if self.cfg.is_crosscoder:
            raise ConfigError(
                f"{self.cfg.name or 'this SAE'} is a crosscoder: it exports as an actstore folder only"
            )
        s, o = float(self.cfg.norm_scale), self.cfg.target_scale
        t = self.state_tensors()
        out = {
            "W_enc": (t["W_enc"] * s).contiguous(),  # (d_in, d_sae)
            "b_enc": t["b_enc"],  # (d_sae,)
            "W_dec": (t["W_dec"] / o).contiguous(),  # (d_sae, d_out)
            "b_dec": (t["b_dec"] / o).contiguous(),  # (d_out,)
        }
        if self.cfg.skip:  # (d_out, d_in): x W_skip^T on raw rows
            out["W_skip"] = (t["W_skip"] * (s / o)).contiguous()
        return out

    def split_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of training rows: a transcoder's rows hold its source and target side by side
        ``(n, 2 * d_in)``; an SAE's are both."""
        if not self.cfg.is_transcoder:
            return rows, rows
        d = self.cfg.d_in
        return rows[:, :d], rows[:, d:]


def check_d_in(cfg: SAEConfig, d_model: int, where: str, name: str | None = None) -> None:
    """Raise ConfigError unless an SAE reading ``d_in`` fits activations of width ``d_model`` (``where`` names them)."""
    if cfg.d_in != d_model:
        raise ConfigError(
            f"SAE {name or cfg.name or '(unnamed)'} reads d_in {cfg.d_in} but {where} has d_model {d_model}: "
            f"use an SAE trained on that layer (it was trained on {cfg.model} layer {cfg.layer})"
        )


def check_fits(store: Store, cfg: SAEConfig, name: str) -> Any:
    """The activations (``Store.activations``; a crosscoder's sources side by side, ``StackedActivations``) an SAE
    reads, after checking that it fits them.

    The one "does this SAE fit this layer" check (train's resume, encode, diff-features): model and layer recorded,
    the layer's width equal to the SAE's ``d_in``, and the tokenization it was trained on.
    """
    if cfg.model is None or cfg.layer is None:
        raise ConfigError(
            f"SAE {name!r} has no model/layer in its cfg.json: it cannot be matched to the store's rows"
        )
    if cfg.is_crosscoder:
        from actstore.store.aligned import stacked_activations
        from actstore.store.config import Source

        stacked = stacked_activations(
            store,
            [Source(m, int(v)) for m, v in zip(cfg.models or [], cfg.layers or [], strict=True)],
        )
        check_d_in(cfg, stacked.d_source, f"{', '.join(cfg.source_labels())} of {store.url}", name)
        if cfg.tokenization and stacked.tokenization and cfg.tokenization != stacked.tokenization:
            raise ConfigError(
                f"crosscoder {name!r} was trained on tokenization {cfg.tokenization}, but its models use "
                f"{stacked.tokenization}"
            )
        return stacked
    acts = store.activations(cfg.model, cfg.layer)
    check_d_in(cfg, acts.d_model, f"{cfg.model} layer {cfg.layer} of {store.url}", name)
    tk = store.model_info(cfg.model).tokenization
    if cfg.tokenization and tk and cfg.tokenization != tk:
        raise ConfigError(
            f"SAE {name!r} was trained on tokenization {cfg.tokenization}, but {cfg.model} uses {tk}"
        )
    return acts


"""An SAE whose held-out L0 exceeds this fraction of d_sae is flagged dense (``saes``, the report)."""
