"""``actstore effects``: attribution over the corpus, then exact ablation of the top features (one writer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actstore.effects.attribute import EffectsResult
from actstore.effects.config import EffectsConfig
from actstore.errors import ConfigError
from actstore.format import layout

if TYPE_CHECKING:
    from actstore.effects.splice import HeadModel, Splice
    from actstore.store.reader import Store


@dataclass
class EffectsReport:
    """What ``actstore effects`` did: the attribution run, and the ablations' summary."""

    result: EffectsResult
    ablation: dict[str, Any] = field(default_factory=dict)


def open_splice(
    store: Store, sae_name: str, model: str | None, device: str, path: str | None = None
) -> tuple[HeadModel, Splice]:
    """The model with its head and the SAE spliced into it, after every check (one line each); the model's
    weights from ``path`` when given, else from the path the store records."""
    from actstore.effects.splice import Sources, Splice, check_splice, load_head_model
    from actstore.sae.files import load_sae

    sae = load_sae(store, sae_name, device).eval()
    sae.requires_grad_(False)
    if sae.cfg.is_crosscoder and model is None:
        raise ConfigError(
            f"{sae_name!r} is a crosscoder of {', '.join(sae.cfg.models or [])}: pass --model one of them with a head"
        )
    key = model or str(sae.cfg.model)
    if (
        model is not None
        and path is None
        and model not in store.model_keys()
        and Path(model).is_dir()
    ):
        # a model directory outside the store: it must tokenize as the SAE's token rows were
        head = load_head_model(store, path_key(model), device, model)
        check_tokenizer(store, sae.cfg.tokenization, model, sae_name)
        return head, Splice(head, sae, check_splice(sae, sae_name, head))
    if key not in store.model_keys():
        raise ConfigError(
            f"store {store.url} has no model {key!r} (models: {', '.join(store.model_keys())})"
        )
    tk = store.model_info(key).tokenization
    if sae.cfg.tokenization and tk and sae.cfg.tokenization != tk:
        raise ConfigError(
            f"SAE {sae_name!r} was trained on tokenization {sae.cfg.tokenization}, model {key!r} uses {tk}: "
            "their token rows differ"
        )
    head = load_head_model(store, key, device, path)
    layer = check_splice(sae, sae_name, head)
    return head, Splice(
        head, sae, layer, Sources(store, sae, key) if sae.cfg.is_crosscoder else None
    )


def path_key(path: str) -> str:
    """The name a model directory's effects are saved under: its folder name and a hash of its absolute path."""
    import hashlib
    import re

    p = Path(path).resolve()
    base = re.sub(r"[^A-Za-z0-9._-]", "_", p.name).lstrip("._-")[:60] or "model"
    return f"{base}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"


def check_tokenizer(store: Store, tokenization: str | None, path: str, sae_name: str) -> None:
    """Refuse a model directory whose tokenizer gives other token ids than the SAE's token rows."""
    from transformers import AutoTokenizer

    from actstore.models.loading import from_pretrained, tokenizer_hash, tokenizer_identity

    tok = from_pretrained(AutoTokenizer, path)
    attrs = store.tokenization(tokenization).attrs
    if not attrs.same_tokenizer(tokenizer_identity(tok), tokenizer_hash(tok)):
        raise ConfigError(
            f"the tokenizer of {path} gives other token ids than SAE {sae_name!r}'s token rows: splice it into a "
            "model of the same tokenizer"
        )


def effects(store: Store, cfg: EffectsConfig, progress: bool = False) -> EffectsReport:
    """Attribute every feature of ``cfg.sae`` to the model's output over the store's samples, then ablate the top
    ones (``saes/<sae>/effects/<model>/``)."""
    from actstore.effects.ablate import check_ablations, run_ablations
    from actstore.effects.attribute import run_attribution
    from actstore.models.loading import auto_device
    from actstore.storage.locks import StoreLock

    if not store.writable:
        raise ConfigError(
            f"store {store.url} is opened read-only: effects write beside the SAE (pass --writable)"
        )
    device = auto_device(cfg.device)
    head, splice = open_splice(store, cfg.sae, cfg.model, device)
    folder = layout.effects_dir(cfg.sae, head.key)
    if cfg.ablate_top or cfg.ablate_features:
        check_ablations(store, cfg, head, splice, device)
    lock = StoreLock(store.loc, folder, f"effects {cfg.sae}", cfg.break_lock).acquire()
    try:
        res = run_attribution(store, cfg, head, splice, device, progress)
        summary = {}
        if cfg.ablate_top or cfg.ablate_features:
            summary = run_ablations(store, cfg, head, splice, device, res)
        return EffectsReport(res, summary)
    finally:
        lock.release()
