"""Sparse autoencoder architectures and their on-disk form.

``relu-l1``   the paper's: ``h = ReLU(W_enc (x - b_dec) + b_enc)``, L1 penalty weighted
              by decoder column norms (train stage).
``topk``      Gao et al. 2024: keep the k largest pre-activations (after ReLU).
``batchtopk`` top ``k * batch`` over the whole batch while training, a learned global
              threshold at inference.

Inputs are multiplied by ``cfg.norm_scale`` before encoding (so the training
data has a fixed mean squared norm) and reconstructions divided by it, so
callers always work in the model's own activation space.

Weights are stored as ``sae.safetensors`` (``W_enc (d_in, d_sae)``, ``b_enc
(d_sae,)``, ``W_dec (d_sae, d_in)``, ``b_dec (d_in,)``, ``threshold ()``) with
``cfg.json`` beside them, under ``STORE/saes/NAME/``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .errors import ConfigError, NotFoundError

if TYPE_CHECKING:
    from .store import Store

ARCHS = ("relu-l1", "topk", "batchtopk")


@dataclass
class SAEConfig:
    """Architecture and provenance of one SAE (saved as ``cfg.json``)."""

    arch: str
    """relu-l1, topk or batchtopk."""
    d_in: int
    """Width of the activations it reads (the layer's d_model)."""
    d_sae: int
    """Number of features (dictionary size)."""
    k: int | None = None
    """Active features per token for topk / batchtopk."""
    l1: float = 1e-3
    """L1 coefficient for relu-l1."""
    norm_scale: float = 1.0
    """Inputs are multiplied by this before encoding (fixed mean squared norm)."""
    model: str | None = None
    """Store key of the model whose activations it was trained on."""
    layer: int | None = None
    """Layer (hidden_states index) it was trained on."""
    tokenization: str | None = None
    """Tokenization key of the rows it was trained on."""
    name: str | None = None
    """Name under STORE/saes/."""
    training: dict[str, Any] = field(default_factory=dict)
    """The training config it was made with."""
    actstore_version: str | None = None
    """actstore version that trained it."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown SAE architecture {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ConfigError(f"d_in and d_sae must be positive (got {self.d_in}, {self.d_sae})")
        if self.arch in ("topk", "batchtopk"):
            if not self.k or not 0 < self.k <= self.d_sae:
                raise ConfigError(f"{self.arch} needs --k between 1 and d_sae ({self.d_sae}), got {self.k}")
        if self.norm_scale <= 0:
            raise ConfigError(f"norm_scale must be positive, got {self.norm_scale}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class SAEOutput(NamedTuple):
    """One SAE pass. All in normalised input space except where noted."""

    x_hat: torch.Tensor
    """Reconstruction ``(n, d_in)`` in the model's activation space."""
    acts: torch.Tensor
    """Feature activations ``(n, d_sae)``."""
    pre: torch.Tensor
    """Pre-activations ``(n, d_sae)`` (before ReLU / top-k)."""


class SAE(nn.Module):
    """A sparse autoencoder; see the module docstring for the architectures."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        w = torch.randn(d_sae, d_in)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.clone())  # (d_sae, d_in), unit rows
        self.W_enc = nn.Parameter(w.t().clone())  # (d_in, d_sae) = W_dec^T
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("threshold", torch.tensor(0.0))  # batchtopk inference threshold

    # ---- core ----------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``(n, d_sae)`` of raw activations ``x (n, d_in)``."""
        xn = x.to(self.W_enc.dtype) * self.cfg.norm_scale
        return (xn - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Feature activations from pre-activations ``(n, d_sae)``."""
        arch, k = self.cfg.arch, self.cfg.k
        if arch == "relu-l1":
            return torch.relu(pre)
        if arch == "topk" or (arch == "batchtopk" and not train and float(self.threshold) <= 0):
            vals, idx = pre.topk(int(k), dim=-1)  # type: ignore[arg-type]
            return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))
        if train:  # batchtopk: top k*n over the whole batch
            flat = torch.relu(pre).flatten()
            n_keep = min(int(k) * pre.shape[0], flat.numel())  # type: ignore[operator]
            vals, idx = flat.topk(n_keep)
            return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(pre)
        return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``(n, d_sae)`` of raw activations ``x (n, d_in)`` (inference)."""
        return self.activate(self.pre_acts(x), train=False)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``(n, d_in)`` in the model's activation space."""
        return (acts @ self.W_dec + self.b_dec) / self.cfg.norm_scale

    def forward(self, x: torch.Tensor, train: bool = False) -> SAEOutput:
        pre = self.pre_acts(x)
        acts = self.activate(pre, train=train)
        return SAEOutput(self.decode(acts), acts, pre)

    # ---- persistence ---------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}

    def to_bytes(self) -> tuple[bytes, bytes]:
        """``(sae.safetensors bytes, cfg.json bytes)``."""
        return st_save(self.state_tensors(), metadata={"format": "actstore-sae"}), self.cfg.to_json().encode()

    @classmethod
    def from_bytes(cls, weights: bytes, cfg_json: bytes) -> SAE:
        cfg = SAEConfig.from_dict(json.loads(cfg_json))
        sae = cls(cfg)
        tensors = st_load(weights)
        expect = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
        for name, shape in expect.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape) if name in tensors else "missing"
                raise ConfigError(f"SAE weights {name} should have shape {shape} for cfg.json, got {got}")
        tensors.setdefault("threshold", torch.tensor(0.0))
        sae.load_state_dict(tensors)
        return sae.eval()


def sae_names(store: Store) -> list[str]:
    """Names of the SAEs saved in a store (folders under ``saes/`` with a cfg.json)."""
    return [n for n in store.loc.list_dirs("saes") if store.loc.exists(f"saes/{n}/cfg.json")]


def save_sae(store: Store, sae: SAE, name: str) -> None:
    weights, cfg_json = sae.to_bytes()
    store.loc.write_bytes(f"saes/{name}/sae.safetensors", weights)
    store.loc.write_bytes(f"saes/{name}/cfg.json", cfg_json)


def load_sae(store: Store, name: str, device: str = "cpu") -> SAE:
    """Load the SAE ``name`` saved in ``store``."""
    names = sae_names(store)
    if name not in names:
        raise NotFoundError(
            f"no SAE named {name!r} in {store.url} (SAEs: {', '.join(names) or 'none'}): train one with actstore train"
        )
    sae = SAE.from_bytes(store.loc.read_bytes(f"saes/{name}/sae.safetensors"), store.loc.read_bytes(f"saes/{name}/cfg.json"))
    return sae.to(device)
