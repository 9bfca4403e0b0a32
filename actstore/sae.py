"""Sparse autoencoder architectures and their on-disk form.

``relu-l1``   the paper's: ``h = ReLU(W_enc (x - b_dec) + b_enc)``, ``x_hat = W_dec h + b_dec``;
              trained with ``MSE + l1 * sum_i h_i * ||W_dec_i||`` (the L1 is weighted by
              decoder row norms, so it cannot be dodged by shrinking the code).
``topk``      Gao et al. 2024: keep the k largest pre-activations (after ReLU); decoder
              rows kept at unit norm; an auxiliary loss revives dead latents.
``batchtopk`` top ``k * batch`` over the whole batch while training, a learned global
              threshold at inference (``threshold`` buffer).

Inputs are multiplied by ``cfg.norm_scale`` before encoding (so the training
data has a fixed mean squared norm, ``d_in``) and reconstructions divided by it,
so callers always work in the model's own activation space.

Weights are stored as ``sae.safetensors`` (``W_enc (d_in, d_sae)``, ``b_enc
(d_sae,)``, ``W_dec (d_sae, d_in)``, ``b_dec (d_in,)``, ``threshold ()``) with
``cfg.json`` beside them and ``metrics.json`` from training, under
``STORE/saes/NAME/``. ``cfg.json`` is written last: a folder without it is an
unfinished run (it may hold ``checkpoint/``) and is not listed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from . import layout
from .errors import ConfigError, IntegrityError, NotFoundError, StoreError
from .integrity import check_file
from .location import name_ok

if TYPE_CHECKING:
    import polars as pl

    from .store import Store

ARCHS = ("relu-l1", "topk", "batchtopk")
EXPORT_FORMATS = ("saelens", "actstore")


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
        if self.arch in ("topk", "batchtopk") and (not self.k or not 0 < self.k <= self.d_sae):
            raise ConfigError(f"{self.arch} needs --k between 1 and d_sae ({self.d_sae}), got {self.k}")
        if self.norm_scale <= 0:
            raise ConfigError(f"norm_scale must be positive, got {self.norm_scale}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def parse_config(cfg_json: bytes, where: str = "SAE") -> SAEConfig:
    """An :class:`SAEConfig` from ``cfg.json`` bytes; IntegrityError naming ``where`` if they are not a JSON object."""
    try:
        d = json.loads(cfg_json)
        if not isinstance(d, dict):
            raise TypeError
    except (ValueError, TypeError):
        raise IntegrityError(f"{where}: cfg.json is not a JSON object; the SAE is damaged: re-train or re-copy it") from None
    return SAEConfig.from_dict(d)


class SAEOutput(NamedTuple):
    """One SAE pass."""

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
        self.b_enc = nn.Parameter(torch.zeros(d_sae))  # (d_sae,)
        self.b_dec = nn.Parameter(torch.zeros(d_in))  # (d_in,), in normalised space
        self.register_buffer("threshold", torch.tensor(0.0))  # batchtopk inference threshold

    # ---- core ----------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``(n, d_sae)`` of raw activations ``x (n, d_in)``."""
        xn = x.to(self.W_enc.dtype) * self.cfg.norm_scale
        return (xn - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Feature activations from pre-activations ``(n, d_sae)``.

        ``train`` selects batchtopk's batch-level top-k; at inference batchtopk
        keeps pre-activations above the learned threshold (per-token top-k if
        no threshold was learned).
        """
        arch, k = self.cfg.arch, self.cfg.k
        if arch == "relu-l1":
            return torch.relu(pre)
        if arch == "topk" or (arch == "batchtopk" and not train and float(self.threshold) <= 0):
            vals, idx = pre.topk(int(k), dim=-1)  # type: ignore[arg-type]
            return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))
        if train:  # batchtopk: top k*n over the whole batch
            flat = torch.relu(pre).flatten()
            n_keep = min(int(k) * pre.shape[0], flat.numel())  # type: ignore[operator]
            vals, idx = flat.topk(n_keep, sorted=False)
            return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(pre)
        return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))

    def decode_normalised(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``(n, d_in)`` in the normalised input space (what training compares)."""
        return acts @ self.W_dec + self.b_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``(n, d_sae)`` of raw activations ``x (n, d_in)`` (inference)."""
        return self.activate(self.pre_acts(x), train=False)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``(n, d_in)`` in the model's activation space."""
        return self.decode_normalised(acts) / self.cfg.norm_scale

    def forward(self, x: torch.Tensor, train: bool = False) -> SAEOutput:
        pre = self.pre_acts(x)
        acts = self.activate(pre, train=train)
        return SAEOutput(self.decode(acts), acts, pre)

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

    def to_bytes(self) -> tuple[bytes, bytes]:
        """``(sae.safetensors bytes, cfg.json bytes)``."""
        return st_save(self.state_tensors(), metadata={"format": "actstore-sae"}), self.cfg.to_json().encode()

    @classmethod
    def from_bytes(cls, weights: bytes, cfg_json: bytes, where: str = "SAE") -> SAE:
        cfg = parse_config(cfg_json, where)
        sae = cls(cfg)
        try:
            tensors = st_load(weights)
        except Exception as exc:  # safetensors raises its own SafetensorError on truncated or garbled files
            raise IntegrityError(
                f"{where}: sae.safetensors does not load ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                "the file is damaged: re-train the SAE or re-copy the store"
            ) from None
        expect = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
        for name, shape in expect.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape) if name in tensors else "missing"
                raise ConfigError(f"SAE weights {name} should have shape {shape} for cfg.json, got {got}")
        tensors.setdefault("threshold", torch.tensor(0.0))
        sae.load_state_dict(tensors)
        return sae.eval()

    def raw_space_tensors(self) -> dict[str, torch.Tensor]:
        """Weights with ``norm_scale`` folded in, so they act on raw activations directly.

        ``acts = act_fn((x - b_dec) @ W_enc + b_enc)`` and ``x_hat = acts @ W_dec + b_dec``
        with ``x`` and ``x_hat`` in the model's activation space; feature
        activations are unchanged.
        """
        s = float(self.cfg.norm_scale)
        t = self.state_tensors()
        return {
            "W_enc": (t["W_enc"] * s).contiguous(),  # (d_in, d_sae)
            "b_enc": t["b_enc"],  # (d_sae,)
            "W_dec": (t["W_dec"] / s).contiguous(),  # (d_sae, d_in)
            "b_dec": (t["b_dec"] / s).contiguous(),  # (d_in,)
        }


