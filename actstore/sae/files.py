"""An SAE's files in a store: ``saes/<name>/`` weights, ``cfg.json`` and metrics; listing, loading, deleting."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from actstore.errors import IntegrityError, NotFoundError
from actstore.format import layout
from actstore.format.layout import name_ok
from actstore.format.metadata import EncodingManifest
from actstore.sae.config import DENSE_L0_FRACTION, SAEConfig, parse_config
from actstore.storage.integrity import check_file

if TYPE_CHECKING:
    import polars as pl
    import torch

    from actstore.sae.metrics import TrainTracker
    from actstore.sae.model import SAE
    from actstore.store.reader import Store


# ---------------------------------------------------------------- store I/O
def sae_names(store: Store) -> list[str]:
    """Names of the SAEs saved in a store (folders under ``saes/`` with a cfg.json)."""
    return [
        n
        for n in store.loc.list_dirs(layout.SAES)
        if name_ok(n) and store.loc.exists(layout.sae_file(n, layout.SAE_CONFIG))
    ]


def save_sae(store: Store, sae: SAE, name: str, metrics: dict[str, Any] | None = None) -> None:
    """Write ``sae.safetensors``, ``metrics.json`` (if given) and, last, ``cfg.json`` under ``saes/NAME/``."""
    weights, cfg_json = sae.to_bytes()
    store.loc.write_bytes(layout.sae_file(name, layout.SAE_WEIGHTS), weights)
    if metrics is not None:
        store.loc.write_bytes(
            layout.sae_file(name, layout.SAE_METRICS),
            json.dumps(metrics, indent=2, default=float).encode(),
        )
    store.loc.write_bytes(layout.sae_file(name, layout.SAE_CONFIG), cfg_json)


def _check_name(store: Store, name: str) -> None:
    names = sae_names(store)
    if name not in names:
        raise NotFoundError(
            f"no SAE named {name!r} in {store.url} (SAEs: {', '.join(names) or 'none'}): train one with actstore train"
        )


def load_sae(store: Store, name: str, device: str = "cpu") -> SAE:
    """Load the SAE ``name`` saved in ``store``."""
    from actstore.sae.model import SAE  # torch: only when weights are loaded

    _check_name(store, name)
    w_key, c_key = (
        layout.sae_file(name, layout.SAE_WEIGHTS),
        layout.sae_file(name, layout.SAE_CONFIG),
    )
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
    """The ``metrics.json`` written when SAE ``name`` was trained (empty if it has none); IntegrityError when it is
    not a JSON object. Its values are as written: read numbers through :func:`number`."""
    _check_name(store, name)
    key = layout.sae_file(name, layout.SAE_METRICS)
    if not store.loc.exists(key):
        return {}
    try:
        m = json.loads(store.loc.read_bytes(key))
    except (ValueError, RecursionError):
        m = None
    if not isinstance(m, dict):
        raise IntegrityError(
            f"metrics.json of SAE {name} in {store.url} is not a JSON object: retrain or re-import the "
            "SAE, or remove its folder"
        )
    return m


def number(value: Any) -> float | None:
    """A metric as a float, or None when it is not a number (a damaged or foreign metrics.json)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def whole(value: Any) -> int | None:
    """A count or size as an int, or None when it is not a whole number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and abs(value) < 2**63 else None


def _obj(d: Any, key: str) -> dict[str, Any]:
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, dict) else {}


def _never_fired(store: Store, name: str) -> float | None:
    """The fraction of SAE ``name``'s features that fire on no token of the store, as its encode counted it (None
    when it is not encoded, or was encoded before the count)."""
    key = f"{layout.features_dir(name)}/{layout.ENCODING}"
    try:
        raw = json.loads(store.loc.read_bytes(key)) if store.loc.exists(key) else None
        man = None if raw is None else EncodingManifest.from_dict(raw, key)
    except (ValueError, RecursionError, IntegrityError):
        return None
    return number(man.never_fired_fraction) if man is not None and man.complete else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _l1_arch(name: Any) -> bool:
    """Whether an architecture named in a (foreign, unchecked) cfg.json has an L1 coefficient."""
    from actstore.sae.archs import REGISTRY

    arch = REGISTRY.get(name) if isinstance(name, str) else None
    return arch is not None and arch.l1_penalty


def list_saes(store: Store) -> pl.DataFrame:
    """One row per SAE in the store: architecture, sizes, source layer and final held-out metrics."""
    import polars as pl

    rows = []
    for name in sae_names(store):
        try:
            cfg = json.loads(store.loc.read_bytes(layout.sae_file(name, layout.SAE_CONFIG)))
        except (ValueError, RecursionError):
            cfg = None
        if not isinstance(cfg, dict):
            raise IntegrityError(
                f"cfg.json of SAE {name} in {store.url} is not a JSON object: remove its folder "
                f"(saes/{name}) or restore it"
            )
        m = read_metrics(store, name)
        ev, tr = _obj(m, "eval"), _obj(m, "train")
        models, layers = cfg.get("models"), cfg.get("layers")
        l0, d_sae = number(ev.get("l0")), whole(cfg.get("d_sae"))
        rows.append(
            {
                "name": name,
                "kind": "crosscoder" if models else "sae",
                "sources": ",".join(
                    f"{a}@{b}"
                    for a, b in zip(
                        models, layers if isinstance(layers, list) else [], strict=False
                    )
                )
                if isinstance(models, list) and models
                else None,
                "arch": _text(cfg.get("arch")),
                "model": _text(cfg.get("model")),
                "layer": whole(cfg.get("layer")),
                "d_in": whole(cfg.get("d_in")),
                "d_sae": d_sae,
                "k": whole(cfg.get("k")),
                "l1": number(cfg.get("l1")) if _l1_arch(cfg.get("arch")) else None,
                "tokens": whole(m.get("tokens")),
                "fvu": number(ev.get("fvu")),
                "mse": number(ev.get("mse")),
                "l0": l0,
                # never fired on the held-out rows (imported SAEs: the fit rows)
                "dead": number(ev.get("dead_fraction")),
                # never fired on any token of the store (after encode)
                "dead_store": _never_fired(store, name),
                # the trainer's: none in its last dead_window tokens
                "dead_window": number(tr.get("dead_fraction")),
                "dense": number(ev.get("dense_fraction")),
                "train_fvu": number(tr.get("fvu")),
                "l0_fraction": l0 / d_sae if l0 is not None and d_sae else None,
                **probe_columns(read_evals(store, name)),
            }
        )
    schema = {
        "name": pl.String,
        "kind": pl.String,
        "sources": pl.String,
        "arch": pl.String,
        "model": pl.String,
        "layer": pl.Int64,
        "d_in": pl.Int64,
        "d_sae": pl.Int64,
        "k": pl.Int64,
        "l1": pl.Float64,
        "tokens": pl.Int64,
        "fvu": pl.Float64,
        "mse": pl.Float64,
        "l0": pl.Float64,
        "dead": pl.Float64,
        "dead_store": pl.Float64,
        "dead_window": pl.Float64,
        "dense": pl.Float64,
        "train_fvu": pl.Float64,
        "l0_fraction": pl.Float64,
        **dict.fromkeys(PROBE_COLUMNS, pl.Float64),
    }
    df = pl.DataFrame(rows, schema=schema)
    return df.with_columns(
        (pl.col("l0_fraction") > DENSE_L0_FRACTION).fill_null(False).alias("dense_code")
    )


PROBE_COLUMNS = ("probe_dense", "probe_k1", "probe_k5", "absorption", "full_absorption")
"""Columns of ``saes`` from ``actstore eval``: mean held-out accuracy of the dense probe and of the 1- and 5-sparse
probes, and the mean first-letter absorption fraction and full-absorption rate (None until the SAE is evaluated,
or where those were not run)."""


def read_evals(store: Store, name: str) -> dict[str, Any]:
    """SAE ``name``'s ``evals.json`` (``actstore eval``), checked against the manifest; empty when it has none or it
    does not parse."""
    key = layout.sae_file(name, layout.SAE_EVALS)
    if not store.loc.exists(key):
        return {}
    raw = store.loc.read_bytes(key)
    check_file(store.loc, key, raw)
    try:
        out = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return out if isinstance(out, dict) else {}


def probe_columns(evals: dict[str, Any]) -> dict[str, float | None]:
    """:data:`PROBE_COLUMNS` from an ``evals.json``."""
    sp = _obj(evals, "sparse_probing")
    sparse = _obj(sp, "sparse")
    ab = _obj(evals, "absorption")
    return {
        "probe_dense": number(sp.get("dense")),
        "probe_k1": number(sparse.get("1")),
        "probe_k5": number(sparse.get("5")),
        "absorption": number(ab.get("absorption_fraction")),
        "full_absorption": number(ab.get("full_absorption")),
    }


def dense_note(name: str, l0: float | None, d_sae: int) -> str | None:
    """The sentence saying SAE ``name`` is dense (held-out L0 above ``DENSE_L0_FRACTION`` of ``d_sae``), else None."""
    if l0 is None or not d_sae or l0 / d_sae <= DENSE_L0_FRACTION:
        return None
    return (
        f"SAE {name} is dense: L0 {l0:.0f} of {d_sae} features ({l0 / d_sae:.0%}) fire on every "
        f"token, above {DENSE_L0_FRACTION:.0%}; its features are not sparse, so its top features by variance tend to "
        "be generic tokens ([CLS], 'the', '.') and a feature diff against it says little. Train it sparser: "
        "--arch topk --k N, or a larger --l1 (the paper preset's l1 1e-3 on normalised inputs is dense by design)"
    )


def dense_notes(saes: pl.DataFrame) -> list[str]:
    """One sentence per SAE of :func:`list_saes` whose code is dense, saying what that implies."""
    import polars as pl

    rows = saes.filter(pl.col("dense_code")).iter_rows(named=True)
    return [n for r in rows if (n := dense_note(r["name"], r["l0"], r["d_sae"]))]


def delete_sae(store: Store, name: str) -> None:
    """Remove ``saes/NAME/`` (finished SAE or unfinished run) if present."""
    store.loc.rmtree(layout.sae_dir(name))


# ---------------------------------------------------------------- checkpoints of unfinished runs
def save_checkpoint(
    store: Store,
    name: str,
    sae: SAE,
    opt: torch.optim.Optimizer,
    tracker: TrainTracker,
    meta: dict[str, Any],
) -> None:
    """Write run ``name``'s checkpoint (its SAE, optimizer and tracker state, and ``meta``) whole."""
    from actstore.models.checkpoint import optimizer_tensors, pack

    tensors = (
        {f"sae.{k}": v for k, v in sae.state_tensors().items()}
        | optimizer_tensors(opt)
        | tracker.state()
    )
    store.loc.write_bytes(
        layout.sae_file(name, layout.SAE_CHECKPOINT),
        pack(tensors, {"meta": meta, "sae_cfg": asdict(sae.cfg)}),
    )


def read_checkpoint(
    store: Store, name: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any], SAEConfig]:
    """The tensors, run state and SAE config of run ``name``'s checkpoint; IntegrityError if it is damaged."""
    from actstore.models.checkpoint import unpack

    try:
        packed = unpack(store.loc.read_bytes(layout.sae_file(name, layout.SAE_CHECKPOINT)))
        meta, sae_cfg = packed.meta["meta"], packed.meta["sae_cfg"]
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("config", {}), dict)
            and isinstance(sae_cfg, dict)
        ):
            raise TypeError("its run state is not JSON objects")
        return packed.tensors, meta, SAEConfig.from_dict(sae_cfg)
    except OSError:
        raise
    except (
        Exception
    ) as exc:  # JSON, safetensors or layout errors of bytes from disk: not a bug, a damaged file
        raise IntegrityError(
            f"the checkpoint of unfinished run {name!r} in {store.url} is damaged ({exc}): pass --overwrite "
            "to start the run over"
        ) from None
