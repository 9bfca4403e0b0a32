"""Published SAEs in: SAELens and sparsify folders read, converted to actstore's SAE form, checked on the store's rows.

A folder is untrusted input: only ``cfg.json`` (JSON) and safetensors weights are read, never pickle (a folder that
holds only ``.pt`` / ``.pkl`` / ``.bin`` weights is refused, saying which formats are accepted).

**SAELens** (``cfg.json`` + ``sae_weights.safetensors``; v5 and v6 keys): ``standard`` (ReLU), ``topk``,
``jumprelu`` (per-feature ``threshold``, or ``log_threshold`` from a training save) and ``batchtopk`` (a training
save with ``topk_threshold``; SAELens's inference saves of it are jumprelu). ``apply_b_dec_to_input: false`` is folded
into ``b_enc`` (``b_enc + b_dec @ W_enc``); ``rescale_acts_by_decoder_norm`` folds the decoder norms into the encoder
as SAELens does (``W_enc * ||W_dec_i||``, ``W_dec / ||W_dec_i||``); a v5 ``scaling_factor`` multiplies the decoder rows;
``normalize_activations`` ``constant_norm_rescale`` and ``layer_norm`` become the SAE's per-token ``input_norm``;
``expected_average_only_in`` is applied with its ``norm_scaling_factor`` when the cfg carries one and otherwise left
as SAELens leaves it for a local folder (no scaling; the fit check shows whether that was right).

**sparsify** (``cfg.json`` + ``sae.safetensors``: ``encoder.weight (d_sae, d_in)``, ``encoder.bias``, ``W_dec``,
``b_dec``): TopK SAEs; the hook point is the folder's name (sparsify saves one folder per hook point). Transcoders,
skip connections and groupmax are refused.

**Hook points to ``hidden_states`` indices** (:func:`hook_layer`), the index actstore stores:

- SAELens ``blocks.N.hook_resid_pre`` -> ``N`` (the residual stream entering block N; exact);
- SAELens ``blocks.N.hook_resid_post`` and sparsify ``layers.N`` / ``h.N`` / ``encoder.layer.N`` -> ``N + 1`` (the
  output of block N); exact for every block but the last of a decoder LM, whose ``hidden_states[n_layers]``
  Hugging Face returns after the final norm (GPT-2 ``ln_f``, Llama ``norm``, NeoX ``final_layer_norm``); BERT has no
  final norm, so there it is exact too;
- sparsify ``embed_tokens`` / ``embeddings`` / ``wte`` -> ``0``.

Other hook points (attention, MLP outputs, ``hook_resid_mid``) are not residual-stream states actstore stores: refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from actstore.errors import ConfigError, NotFoundError, StoreError
from actstore.format.metadata import ModelAttrs
from actstore.sae.config import INPUT_NORMS, ImportConfig, SAEConfig
from actstore.sae.model import SAE

if TYPE_CHECKING:
    from actstore.store.reader import Store

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".npy", ".npz", ".joblib")
ACCEPTED = "SAELens (cfg.json + sae_weights.safetensors) or sparsify (cfg.json + sae.safetensors)"
WEIGHTS = {"saelens": "sae_weights.safetensors", "sparsify": "sae.safetensors"}
FINAL_NORM_TYPES = (
    "gpt2",
    "llama",
    "gpt_neox",
    "mistral",
    "qwen2",
    "gemma",
    "gemma2",
    "phi",
    "olmo",
    "opt",
)
"""model_type values whose ``hidden_states[n_layers]`` comes after a final norm (decoder LMs)."""


@dataclass
class ForeignSAE:
    """An SAE read from another tool's folder, in actstore's form (weights acting on raw activations)."""

    sae: SAE
    hook: str | None
    """The hook point the folder names (SAELens ``hook_name``, sparsify's folder name)."""
    layer: int | None
    """The ``hidden_states`` index it maps to (None: not known from the hook; pass --layer)."""
    notes: list[str]
    """What was folded or assumed while converting."""


@dataclass
class ImportResult:
    """What ``import-sae`` saved and how well it fits the store's rows."""

    name: str
    store: str
    cfg: SAEConfig
    eval: dict[str, Any]
    """Held-out-style metrics on the store's rows: fvu, mse, l0, dead_fraction, n_tokens."""
    hook: str | None
    notes: list[str]
    saved: bool
    """False when the fit check refused it (only with ``dry_run``)."""


# ---------------------------------------------------------------- hook points
_RESID = re.compile(r"^blocks\.([0-9]+)\.hook_resid_(pre|post)$")
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.([0-9]+)$")
_EMBED = re.compile(r"(?:^|\.)(?:embed_tokens|embeddings|wte|embed_in)$")


def hook_layer(hook: str, fmt: str) -> int:
    """The ``hidden_states`` index of a hook point (see the module docstring); ConfigError for non-residual hooks."""
    m = _RESID.match(hook)
    if m:
        return int(m.group(1)) + (1 if m.group(2) == "post" else 0)
    if fmt == "sparsify" or hook.startswith(
        ("layers.", "model.", "transformer.", "gpt_neox.", "encoder.")
    ):
        if _EMBED.search(hook):
            return 0
        m = _BLOCK.search(hook)
        if m:
            return int(m.group(1)) + 1
    raise ConfigError(
        f"hook point {hook!r} is not a residual-stream state actstore stores (hidden_states): SAELens "
        "blocks.N.hook_resid_pre / hook_resid_post and sparsify layers.N map; give --layer to say which hidden_states "
        "index it reads if you know it does"
    )


def _final_norm_note(hook: str | None, layer: int, info: ModelAttrs) -> str | None:
    n_layers, mtype = info.n_layers, info.model_type
    if n_layers is not None and layer == int(n_layers) and mtype in FINAL_NORM_TYPES:
        return (
            f"hook {hook} is the last block's output, but Hugging Face's hidden_states[{layer}] of this {mtype} model "
            "comes after the final norm: the SAE reads normed states here (check the FVU)"
        )
    return None


# ---------------------------------------------------------------- reading folders
def _folder(path: str | Path, fmt: str) -> Path:
    """The folder holding ``cfg.json`` and the weights, refusing pickles and naming what is accepted."""
    p = Path(path)
    if not p.is_dir():
        raise NotFoundError(f"{p}: not a folder; give the folder holding {ACCEPTED}")
    if not (p / "cfg.json").is_file():
        subs = sorted(d.name for d in p.iterdir() if d.is_dir() and (d / "cfg.json").is_file())
        if subs:  # sparsify saves one folder per hook point
            raise ConfigError(
                f"{p} holds several SAEs ({', '.join(subs[:8])}): give the folder of one of them"
            )
    weights = p / WEIGHTS[fmt]
    if not weights.is_file():
        pickles = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ConfigError(
                f"{p} holds {', '.join(pickles[:4])}: pickle-based weights are never loaded (they can run code); "
                f"accepted: {ACCEPTED}. Convert them to safetensors with the tool that made them"
            )
        other = next((f for f, w in WEIGHTS.items() if f != fmt and (p / w).is_file()), None)
        hint = f" (it looks like a {other} folder: pass --format {other})" if other else ""
        raise NotFoundError(f"{p} has no {WEIGHTS[fmt]}{hint}; accepted: {ACCEPTED}")
    if not (p / "cfg.json").is_file():
        raise NotFoundError(f"{p} has no cfg.json; accepted: {ACCEPTED}")
    return p


def _read_cfg(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "cfg.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{folder / 'cfg.json'} is not valid JSON") from None
    except RecursionError:
        raise ConfigError(f"{folder / 'cfg.json'} nests too deeply to be an SAE config") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{folder / 'cfg.json'} is not a JSON object")
    return cfg


def _need(cfg: Any, key: str, folder: Path) -> int:
    """A required positive whole number of ``cfg.json`` (a JSON integer, or a float or digit string that is one)."""
    if not isinstance(cfg, dict) or key not in cfg or cfg[key] is None:
        raise ConfigError(
            f"{folder / 'cfg.json'} has no {key!r}: it is not a complete {ACCEPTED} config"
        )
    return _whole(cfg[key], key, folder)


def _whole(value: Any, key: str, folder: Path) -> int:
    v = value
    if isinstance(v, str) and v.strip().isascii() and v.strip().isdigit():
        v = int(v.strip())
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ConfigError(
            f"{folder / 'cfg.json'}: {key!r} must be a positive whole number, got {shown}"
        )
    return v


def _positive(value: Any, key: str, folder: Path) -> float:
    """A positive finite number of ``cfg.json`` (a JSON number; a numeric string is refused)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ConfigError(
            f"{folder / 'cfg.json'}: {key!r} must be a positive finite number, got {shown}"
        )
    return float(value)


def _tensors(folder: Path, fname: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return {k: v.float() for k, v in load_file(str(folder / fname)).items()}
    except Exception as exc:  # safetensors raises its own error type on damaged files
        raise ConfigError(
            f"{folder / fname} does not load as safetensors ({type(exc).__name__}): re-download it"
        ) from None


def _tensor(
    t: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], folder: Path
) -> torch.Tensor:
    if key not in t:
        raise ConfigError(
            f"{folder}: the weights have no {key!r} (have: {', '.join(sorted(t)) or 'none'})"
        )
    if tuple(t[key].shape) != shape:
        raise ConfigError(
            f"{folder}: {key} has shape {tuple(t[key].shape)}, cfg.json implies {shape}"
        )
    return t[key]


def _build(
    arch: str,
    d_in: int,
    d_sae: int,
    k: int | None,
    w_enc: torch.Tensor,
    b_enc: torch.Tensor,
    w_dec: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor | None,
    input_norm: str,
    source: dict[str, Any],
) -> SAE:
    sae = SAE(
        SAEConfig(
            arch=arch, d_in=d_in, d_sae=d_sae, k=k, l1=0.0, input_norm=input_norm, source=source
        )
    )
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)  # (d_in, d_sae)
        sae.b_enc.copy_(b_enc)  # (d_sae,)
        sae.W_dec.copy_(w_dec)  # (d_sae, d_in)
        sae.b_dec.copy_(b_dec)  # (d_in,)
        if threshold is not None:
            sae.threshold.copy_(threshold)
    return sae.eval()


def read_saelens(path: str | Path) -> ForeignSAE:
    """A SAELens folder as an actstore SAE (see the module docstring for what is folded)."""
    folder = _folder(path, "saelens")
    cfg = _read_cfg(folder)
    meta: dict[str, Any] = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else {}
    d_in, d_sae = _need(cfg, "d_in", folder), _need(cfg, "d_sae", folder)
    arch = str(cfg.get("architecture") or cfg.get("activation_fn_str") or "standard").lower()
    arch = {"relu": "standard"}.get(arch, arch)
    t = _tensors(folder, WEIGHTS["saelens"])
    w_enc = _tensor(t, "W_enc", (d_in, d_sae), folder).clone()
    b_enc = _tensor(t, "b_enc", (d_sae,), folder).clone()
    w_dec = _tensor(t, "W_dec", (d_sae, d_in), folder).clone()
    b_dec = _tensor(t, "b_dec", (d_in,), folder).clone()
    notes: list[str] = []
    k, threshold = None, None
    if "scaling_factor" in t:  # SAELens v5 fine-tuning scaling factor: acts * s before the decoder
        w_dec = w_dec * _tensor(t, "scaling_factor", (d_sae,), folder)[:, None]
        notes.append("the v5 scaling_factor was folded into the decoder rows")
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk") and cfg.get(
        "rescale_acts_by_decoder_norm"
    ):
        # (d_sae,): SAELens scales pre-activations by these before the top-k
        norms = w_dec.norm(dim=1)
        w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
        notes.append("rescale_acts_by_decoder_norm was folded into the weights")
    if arch == "standard":
        ours = "relu-l1"
    elif arch == "topk":
        ours = "topk"
        k = (
            _need(cfg, "k", folder)
            if "k" in cfg
            else _need(cfg.get("activation_fn_kwargs"), "k", folder)
        )
    elif arch == "jumprelu":
        ours = "jumprelu"
        if "threshold" in t:
            threshold = _tensor(t, "threshold", (d_sae,), folder)
        else:
            threshold = _tensor(t, "log_threshold", (d_sae,), folder).exp()
    elif arch in (
        "batchtopk",
        "matryoshka_batchtopk",
    ):  # SAELens's Matryoshka saves as its BatchTopK does
        ours, k = arch.replace("_", "-"), _need(cfg, "k", folder)
        if "threshold" in t:  # an inference save: a per-feature (all equal) threshold
            ours, threshold = "jumprelu", _tensor(t, "threshold", (d_sae,), folder)
        else:
            thr = t.get("topk_threshold", torch.tensor(0.0))
            if thr.numel() != 1:
                raise ConfigError(
                    f"{folder}: topk_threshold has shape {tuple(thr.shape)}, a batchtopk SAE's is one number"
                )
            threshold = thr.reshape(())
    else:
        raise ConfigError(
            f"{folder}: SAELens architecture {arch!r} is not supported; import standard, topk, jumprelu, "
            "batchtopk or matryoshka_batchtopk SAEs"
        )
    # actstore always subtracts b_dec: compensate in b_enc
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ w_enc  # (x - b_dec) W + b_enc + b_dec W = x W + b_enc
        notes.append("apply_b_dec_to_input=false was folded into b_enc")
    norm = str(cfg.get("normalize_activations") or "none")
    input_norm = "none"
    if norm in INPUT_NORMS:
        input_norm = norm
    elif norm == "expected_average_only_in":
        key = "norm_scaling_factor"
        factor = cfg.get(key) if cfg.get(key) is not None else meta.get(key)
        if factor is not None:
            s = _positive(factor, key, folder)  # SAELens's fold: x * s in, x_hat / s out
            w_enc, w_dec, b_dec = w_enc * s, w_dec / s, b_dec / s
            notes.append(
                f"normalize_activations expected_average_only_in: factor {s:g} folded into the weights"
            )
        else:
            notes.append(
                "normalize_activations expected_average_only_in without a norm_scaling_factor: applied as "
                "SAELens applies it to a local folder (no scaling)"
            )
    else:
        raise ConfigError(
            f"{folder}: normalize_activations {norm!r} is not supported (fold it into the weights first)"
        )
    hook = meta.get("hook_name") or cfg.get("hook_name")
    if hook is not None and not isinstance(hook, str):
        raise ConfigError(
            f"{folder / 'cfg.json'}: 'hook_name' must be a string, got {type(hook).__name__}"
        )
    source = {
        "format": "saelens",
        "path": str(folder.resolve()),
        "architecture": arch,
        "hook": hook,
        "model_name": meta.get("model_name") or cfg.get("model_name"),
        "sae_lens_version": meta.get("sae_lens_version"),
    }
    sae = _build(ours, d_in, d_sae, k, w_enc, b_enc, w_dec, b_dec, threshold, input_norm, source)
    layer = None
    if isinstance(hook, str):
        # raises for a hook that is not a residual-stream state
        mapped = hook_layer(hook, "saelens")
        # other names say no layer for certain: --layer decides
        layer = mapped if _RESID.match(hook) else None
    return ForeignSAE(sae, hook, layer, notes)


def read_sparsify(path: str | Path) -> ForeignSAE:
    """A sparsify folder (one hook point's ``cfg.json`` + ``sae.safetensors``) as an actstore TopK SAE."""
    folder = _folder(path, "sparsify")
    cfg = _read_cfg(folder)
    d_in = _need(cfg, "d_in", folder)
    for key, bad in (
        ("transcode", "a transcoder"),
        ("skip_connection", "an SAE with a skip connection"),
    ):
        if cfg.get(key):
            raise ConfigError(
                f"{folder}: {bad} reads one layer and writes another; import plain SAEs"
            )
    if str(cfg.get("activation", "topk")) != "topk":
        raise ConfigError(
            f"{folder}: sparsify activation {cfg.get('activation')!r} is not supported; import topk SAEs"
        )
    k = _need(cfg, "k", folder)
    d_sae = (
        _need(cfg, "num_latents", folder)
        if cfg.get("num_latents")
        else d_in * _need(cfg, "expansion_factor", folder)
    )
    t = _tensors(folder, WEIGHTS["sparsify"])
    w_enc = _tensor(t, "encoder.weight", (d_sae, d_in), folder).t().contiguous()
    b_enc = _tensor(t, "encoder.bias", (d_sae,), folder)
    w_dec = _tensor(t, "W_dec", (d_sae, d_in), folder)
    b_dec = _tensor(t, "b_dec", (d_in,), folder)
    hook = folder.resolve().name
    source = {
        "format": "sparsify",
        "path": str(folder.resolve()),
        "architecture": "topk",
        "hook": hook,
    }
    sae = _build("topk", d_in, d_sae, k, w_enc, b_enc, w_dec, b_dec, None, "none", source)
    try:
        layer: int | None = hook_layer(hook, "sparsify")
    except ConfigError:
        layer = None
    return ForeignSAE(sae, hook, layer, [])


READERS = {"saelens": read_saelens, "sparsify": read_sparsify}


# ---------------------------------------------------------------- into a store
def fit_rows(n_rows: int, max_tokens: int, seed: int = 0) -> np.ndarray:
    """Sorted row numbers the fit check reads: all rows, or ``max_tokens`` of them drawn without replacement."""
    if n_rows <= max_tokens:
        return np.arange(n_rows, dtype=np.int64)
    return np.sort(
        np.random.default_rng(seed).choice(n_rows, size=max_tokens, replace=False)
    ).astype(np.int64)


def import_sae(
    store: Store | str,
    cfg: ImportConfig,
    storage_options: dict[str, Any] | None = None,
    writable: bool = False,
) -> ImportResult:
    """Read ``cfg.path``, map it onto (model, layer) of ``store``, check its fit and save it under ``saes/NAME/``.

    Refused with nothing written: a width that differs from the layer's, a hook point the model does not have, or
    (unless ``cfg.force``) held-out FVU >= 1 or not finite on the store's rows.
    """
    from actstore.format import layout
    from actstore.format.layout import check_name
    from actstore.models.names import sanitize_key
    from actstore.sae.files import sae_names, save_sae
    from actstore.sae.metrics import evaluate
    from actstore.sae.model import check_d_in
    from actstore.storage.integrity import update_manifest
    from actstore.storage.locks import StoreLock
    from actstore.storage.urls import write_access
    from actstore.store.reader import open_store

    foreign = READERS[cfg.format](cfg.path)
    st = (
        store
        if not isinstance(store, str)
        else open_store(
            store, storage_options=storage_options, writable=write_access(store, writable)
        )
    )
    if st.loc.read_only:
        raise StoreError(
            f"store {st.url} is open read-only: pass --writable to import an SAE into it"
        )
    models = st.models
    model = cfg.model or (models[0] if len(models) == 1 else None)
    if model is None:
        raise ConfigError(
            f"store {st.url} holds {len(models)} models ({', '.join(models) or 'none'}): pass --model"
        )
    info = st.model_info(model)  # NotFoundError names the models
    layer = cfg.layer if cfg.layer is not None else foreign.layer
    if layer is None:
        raise ConfigError(
            f"{cfg.path}: its hook point {foreign.hook!r} does not say which layer it reads: pass --layer"
        )
    n_layers = info.n_layers
    if n_layers is not None and not 0 <= layer <= int(n_layers):
        what = (
            f"--layer {layer} is past the model:"
            if cfg.layer is not None
            else f"hook point {foreign.hook!r} maps to hidden_states[{layer}], but"
        )
        raise ConfigError(
            f"{what} {model} has {n_layers} layers (hidden_states 0..{n_layers}): this SAE was made for another model"
        )
    if layer not in st.layers(model):
        stored = ", ".join(map(str, st.layers(model)))
        raise NotFoundError(
            f"layer {layer} of model {model!r} is not in {st.url} (stored: {stored}): "
            f"extract it first (actstore extract --layers {layer})"
        )
    acts = st.activations(model, layer)
    sae = foreign.sae
    check_d_in(sae.cfg, acts.d_model, f"{model} layer {layer} of {st.url}", str(cfg.path))
    notes = list(foreign.notes)
    fn = _final_norm_note(foreign.hook, layer, info)
    if fn:
        notes.append(fn)
    src = sae.cfg.source or {}
    name = cfg.name or sanitize_key(f"{model}-l{layer}-{cfg.format}-{sae.cfg.arch}-{sae.cfg.d_sae}")
    check_name(name, "SAE")
    if name in sae_names(st) and not cfg.overwrite:
        raise ConfigError(
            f"an SAE named {name!r} is already in {st.url}: pass --name NEW, or --overwrite to replace it"
        )
    sae.cfg.model, sae.cfg.layer, sae.cfg.name = model, layer, name
    sae.cfg.tokenization = info.tokenization
    rows = fit_rows(len(acts), cfg.max_eval_tokens, cfg.seed)
    ev = evaluate(sae, torch.from_numpy(acts.take(rows)), batch_size=4096)
    fvu = float(ev.get("fvu", float("nan")))
    if not cfg.force and not (np.isfinite(fvu) and fvu < 1):
        raise ConfigError(
            f"{cfg.path} does not fit {model} layer {layer} of {st.url}: FVU {fvu:.3g} on {len(rows)} of its rows (>= 1: "
            "it reconstructs worse than the mean). Check the layer (--layer) and the model; --force imports it anyway"
        )
    metrics = {
        "name": name,
        "imported": {**src, "hook": foreign.hook, "notes": notes},
        "tokens": 0,
        "eval": ev,
        "train": {},
        "n_eval_rows": int(len(rows)),
        "fit_rows": "all" if len(rows) == len(acts) else "sample",
    }
    lock = StoreLock(st.loc, layout.sae_dir(name), f"import-sae {name}").acquire()
    try:
        if cfg.overwrite:
            st.loc.rmtree(layout.sae_dir(name))
        save_sae(st, sae, name, metrics)
    finally:
        lock.release()
    update_manifest(st.loc, prefixes=[layout.sae_dir(name)])
    return ImportResult(name, st.url, sae.cfg, ev, foreign.hook, notes, True)
