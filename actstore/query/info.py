"""What a store holds and where it came from: ``actstore info`` (models, layers, SAEs, provenance)."""

from __future__ import annotations

import json
from typing import Any

from actstore.errors import IntegrityError
from actstore.format import layout
from actstore.format.metadata import LayerAttrs, StoreAttrs
from actstore.sae.files import sae_names
from actstore.storage.integrity import (
    read_manifest,
)
from actstore.store.reader import Store


# ---------------------------------------------------------------- provenance
def store_info(store: Store) -> dict[str, Any]:
    """Everything ``actstore info`` shows, as plain JSON-able data."""
    out: dict[str, Any] = {
        "url": store.url,
        "store": store.attrs.to_dict(),
        "tokenizations": {},
        "models": {},
    }
    for key in store.tokenization_keys():
        t = store.tokenization(key)
        out["tokenizations"][key] = {k: v for k, v in t.attrs.to_dict().items() if k != "parts"}
    for m in store.model_keys():
        info = store.model_info(m)
        layers = {}
        for layer in store.layers(m):
            la = store.layer_attrs(m, layer)
            layers[str(layer)] = {
                **{k: v for k, v in la.to_dict().items() if k in LayerAttrs.SUMMARY},
                "state": la.state(),
            }
        out["models"][m] = {
            **{k: v for k, v in info.to_dict().items() if k != "config"},
            "layers": layers,
        }
    out["provenance"] = provenance(store)
    out.setdefault("extra", {})["provenance"] = provenance_lines(out["provenance"])
    return out


def _target(t: Any) -> str:
    """A transcoder's target, as ``info`` shows it (a store's value: only printed, as text)."""
    if not isinstance(t, dict):
        return ""
    return f", reconstructing {t.get('model')} layer {t.get('layer')}"


def provenance(store: Store) -> dict[str, Any]:
    """What made the store: per model and layer, the model (id, revision, weights hash), tokenizer hash,
    corpus (file hash, row count), codec, actstore version, the full extraction config, and times."""
    root = store.attrs
    out: dict[str, Any] = {
        "store": {k: v for k, v in root.to_dict().items() if k in StoreAttrs.known()},
        "tokenizations": {},
        "models": {},
        "saes": {},
    }
    updated = [root.created]
    for key in store.tokenization_keys():
        a = store.tokenization(key).attrs
        data, report = a.data or {}, a.data_report or {}
        out["tokenizations"][key] = {
            "tokenizer": a.tokenizer_source,
            "tokenizer_sha256": a.tokenizer_sha256,
            "max_length": a.max_length,
            "data_source": data.get("source"),
            "data_sha256": data.get("sha256"),
            "data_limit": data.get("limit"),
            "n_samples": a.n_samples,
            "n_rows_read": report.get("n_rows_read", report.get("n_read")),
            "n_tokens": a.n_tokens,
            "created": a.created,
            "completed": a.completed,
        }
        updated.append(a.completed)
    for m in store.models:
        info = store.model_info(m)
        layers = {}
        for layer in store.layers(m):
            la = store.layer_attrs(m, layer)
            layers[str(layer)] = {k: getattr(la, k) for k in LayerAttrs.PROVENANCE}
            updated.append(la.updated)
        out["models"][m] = {
            "source": info.source,
            "revision": info.revision,
            "weights_sha256": info.weights_sha256,
            "tokenizer_sha256": info.tokenizer_sha256,
            "tokenization": info.tokenization,
            "created": info.created,
            "layers": layers,
        }
    for name in sae_names(store):
        try:
            cfg = json.loads(store.loc.read_bytes(layout.sae_file(name, layout.SAE_CONFIG)))
        except (ValueError, FileNotFoundError):
            cfg = {"error": "cfg.json unreadable"}
        out["saes"][name] = {
            k: cfg.get(k)
            for k in (
                "model",
                "layer",
                "arch",
                "d_in",
                "d_sae",
                "target",
                "actstore_version",
                "training",
            )
        }
    out["store"]["updated"] = max((u for u in updated if u), default=None)
    try:
        man = read_manifest(store.loc)
    except IntegrityError:
        man = {"updated": "unreadable"}
    out["store"]["manifest"] = (
        None if man is None else {"updated": man.get("updated"), "files": len(man.get("files", {}))}
    )
    return out


def provenance_lines(prov: dict[str, Any]) -> list[str]:
    """``provenance`` as short lines for ``actstore info``."""
    s = prov["store"]
    man = s.get("manifest")
    lines = [
        f"store created {s.get('created')}, updated {s.get('updated')}, actstore {s.get('actstore_version')}; "
        + (
            f"manifest of {man['files']} files ({man['updated']})"
            if man
            else "no manifest (actstore verify --update-manifest)"
        )
    ]
    for key, t in prov["tokenizations"].items():
        lines.append(
            f"tokenization {key}: tokenizer {t['tokenizer']} sha256 {str(t['tokenizer_sha256'])[:12]}; data {t['data_source']} "
            f"sha256 {str(t['data_sha256'])[:12]}, {t['n_samples']} samples"
            + (f" (limit {t['data_limit']})" if t.get("data_limit") else "")
        )
    for m, info in prov["models"].items():
        lines.append(
            f"model {m}: {info['source']} revision {info['revision'] or '-'} weights sha256 {str(info['weights_sha256'])[:12]}"
        )
        for layer, la in info["layers"].items():
            c = la.get("config") or {}
            lines.append(
                f"  layer {layer}: {la['codec']}, actstore {la['actstore_version']}, created {la['created']}, updated "
                f"{la['updated']}; config batch_size={c.get('batch_size')} max_length={c.get('max_length')} "
                f"chunk_rows={c.get('chunk_rows')} device={c.get('device')}"
            )
    for name, sae in prov["saes"].items():
        lines.append(
            f"sae {name}: {sae.get('arch')} {sae.get('d_in')}->{sae.get('d_sae')} on {sae.get('model')} layer {sae.get('layer')}"
            + _target(sae.get("target"))
        )
    return lines
