"""Crosscoder diff: which latents of a crosscoder belong to both models, to one, or changed (``diff-crosscoder``).

A crosscoder (``actstore train-crosscoder``) has one dictionary and a decoder per source (model A and model B at
one layer, say pretrained and fine-tuned). Per latent ``j``, from its decoder rows ``d_A``, ``d_B`` (in the
normalised space, each model scaled to mean squared norm ``d_in``):

* the **decoder norms** ``||d_A||``, ``||d_B||``;
* the **relative norm** of Minder et al. 2025 (arXiv 2504.02922, Sec. 2):
  ``0.5 * ((||d_B|| - ||d_A||) / max(||d_A||, ||d_B||) + 1)``: 0 = only in A, 1 = only in B, 0.5 = equal;
* the **decoder cosine** between ``d_A`` and ``d_B``;
* **Latent Scaling** (Minder et al., Sec. 3): with ``u`` the decoder row of the source the latent is strongest in
  (the *dominant* one) and ``f`` its activation, the least-squares scale ``beta`` of ``f * u`` explaining, in each
  source ``m``, (error) ``e_m + f d_m``, the part of ``x_m`` the crosscoder leaves unexplained plus the latent's own
  contribution, or (reconstruction) ``x_hat_m - f d_m``, the reconstruction without the latent:
  ``beta = sum f <u, y_m> / (||u||^2 sum f^2)``, summed over every token row (out-of-core, one pass). The ratios
  ``nu_error = beta_error(other) / beta_error(dominant)`` and ``nu_recon = beta_recon(other) / beta_error(dominant)``
  are near 0 for a latent truly absent from the other model. (Minder et al. divide ``beta_recon(other)`` by
  ``beta_recon(dominant)``; that is the direction's share in the dominant model's reconstruction *without* the
  latent, near zero when no other latent carries it, so the ratio is noise: on planted data |nu_recon| reached 20
  for shared atoms. Here both ratios divide by the latent's own scale in its dominant model.)
  A high ``nu_error`` means the other model *does* carry the direction but the crosscoder's L1 shrank its
  decoder there (Complete Shrinkage); a high ``nu_recon`` means the other model's
  reconstruction carries it through other latents (Latent Decoupling).

Classes (thresholds: :class:`~actstore.analysis.config.CrosscoderDiffConfig`): ``a-only`` (relative norm <=
``only``), ``b-only`` (>= 1 - ``only``), ``shared`` (within ``shared_band`` of 0.5 and decoder cosine >=
``shared_cos``), ``changed`` (the rest: present in both, with another weight or direction), ``dead`` (never
active on the scanned rows). An A-only / B-only latent with ``nu_error`` or ``nu_recon`` >= ``nu`` is flagged
(``complete_shrinkage`` / ``latent_decoupling``); ``exclusive`` is true for the unflagged ones, the latents to
believe are specific to one model.

The table is saved as ``saes/<name>/latents.parquet`` (``latents.json`` beside it) and read by the SQL view
``crosscoder_latents``. What one reads from the table (stability across seeds, the top latents of
a class, agreement with the feature diff, the report's summary) is :mod:`actstore.analysis.crosscoder_reads`.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from actstore.analysis.config import CROSSCODER_CLASSES, CrosscoderDiffConfig
from actstore.clock import now
from actstore.errors import ConfigError, NotFoundError
from actstore.format import layout
from actstore.sae.files import load_sae, read_config
from actstore.storage.integrity import check_file, update_manifest
from actstore.storage.locks import StoreLock

if TYPE_CHECKING:
    from actstore.sae.config import SAEConfig
    from actstore.sae.model import SAE
    from actstore.store.reader import Store


@dataclass
class CrosscoderDiff:
    """Per-latent scores and classes of one crosscoder between two of its sources."""

    name: str
    """The crosscoder."""
    table: pl.DataFrame
    """latent, norm_a, norm_b, rel_norm, cosine, frequency, beta_error_a, beta_error_b, nu_error, beta_recon_a,
    beta_recon_b, nu_recon, class, flag, exclusive."""
    counts: dict[str, int]
    """class -> latents; ``a-only exclusive`` / ``b-only exclusive``: those Latent Scaling does not flag."""
    sources: tuple[str, str]
    """``(A, B)`` as ``MODEL@LAYER``."""
    n_rows: int
    """Token rows Latent Scaling read."""
    config: dict[str, Any] = field(default_factory=dict)


def source_index(cfg: SAEConfig, which: str | None, default: int) -> int:
    """Index of a source named by model key or ``MODEL@LAYER`` among a crosscoder's sources."""
    labels = cfg.source_labels()
    if which is None:
        return default
    if which in labels:
        return labels.index(which)
    hits = [
        i
        for i, (m, _) in enumerate(zip(cfg.models or [], cfg.layers or [], strict=True))
        if m == which
    ]
    if len(hits) == 1:
        return hits[0]
    raise ConfigError(
        f"crosscoder {cfg.name} has no single source {which!r} (sources: {', '.join(labels)}): "
        "name one as MODEL@LAYER"
    )


