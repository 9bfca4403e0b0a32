"""What a crosscoder diff says, read back: :func:`crosscoder_stability` (how many one-model latents of one crosscoder
have a partner of the same class, by decoder cosine, in another trained with another seed), :func:`top_latents`
(a class's latents with their top tokens), :func:`diff_agreement` (the crosscoder's classes against the feature diff of
two SAEs) and :func:`crosscoder_summary` (the report's table). The diff itself: :mod:`actstore.analysis.crosscoder`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from actstore.analysis.config import CROSSCODER_CLASSES
from actstore.errors import ConfigError, NotFoundError
from actstore.sae.files import load_sae, read_config

if TYPE_CHECKING:
    from actstore.sae.model import SAE
    from actstore.store.reader import Store


from actstore.analysis.crosscoder import CrosscoderDiff, load_crosscoder_diff, source_index


@dataclass
class Stability:
    """How far two crosscoders (e.g. two seeds) agree on their one-model latents."""

    names: tuple[str, str]
    counts: dict[str, tuple[int, int]]
    """class -> (latents in the first, in the second)."""
    matched: dict[str, float]
    """``b-only`` / ``a-only`` / ``b-only exclusive`` / ``changed`` / ``shared`` -> fraction of the first's latents
    of that class with a partner of the same class in the second (decoder cosine >= ``cos`` in the source that
    defines it: A for a-only, B otherwise); NaN if it has none."""
    cos: float


def crosscoder_stability(store: Store, first: str, second: str, cos: float = 0.7) -> Stability:
    """Compare the saved diffs of two crosscoders of the same sources (``diff-crosscoder`` each first)."""
    da, db = load_crosscoder_diff(store, first), load_crosscoder_diff(store, second)
    if da.sources != db.sources:
        raise ConfigError(
            f"crosscoders {first} and {second} compare other sources ({da.sources} vs {db.sources})"
        )
    sa, sb = load_sae(store, first), load_sae(store, second)
    ia, ib = source_index(sa.cfg, da.sources[0], 0), source_index(sa.cfg, da.sources[1], 1)
    ja, jb = source_index(sb.cfg, db.sources[0], 0), source_index(sb.cfg, db.sources[1], 1)

    def rows(sae: SAE, i: int) -> np.ndarray:
        c = sae.cfg
        w = sae.W_dec.detach().float().view(c.d_sae, c.n_sources, c.d_in)[:, i].double().numpy()
        return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)

    matched: dict[str, float] = {}
    checks = (
        ("b-only", "b-only", 1),
        ("a-only", "a-only", 0),
        ("b-only exclusive", "b-only", 1),
        ("changed", "changed", 1),
        ("shared", "shared", 1),
    )
    for key, cls, src in checks:
        pick_a = (da.table["class"] == cls).to_numpy()
        pick_b = (db.table["class"] == cls).to_numpy()
        if key.endswith("exclusive"):
            pick_a &= da.table["exclusive"].to_numpy()
            pick_b &= db.table["exclusive"].to_numpy()
        if not pick_a.any():
            matched[key] = float("nan")
            continue
        if not pick_b.any():
            matched[key] = 0.0
            continue
        ra = rows(sa, ib if src else ia)[pick_a]
        rb = rows(sb, jb if src else ja)[pick_b]
        matched[key] = float(((ra @ rb.T).max(1) >= cos).mean())
    counts = {
        c: (da.counts.get(c, 0), db.counts.get(c, 0))
        for c in [*CROSSCODER_CLASSES, "b-only exclusive"]
    }
    return Stability((first, second), counts, matched, cos)


def top_latents(
    store: Store,
    res: CrosscoderDiff,
    cls: str | None = "b-only",
    n: int = 10,
    n_tokens: int = 5,
    exclusive: bool = True,
) -> pl.DataFrame:
    """The ``n`` most frequent latents of class ``cls`` (only the ones Latent Scaling does not flag, unless
    ``exclusive`` is False); ``cls=None``: the ``n`` live latents leaning furthest towards B (highest relative
    norm). With their top tokens when the crosscoder is encoded (``actstore encode``)."""
    from actstore.encoding.table import encoded_saes
    from actstore.query.lookups import top_tokens

    if cls is None:
        t = (
            res.table.filter(pl.col("class") != "dead")
            .sort(["rel_norm", "latent"], descending=[True, False])
            .head(n)
        )
    else:
        t = res.table.filter(pl.col("class") == cls)
        if exclusive:
            t = t.filter(pl.col("exclusive"))
        t = t.sort(["frequency", "latent"], descending=[True, False]).head(n)
    cols = [
        "latent",
        "class",
        "frequency",
        "norm_a",
        "norm_b",
        "rel_norm",
        "cosine",
        "nu_error",
        "flag",
    ]
    t = t.select(cols)
    tk = store.tokenization(read_config(store, res.name).tokenization)
    # not encoded, or no token tables
    if res.name not in encoded_saes(store) or not tk.parquet_keys("samples"):
        return t.with_columns(pl.lit(None, dtype=pl.String).alias("top_tokens"))
    toks = [
        ", ".join(top_tokens(store, int(j), sae=res.name, n=n_tokens)["token"].to_list())
        for j in t["latent"]
    ]
    return t.with_columns(pl.Series("top_tokens", toks, dtype=pl.String))


def diff_agreement(store: Store, crosscoder: str, diff: str, cos: float = 0.5) -> dict[str, Any]:
    """How a crosscoder's classes agree with ``diff-features`` of two SAEs at the same layer (A's SAE, B's SAE):
    each exclusive B-only latent is matched to SAE B's feature of largest decoder cosine (>= ``cos``), each
    exclusive A-only one to SAE A's; the fractions whose match ``diff-features`` called new (B) or lost (A) — the
    two methods agreeing that the model gained or lost it — and of shared latents' matches called retained."""
    from actstore.analysis.diff import load_diff

    res, fd = load_crosscoder_diff(store, crosscoder), load_diff(store, diff)
    cc = load_sae(store, crosscoder)
    out: dict[str, Any] = {"crosscoder": crosscoder, "diff": diff, "cos": cos}
    checks = (
        ("b-only", "b", fd.config["sae_b"], "new", 1),
        ("a-only", "a", fd.config["sae_a"], "lost", 0),
        ("shared", "a", fd.config["sae_a"], "retained", 0),
    )
    for cls, side, sae_name, status, src in checks:
        pick = res.table.filter(
            (pl.col("class") == cls) & (pl.col("exclusive") | (cls == "shared"))
        )["latent"].to_numpy()
        sae = load_sae(store, sae_name)
        i = source_index(cc.cfg, res.sources[src], src)
        c = cc.cfg
        w = (
            cc.W_dec.detach()
            .float()
            .view(c.d_sae, c.n_sources, c.d_in)[:, i]
            .double()
            .numpy()[pick]
        )  # (n, d_in)
        f = sae.W_dec.detach().double().numpy()  # (d_sae_b, d_in)
        if len(pick) == 0:
            out[cls] = {"latents": 0, "matched": 0, "agree": float("nan")}
            continue
        w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
        f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        sim = w @ f.T  # (n, d_sae)
        best, best_cos = sim.argmax(1), sim.max(1)
        side_tab = fd.table.filter(pl.col("side") == side).sort("feature")
        statuses = np.asarray(side_tab["status"].to_list(), dtype=object)
        ok = best_cos >= cos
        agree = statuses[best[ok]] == status
        frac = float(agree.mean()) if ok.any() else float("nan")
        out[cls] = {
            "latents": int(len(pick)),
            "matched": int(ok.sum()),
            "agree": frac,
            "status": status,
        }
    return out


