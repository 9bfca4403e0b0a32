"""What an encoding is before it is made: its rows, its feature buckets (as many as keep a bucket's activations in
memory at the end) and the settings a published or pending encoding must share to be the same one."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

from actstore.encoding.config import EncodeConfig
from actstore.encoding.table import (
    features_dir,
    sae_fingerprint,
)
from actstore.format.metadata import EncodingManifest

if TYPE_CHECKING:
    from actstore.sae.model import SAE
    from actstore.store.reader import Store


class Plan(NamedTuple):
    """What an encoding of one SAE over its layer is: its rows, its buckets, the settings an encoding must match."""

    n_rows: int
    d_sae: int
    n_buckets: int
    bucket_features: int
    """Features per bucket (the last bucket may hold fewer)."""
    base: str
    """The SAE's ``features/<sae>`` folder."""
    want: dict[str, Any]
    """Settings a published or pending encoding must share to be this one."""

    def matches(self, m: EncodingManifest) -> bool:
        """Whether an encoding (published or pending) was made with these weights, rows and settings."""
        return m.matches(self.want)


BUCKET_ENTRIES = 4_000_000
"""Activations a bucket is planned to hold at most: it is merged whole in memory at the end (~60 bytes an activation,
``workers`` buckets at a time: ~0.5 GB at 2 workers)."""


def bucket_count(cfg: EncodeConfig, d_sae: int, n_rows: int, l0: float) -> int:
    """Buckets for ``n_rows`` token rows at ``l0`` active features each: ``cfg.n_buckets``, or more so that a bucket
    holds about :data:`BUCKET_ENTRIES` activations at most; so the finish phase's memory does not grow with the
    corpus. Memory settings (``spill_entries``, ``workers``) do not change it: an encoding stays the same one."""
    return max(1, min(d_sae, max(cfg.n_buckets, math.ceil(n_rows * l0 / BUCKET_ENTRIES))))


def expected_l0(store: Store, name: str, sae: SAE) -> float:
    """Active features per token to plan for: k (topk, batchtopk), else the held-out L0 in the SAE's metrics.json (at
    most d_sae: the file may come from anyone), else a quarter of d_sae."""
    from actstore.sae.files import number, read_metrics

    if sae.cfg.k:
        return float(sae.cfg.k)
    ev = read_metrics(store, name).get("eval")
    l0 = number(ev.get("l0")) if isinstance(ev, dict) else None
    return (
        min(l0, sae.cfg.d_sae)
        if l0 is not None and math.isfinite(l0) and l0 > 0
        else sae.cfg.d_sae / 4
    )


def make_plan(store: Store, cfg: EncodeConfig, sae: SAE, n_rows: int) -> Plan:
    """The encoding of ``sae`` (as ``cfg`` names it) over ``n_rows`` token rows: its buckets and what it must match."""
    d_sae = sae.cfg.d_sae
    n_buckets = bucket_count(cfg, d_sae, n_rows, expected_l0(store, cfg.sae, sae))
    bucket_features = -(-d_sae // n_buckets)
    n_buckets = -(-d_sae // bucket_features)
    want = (
        dict(  # EncodingManifest fields (a misspelt one fails where the manifest is made from them)
            n_rows=n_rows,
            d_sae=d_sae,
            n_buckets=n_buckets,
            bucket_features=bucket_features,
            sae_sha256=sae_fingerprint(store, cfg.sae),
            row_group_rows=cfg.row_group_rows,
        )
    )
    return Plan(n_rows, d_sae, n_buckets, bucket_features, features_dir(cfg.sae), want)