def relative_norm(norm_a: np.ndarray, norm_b: np.ndarray) -> np.ndarray:
    """Minder et al.'s relative norm ``0.5 * ((|b| - |a|) / max(|a|, |b|) + 1)`` (0.5 where both are zero)."""
    top = np.maximum(norm_a, norm_b)
    return np.where(top > 0, 0.5 * ((norm_b - norm_a) / np.where(top > 0, top, 1.0) + 1.0), 0.5)


def decoder_stats(sae: SAE, ia: int, ib: int) -> dict[str, np.ndarray]:
    """Decoder norms of sources ``ia`` and ``ib``, their relative norm and cosine, each ``(d_sae,)``."""
    c = sae.cfg
    w = sae.W_dec.detach().float().cpu().view(c.d_sae, c.n_sources, c.d_in)
    da, db = w[:, ia].double().numpy(), w[:, ib].double().numpy()  # (d_sae, d_in) each
    na, nb = np.linalg.norm(da, axis=1), np.linalg.norm(db, axis=1)
    cos = (da * db).sum(1) / np.maximum(na * nb, 1e-12)
    return {
        "norm_a": na,
        "norm_b": nb,
        "rel_norm": relative_norm(na, nb),
        "cosine": np.where(na * nb > 0, cos, 0.0),
    }


def latent_scaling(
    store: Store,
    sae: SAE,
    ia: int,
    ib: int,
    dominant_b: np.ndarray,
    rows: int = 0,
    batch_rows: int = 4096,
    device: str = "cpu",
) -> tuple[dict[str, np.ndarray], int]:
    """Latent Scaling's betas of every latent in sources ``ia`` (A) and ``ib`` (B), and how often it fires, from
    one pass over the token rows (or about ``rows`` of them, in evenly spaced blocks); see the module docstring.
    ``dominant_b`` (bool ``(d_sae,)``) says whose decoder row is each latent's direction ``u``."""
    import torch

    with torch.no_grad():
        return _latent_scaling(store, sae, ia, ib, dominant_b, rows, batch_rows, device)