def check_d_in(cfg: SAEConfig, d_model: int, where: str) -> None:
    """Raise ConfigError unless an SAE reading ``d_in`` fits activations of width ``d_model`` (``where`` names them)."""
    if cfg.d_in != d_model:
        raise ConfigError(
            f"SAE {cfg.name or ''} reads d_in {cfg.d_in} but {where} has d_model {d_model}: "
            f"use an SAE trained on that layer (it was trained on {cfg.model} layer {cfg.layer})"
        )


def check_fits(store: Store, cfg: SAEConfig, name: str) -> Any:
    """The activations (``Store.activations``) an SAE reads, after checking that it fits them.

    The one "does this SAE fit this layer" check (encode, diff-features): model and layer recorded,
    the layer's width equal to the SAE's ``d_in``, and the tokenization it was trained on.
    """
    if cfg.model is None or cfg.layer is None:
        raise ConfigError(f"SAE {name!r} has no model/layer in its cfg.json: it cannot be matched to the store's rows")
    acts = store.activations(cfg.model, cfg.layer)
    if acts.d_model != cfg.d_in:
        raise ConfigError(f"SAE {name!r} reads {cfg.d_in}-wide vectors but {cfg.model} layer {cfg.layer} is {acts.d_model} wide")
    tk = store.model_info(cfg.model).get("tokenization")
    if cfg.tokenization and tk and cfg.tokenization != tk:
        raise ConfigError(f"SAE {name!r} was trained on tokenization {cfg.tokenization}, but {cfg.model} uses {tk}")
    return acts


# ---------------------------------------------------------------- store I/O
def sae_names(store: Store) -> list[str]:
    """Names of the SAEs saved in a store (folders under ``saes/`` with a cfg.json)."""
    return [n for n in store.loc.list_dirs(layout.SAES) if name_ok(n) and store.loc.exists(layout.sae_file(n, layout.SAE_CONFIG))]


