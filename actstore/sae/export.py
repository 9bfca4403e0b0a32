"""Exporting an SAE to other tools' layouts (SAELens)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as st_save

from actstore.errors import ConfigError, StoreError
from actstore.format import layout
from actstore.sae.config import EXPORT_FORMATS
from actstore.sae.files import load_sae
from actstore.sae.model import SAE

if TYPE_CHECKING:
    from actstore.store.reader import Store


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