def _latent_scaling(
    store: Store,
    sae: SAE,
    ia: int,
    ib: int,
    dominant_b: np.ndarray,
    rows: int,
    batch_rows: int,
    device: str,
) -> tuple[dict[str, np.ndarray], int]:
    import torch

    from actstore.sae.model import check_fits

    c = sae.cfg
    stacked = check_fits(store, c, str(c.name))
    sae = sae.to(device).eval()
    s, m, d = c.d_sae, c.n_sources, c.d_in
    w = sae.W_dec.view(s, m, d)  # normalised space
    dom = torch.from_numpy(dominant_b).to(device)
    u = torch.where(dom[:, None], w[:, ib], w[:, ia])  # (d_sae, d_in): each latent's direction
    uu = (u * u).sum(1).double()  # (d_sae,)
    u_da, u_db = (
        (u * w[:, ia]).sum(1).double(),
        (u * w[:, ib]).sum(1).double(),
    )  # <u, d_A>, <u, d_B>
    acc = {
        k: torch.zeros(s, dtype=torch.float64, device=device)
        for k in ("f2", "err_a", "err_b", "rec_a", "rec_b", "fired")
    }
    n_all = len(stacked)
    if rows and rows < n_all:  # evenly spaced blocks covering about ``rows`` rows
        n_blocks = max(1, math.ceil(rows / batch_rows))
        starts = np.linspace(0, n_all - min(batch_rows, n_all), n_blocks).round().astype(np.int64)
        blocks = [(int(a), int(min(a + batch_rows, n_all))) for a in np.unique(starts)]
    else:
        blocks = [(a, min(a + batch_rows, n_all)) for a in range(0, n_all, batch_rows)]
    n_read = 0
    for a, b in blocks:
        x = torch.from_numpy(stacked[a:b]).to(device)  # (n, n_sources * d_in), raw
        n = len(x)
        n_read += n
        f = sae.encode(x).double()  # (n, d_sae)
        xn = (x * sae.scale).view(n, m, d)
        x_hat = (sae.decode_normalised(f.to(sae.W_dec.dtype))).view(n, m, d)  # normalised space
        err = xn - x_hat
        ut = u.t()  # (d_in, d_sae)
        acc["f2"] += (f * f).sum(0)
        acc["fired"] += (f > 0).sum(0).double()
        for key, y in (
            ("err_a", err[:, ia]),
            ("err_b", err[:, ib]),
            ("rec_a", x_hat[:, ia]),
            ("rec_b", x_hat[:, ib]),
        ):
            acc[key] += (f * (y @ ut).double()).sum(0)  # sum_x f_j(x) <u_j, y(x)>
    f2 = acc["f2"]
    den = torch.where(f2 > 0, uu * f2, torch.ones_like(f2))
    out = {
        "beta_error_a": (acc["err_a"] + f2 * u_da) / den,  # y = e_A + f d_A
        "beta_error_b": (acc["err_b"] + f2 * u_db) / den,
        "beta_recon_a": (acc["rec_a"] - f2 * u_da) / den,  # y = x_hat_A - f d_A
        "beta_recon_b": (acc["rec_b"] - f2 * u_db) / den,
    }
    res = {
        k: torch.where(f2 > 0, v, torch.full_like(v, float("nan"))).cpu().numpy()
        for k, v in out.items()
    }
    res["frequency"] = (acc["fired"] / max(n_read, 1)).cpu().numpy()
    return res, n_read


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.abs(den) > 1e-12, num / den, np.nan)


def classify(
    t: dict[str, np.ndarray], cfg: CrosscoderDiffConfig
) -> tuple[list[str], list[str | None], np.ndarray]:
    """``(class, flag, exclusive)`` of each latent from its scores (module docstring)."""
    rel, cos, freq = t["rel_norm"], t["cosine"], t["frequency"]
    cls = np.where(
        rel <= cfg.only, "a-only", np.where(rel >= 1 - cfg.only, "b-only", "changed")
    ).astype(object)
    cls[(np.abs(rel - 0.5) <= cfg.shared_band) & (cos >= cfg.shared_cos)] = "shared"
    cls[~(freq > 0)] = "dead"
    only = (cls == "a-only") | (cls == "b-only")
    shrink = only & (np.nan_to_num(t["nu_error"], nan=0.0) >= cfg.nu)
    decouple = only & ~shrink & (np.nan_to_num(t["nu_recon"], nan=0.0) >= cfg.nu)
    flag = np.where(
        shrink, "complete_shrinkage", np.where(decouple, "latent_decoupling", None)
    ).tolist()
    return cls.tolist(), flag, only & ~shrink & ~decouple