def save_sae(store: Store, sae: SAE, name: str, metrics: dict[str, Any] | None = None) -> None:
    """Write ``sae.safetensors``, ``metrics.json`` (if given) and, last, ``cfg.json`` under ``saes/NAME/``."""
    weights, cfg_json = sae.to_bytes()
    store.loc.write_bytes(layout.sae_file(name, layout.SAE_WEIGHTS), weights)
    if metrics is not None:
        store.loc.write_bytes(layout.sae_file(name, layout.SAE_METRICS), json.dumps(metrics, indent=2, default=float).encode())
    store.loc.write_bytes(layout.sae_file(name, layout.SAE_CONFIG), cfg_json)


def _check_name(store: Store, name: str) -> None:
    names = sae_names(store)
    if name not in names:
        raise NotFoundError(
            f"no SAE named {name!r} in {store.url} (SAEs: {', '.join(names) or 'none'}): train one with actstore train"
        )


def load_sae(store: Store, name: str, device: str = "cpu") -> SAE:
    """Load the SAE ``name`` saved in ``store``."""
    _check_name(store, name)
    w_key, c_key = layout.sae_file(name, layout.SAE_WEIGHTS), layout.sae_file(name, layout.SAE_CONFIG)
    weights, cfg_json = store.loc.read_bytes(w_key), store.loc.read_bytes(c_key)
    check_file(store.loc, w_key, weights)  # the manifest's SHA-256, before any byte is used
    check_file(store.loc, c_key, cfg_json)
    sae = SAE.from_bytes(weights, cfg_json, where=f"SAE {name} in store {store.url}")
    return sae.to(device)


def read_config(store: Store, name: str) -> SAEConfig:
    """The ``cfg.json`` of SAE ``name`` alone (no weights read), checked against the manifest."""
    _check_name(store, name)
    key = layout.sae_file(name, layout.SAE_CONFIG)
    raw = store.loc.read_bytes(key)
    check_file(store.loc, key, raw)
    return parse_config(raw, f"SAE {name} in store {store.url}")


def read_metrics(store: Store, name: str) -> dict[str, Any]:
    """The ``metrics.json`` written when SAE ``name`` was trained (empty if it has none)."""
    _check_name(store, name)
    key = layout.sae_file(name, layout.SAE_METRICS)
    return json.loads(store.loc.read_bytes(key)) if store.loc.exists(key) else {}


def list_saes(store: Store) -> pl.DataFrame:
    """One row per SAE in the store: architecture, sizes, source layer and final held-out metrics."""
    import polars as pl

    rows = []
    for name in sae_names(store):
        cfg = json.loads(store.loc.read_bytes(layout.sae_file(name, layout.SAE_CONFIG)))
        m = read_metrics(store, name)
        ev, tr = m.get("eval", {}), m.get("train", {})
        rows.append(
            {
                "name": name,
                "arch": cfg.get("arch"),
                "model": cfg.get("model"),
                "layer": cfg.get("layer"),
                "d_in": cfg.get("d_in"),
                "d_sae": cfg.get("d_sae"),
                "k": cfg.get("k"),
                "l1": cfg.get("l1") if cfg.get("arch") == "relu-l1" else None,
                "tokens": m.get("tokens"),
                "fvu": ev.get("fvu"),
                "mse": ev.get("mse"),
                "l0": ev.get("l0"),
                "dead": tr.get("dead_fraction"),
                "dense": ev.get("dense_fraction"),
                "train_fvu": tr.get("fvu"),
                "l0_fraction": ev["l0"] / cfg["d_sae"] if ev.get("l0") is not None and cfg.get("d_sae") else None,
            }
        )
    schema = {
        "name": pl.String, "arch": pl.String, "model": pl.String, "layer": pl.Int64, "d_in": pl.Int64, "d_sae": pl.Int64,
        "k": pl.Int64, "l1": pl.Float64, "tokens": pl.Int64, "fvu": pl.Float64, "mse": pl.Float64, "l0": pl.Float64,
        "dead": pl.Float64, "dense": pl.Float64, "train_fvu": pl.Float64, "l0_fraction": pl.Float64,
    }  # fmt: skip
    df = pl.DataFrame(rows, schema=schema)
    return df.with_columns((pl.col("l0_fraction") > DENSE_L0_FRACTION).fill_null(False).alias("dense_code"))