def crosscoder_summary(store: Store) -> tuple[pl.DataFrame | None, list[str]]:
    """One row per crosscoder with a saved diff: its sources, per-source held-out FVU, class counts, and (when a
    saved ``diff-features`` of SAEs on the same two models at its layer exists) how far the two methods agree;
    and notes naming the crosscoders without a saved diff."""
    from actstore.analysis.diff import load_diff
    from actstore.query.views import diff_names
    from actstore.sae.files import read_metrics, sae_names

    rows, notes = [], []
    diffs = {}
    for d in diff_names(store):
        cfg = load_diff(store, d).config
        ca, cb = read_config(store, cfg["sae_a"]), read_config(store, cfg["sae_b"])
        diffs[(ca.model, cb.model, ca.layer)] = d
    for name in sae_names(store):
        c = read_config(store, name)
        if not c.is_crosscoder:
            continue
        try:
            res = load_crosscoder_diff(store, name)
        except NotFoundError:
            notes.append(
                f"crosscoder {name} has no saved diff: run actstore diff-crosscoder {store.url} --sae {name}"
            )
            continue
        ia, ib = source_index(c, res.sources[0], 0), source_index(c, res.sources[1], 1)
        fvu = {
            s["source"]: s["fvu"]
            for s in (read_metrics(store, name).get("eval") or {}).get("sources", [])
        }
        n = res.counts
        row = {
            "crosscoder": name,
            "layer": (c.layers or [0])[ia],
            "A": res.sources[0],
            "B": res.sources[1],
            "arch": c.arch,
            "d_sae": c.d_sae,
            "fvu A": fvu.get(res.sources[0]),
            "fvu B": fvu.get(res.sources[1]),
            "shared": n["shared"],
            "changed": n["changed"],
            "a-only": n["a-only"],
            "b-only": n["b-only"],
            "b-only exclusive": n["b-only exclusive"],
            "dead": n["dead"],
        }
        alive = max(1, c.d_sae - n["dead"])
        row["b-only share"] = n["b-only exclusive"] / alive
        key = ((c.models or [])[ia], (c.models or [])[ib], (c.layers or [0])[ia])
        row["feature diff"] = diffs.get(key)
        if row["feature diff"]:
            ag = diff_agreement(store, name, row["feature diff"])
            row["b-only matched new"] = ag["b-only"]["agree"]
            row["shared matched retained"] = ag["shared"]["agree"]
        rows.append(row)
    return (pl.DataFrame(rows).sort(["A", "B", "layer"]) if rows else None), notes