def diff_crosscoder(store: Store, cfg: CrosscoderDiffConfig, save: bool = True) -> CrosscoderDiff:
    """Score and classify every latent of crosscoder ``cfg.sae`` between sources A and B; saved beside it when ``save``."""
    sae_cfg = read_config(store, cfg.sae)
    if not sae_cfg.is_crosscoder:
        raise ConfigError(
            f"SAE {cfg.sae!r} in {store.url} reads one model: diff-crosscoder needs a crosscoder "
            "(actstore train-crosscoder); compare two SAEs with actstore diff-features"
        )
    ia, ib = source_index(sae_cfg, cfg.a, 0), source_index(sae_cfg, cfg.b, 1)
    if ia == ib:
        raise ConfigError(
            f"--a and --b name the same source ({sae_cfg.source_labels()[ia]}): pick two"
        )
    from actstore.models.loading import auto_device

    device = auto_device(cfg.device)
    sae = load_sae(store, cfg.sae, device=device)
    t = decoder_stats(sae, ia, ib)
    betas, n_rows = latent_scaling(
        store, sae, ia, ib, t["rel_norm"] >= 0.5, cfg.rows, cfg.batch_rows, device
    )
    t |= betas
    dom_b = t["rel_norm"] >= 0.5
    # the latent's own scale in its dominant source
    dom_err = np.where(dom_b, t["beta_error_b"], t["beta_error_a"])
    for kind in (
        "error",
        "recon",
    ):  # nu = beta in the other source / the dominant source's error beta
        oth = np.where(dom_b, t[f"beta_{kind}_a"], t[f"beta_{kind}_b"])
        t[f"nu_{kind}"] = _ratio(oth, dom_err)
    cls, flag, exclusive = classify(t, cfg)
    cols = [
        "norm_a",
        "norm_b",
        "rel_norm",
        "cosine",
        "frequency",
        "beta_error_a",
        "beta_error_b",
        "nu_error",
        "beta_recon_a",
        "beta_recon_b",
        "nu_recon",
    ]
    table = pl.DataFrame(
        {
            "latent": np.arange(sae_cfg.d_sae, dtype=np.int32),
            **{k: t[k].astype(np.float64) for k in cols},
            "class": cls,
            "flag": pl.Series(flag, dtype=pl.String),
            "exclusive": exclusive,
        }
    )
    table = table.with_columns(pl.col(c).fill_nan(None) for c in cols)
    counts = {c: int((table["class"] == c).sum()) for c in CROSSCODER_CLASSES}
    for side in ("a-only", "b-only"):
        counts[f"{side} exclusive"] = int(((table["class"] == side) & table["exclusive"]).sum())
    labels = sae_cfg.source_labels()
    res = CrosscoderDiff(cfg.sae, table, counts, (labels[ia], labels[ib]), n_rows, asdict(cfg))
    if save:
        save_crosscoder_diff(store, res)
    return res


def save_crosscoder_diff(store: Store, res: CrosscoderDiff) -> str:
    """Write ``latents.parquet`` and ``latents.json`` into the crosscoder's folder (checksummed)."""
    buf = io.BytesIO()
    res.table.write_parquet(buf)
    meta = {
        "config": res.config,
        "counts": res.counts,
        "sources": list(res.sources),
        "n_rows": res.n_rows,
        "created": now(),
    }
    key = layout.sae_dir(res.name)
    # one writer at a time
    with StoreLock(store.loc, f"{key}/latents", f"diff-crosscoder {res.name}").acquire():
        store.loc.write_bytes(layout.sae_file(res.name, layout.CROSSCODER_LATENTS), buf.getvalue())
        store.loc.write_bytes(
            layout.sae_file(res.name, layout.CROSSCODER_DIFF), json.dumps(meta, indent=2).encode()
        )
        update_manifest(store.loc, prefixes=[key])
    return store.loc.join(layout.sae_file(res.name, layout.CROSSCODER_LATENTS))


def load_crosscoder_diff(store: Store, name: str) -> CrosscoderDiff:
    """The saved diff of crosscoder ``name`` (checked against the manifest)."""
    t_key, m_key = (
        layout.sae_file(name, layout.CROSSCODER_LATENTS),
        layout.sae_file(name, layout.CROSSCODER_DIFF),
    )
    if not store.loc.exists(t_key) or not store.loc.exists(m_key):
        raise NotFoundError(
            f"crosscoder {name!r} in {store.url} has no saved diff: run actstore diff-crosscoder STORE --sae {name}"
        )
    raw = store.loc.read_bytes(t_key)
    check_file(store.loc, t_key, raw)
    table = pl.read_parquet(io.BytesIO(raw))
    raw = store.loc.read_bytes(m_key)
    check_file(store.loc, m_key, raw)
    meta = json.loads(raw)
    return CrosscoderDiff(
        name, table, meta["counts"], tuple(meta["sources"]), int(meta["n_rows"]), meta["config"]
    )  # type: ignore[arg-type]