DENSE_L0_FRACTION = 0.10
"""An SAE whose held-out L0 exceeds this fraction of d_sae is flagged dense (``saes``, the report)."""


def dense_notes(saes: pl.DataFrame) -> list[str]:
    """One sentence per SAE of :func:`list_saes` whose code is dense, saying what that implies."""
    import polars as pl

    out = []
    for r in saes.filter(pl.col("dense_code")).iter_rows(named=True):
        out.append(
            f"SAE {r['name']} is dense: L0 {r['l0']:.0f} of {r['d_sae']} features ({r['l0_fraction']:.0%}) fire on every "
            f"token, above {DENSE_L0_FRACTION:.0%}; its features are not sparse, so its top features by variance tend to "
            "be generic tokens ([CLS], 'the', '.') and a feature diff against it says little. Train it sparser: "
            "--arch topk --k N, or a larger --l1"
        )
    return out


def delete_sae(store: Store, name: str) -> None:
    """Remove ``saes/NAME/`` (finished SAE or unfinished run) if present."""
    store.loc.rmtree(layout.sae_dir(name))


# ---------------------------------------------------------------- export
def saelens_cfg(sae: SAE) -> dict[str, Any]:
    """A ``cfg.json`` SAELens can load (v6 keys plus the v5 ones older loaders read)."""
    c = sae.cfg
    arch = {"relu-l1": "standard", "topk": "topk", "batchtopk": "jumprelu"}[c.arch]
    hook = f"blocks.{c.layer}.hook_resid_pre" if c.layer is not None else "hook"
    out: dict[str, Any] = {
        "architecture": arch,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": c.model,
            "hook_name": hook,
            "hook_layer": c.layer,
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": None,
            "dataset_path": None,
            "sae_lens_training_version": None,
            "actstore": {"arch": c.arch, "k": c.k, "l1": c.l1, "norm_scale_folded": c.norm_scale, "name": c.name},
        },
        # legacy (SAELens < 6) keys
        "model_name": c.model,
        "hook_name": hook,
        "hook_layer": c.layer,
        "hook_head_index": None,
        "activation_fn_str": "topk" if arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": c.k} if arch == "topk" else {},
        "finetuning_scaling_factor": False,
        "context_size": None,
        "prepend_bos": True,
        "dataset_path": None,
        "sae_lens_training_version": None,
    }
    if arch == "topk":
        out["k"] = c.k
    return out


def export_sae(store: Store, name: str, out_dir: str | Path, fmt: str = "saelens") -> list[Path]:
    """Write SAE ``name`` to ``out_dir`` in ``fmt`` and return the files written.

    ``saelens``: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc (d_in, d_sae)``,
    ``b_enc``, ``W_dec (d_sae, d_in)``, ``b_dec`` acting on raw activations (the
    normalisation scale is folded into the weights); batchtopk becomes a JumpReLU
    SAE with its learned threshold per feature. ``actstore``: a copy of the
    store's own files.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    sae = load_sae(store, name)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create export folder {out}: {exc.strerror or exc}; choose a writable --out") from None
    if fmt == "actstore":
        written = []
        for f in (layout.SAE_WEIGHTS, layout.SAE_CONFIG, layout.SAE_METRICS):
            if store.loc.exists(layout.sae_file(name, f)):
                (out / f).write_bytes(store.loc.read_bytes(layout.sae_file(name, f)))
                written.append(out / f)
        return written
    tensors = sae.raw_space_tensors()
    if sae.cfg.arch == "batchtopk":
        thr = float(sae.threshold)
        tensors["threshold"] = torch.full((sae.cfg.d_sae,), max(thr, 0.0))  # (d_sae,)
    weights = out / "sae_weights.safetensors"
    weights.write_bytes(st_save(tensors, metadata={"format": "pt"}))
    cfg = out / "cfg.json"
    cfg.write_text(json.dumps(saelens_cfg(sae), indent=2))
    return [cfg, weights]
