"""Exporting an SAE to other tools' layouts (SAELens, sparsify)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as st_save

from actstore.errors import ConfigError
from actstore.format import layout
from actstore.models.names import key_site
from actstore.sae.archs import get_arch
from actstore.sae.config import EXPORT_FORMATS
from actstore.sae.files import load_sae
from actstore.sae.model import SAE
from actstore.storage.files import output_folder, write_file

if TYPE_CHECKING:
    from actstore.store.reader import Store


# ---------------------------------------------------------------- export
TL_HOOKS = {
    "resid": "hook_resid_pre",
    "mlp_in": "ln2.hook_normalized",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
}
"""TransformerLens's hook point of each ``extract --site`` (what SAELens's ``hook_name`` names)."""


def tl_hook(model: str | None, layer: int | None) -> str:
    """The TransformerLens hook name of a store key's rows at ``layer`` (``minilm.mlp_out`` @ 3 ->
    ``blocks.3.hook_mlp_out``)."""
    if layer is None:
        return "hook"
    return f"blocks.{layer}.{TL_HOOKS[key_site(str(model))]}"


def saelens_cfg(sae: SAE) -> dict[str, Any]:
    """A ``cfg.json`` SAELens can load (v6 keys plus the v5 ones older loaders read)."""
    c = sae.cfg
    ours = get_arch(c.arch)
    arch = ours.saelens_architecture
    hook = tl_hook(c.model, c.layer)
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
            "actstore": {
                "arch": c.arch,
                "k": c.k,
                "l1": c.l1,
                "norm_scale_folded": c.norm_scale,
                "name": c.name,
                "target": c.target,
            },
        },
        # legacy (SAELens < 6) keys
        "model_name": c.model,
        "hook_name": hook,
        "hook_layer": c.layer,
        "hook_head_index": None,
        "activation_fn_str": ours.saelens_activation,
        "finetuning_scaling_factor": False,
        "context_size": None,
        "prepend_bos": True,
        "dataset_path": None,
        "sae_lens_training_version": None,
    }
    out.update(ours.saelens_cfg(sae))
    if (
        c.target is not None
    ):  # a transcoder: where its output goes (SAELens keeps it in the metadata)
        out["metadata"]["hook_name_out"] = tl_hook(c.target["model"], c.target["layer"])
        out["metadata"]["hook_layer_out"] = c.target["layer"]
    return out


def export_sae(store: Store, name: str, out_dir: str | Path, fmt: str = "saelens") -> list[Path]:
    """Write SAE ``name`` to ``out_dir`` in ``fmt`` and return the files written.

    ``saelens``: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc (d_in, d_sae)``,
    ``b_enc``, ``W_dec (d_sae, d_in)``, ``b_dec`` acting on raw activations (the
    normalisation scale is folded into the weights); batchtopk becomes a JumpReLU
    SAE with its learned threshold per feature. ``sparsify``: ``cfg.json`` + ``sae.safetensors``
    (``encoder.weight (d_sae, d_in)``, ``encoder.bias``, ``W_dec``, ``b_dec``), what
    ``SparseCoder.load_from_disk`` reads; TopK SAEs only. ``actstore``: a copy of the
    store's own files.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(
            f"unknown export format {fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}"
        )
    sae = load_sae(store, name)
    if fmt != "actstore" and sae.cfg.input_norm != "none" and fmt != "saelens":
        raise ConfigError(
            f"SAE {name!r} normalises each token ({sae.cfg.input_norm}): only --format saelens says so"
        )
    if fmt == "sparsify" and not get_arch(sae.cfg.arch).fixed_topk:
        raise ConfigError(
            f"SAE {name!r} is {sae.cfg.arch}: sparsify holds TopK SAEs only; export it with --format saelens"
        )
    with output_folder(out_dir) as out:
        if fmt == "actstore":
            written = []
            for f in (layout.SAE_WEIGHTS, layout.SAE_CONFIG, layout.SAE_METRICS):
                if store.loc.exists(layout.sae_file(name, f)):
                    write_file(out / f, store.loc.read_bytes(layout.sae_file(name, f)))
                    written.append(out / f)
            return written
        tensors = sae.raw_space_tensors()
        if fmt == "sparsify":
            return _write_sparsify(sae, tensors, out)
        arch = get_arch(sae.cfg.arch)
        if arch.per_feature_threshold:
            tensors["threshold"] = sae.threshold.detach().cpu().contiguous()  # (d_sae,)
        elif arch.calibrated_threshold:  # as a JumpReLU SAE: one threshold, per feature
            thr = float(sae.threshold)
            tensors["threshold"] = torch.full((sae.cfg.d_sae,), max(thr, 0.0))  # (d_sae,)
        weights = out / "sae_weights.safetensors"
        write_file(weights, st_save(tensors, metadata={"format": "pt"}))
        cfg = out / "cfg.json"
        scfg = saelens_cfg(sae)
        scfg["normalize_activations"] = sae.cfg.input_norm
        write_file(cfg, json.dumps(scfg, indent=2).encode())
        return [cfg, weights]


def _write_sparsify(sae: SAE, tensors: dict[str, torch.Tensor], out: Path) -> list[Path]:
    c = sae.cfg
    weights = {
        "encoder.weight": tensors["W_enc"].t().contiguous(),
        "encoder.bias": tensors["b_enc"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    path = out / "sae.safetensors"
    write_file(path, st_save(weights, metadata={"format": "pt"}))
    cfg = out / "cfg.json"
    write_file(
        cfg,
        json.dumps(
            {
                "activation": "topk",
                "expansion_factor": max(1, c.d_sae // c.d_in),
                "normalize_decoder": True,
                "num_latents": c.d_sae,
                "k": c.k,
                "multi_topk": False,
                "skip_connection": False,
                "transcode": False,
                "d_in": c.d_in,
            },
            indent=2,
        ).encode(),
    )
    return [cfg, path]
