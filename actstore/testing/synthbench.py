"""SynthSAEBench's synthetic model, rebuilt locally, as a store and as rows with their true codes.

SynthSAEBench-16k (Chanin & Garriga-Alonso 2026; SAELens ``docs/synth_sae_bench.md``) is a SAELens
``SyntheticModel``: 16,384 true feature directions in 768 dimensions, Zipfian firing, a hierarchy of mutually
exclusive children, low-rank correlations. Its published config and seed rebuild it exactly, without the hub;
:func:`synthsaebench_config` is that config, with its size as arguments so tests can build a small one.

Needs ``sae-lens`` (a development dependency): ``pip install sae-lens``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from actstore.analysis.groundtruth import TruthBatch
from actstore.testing.synthetic import write_synthetic_store

if TYPE_CHECKING:
    from actstore.store.reader import Store


def synthsaebench_config(
    num_features: int = 16_384,
    hidden_dim: int = 768,
    root_nodes: int = 128,
    ortho_steps: int = 100,
    seed: int = 42,
) -> Any:
    """SynthSAEBench-16k's ``SyntheticModelConfig`` (v2: children scaled by their parent); the defaults are the
    published benchmark, smaller values a model of the same shape for tests."""
    from sae_lens.synthetic import (
        FoldedNormalMagnitudeConfig,
        HierarchyConfig,
        LinearMagnitudeConfig,
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
    )

    return SyntheticModelConfig(
        num_features=num_features,
        hidden_dim=hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=0.5, max_prob=0.4, min_prob=5e-4
        ),
        hierarchy=HierarchyConfig(
            total_root_nodes=root_nodes,
            branching_factor=4,
            max_depth=3,
            mutually_exclusive_portion=1.0,
            mutually_exclusive_min_depth=0,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        ),
        orthogonalization=OrthogonalizationConfig(num_steps=ortho_steps, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5,
        seed=seed,
    )


def synthetic_model(cfg: Any, cache: str | None = None, device: str = "cpu") -> Any:
    """The ``SyntheticModel`` of ``cfg`` on ``device``, loaded from ``cache`` when it holds one of the same config
    (building the 16k model orthogonalises 16,384 directions: ~40 min on 2 cores), else built (and saved to
    ``cache``)."""
    from pathlib import Path

    from sae_lens.synthetic import SyntheticModel

    if cache is not None and (Path(cache) / "synthetic_model_config.json").exists():
        model = SyntheticModel.load_from_disk(cache, device=device)
        if model.cfg.to_dict() == cfg.to_dict():
            return model
    model = SyntheticModel(cfg, device=device)
    if cache is not None:
        model.save(cache)
    return model


def truth_batches(model: Any, n: int, batch: int = 4096, seed: int = 0) -> Iterator[TruthBatch]:
    """``n`` rows of ``model`` with their true codes, in batches, on the model's device; the same ``seed`` gives the
    same rows on the same device (a GPU's generator draws other rows than the CPU's)."""
    torch.manual_seed(seed)
    done = 0
    while done < n:
        m = min(batch, n - done)
        with torch.no_grad():
            codes = model.activation_generator.sample(m)  # (m, n_true)
            if codes.is_sparse:
                codes = codes.to_dense()
            x = model.feature_dict(codes)  # (m, d)
        yield TruthBatch(x, codes)
        done += m


def write_synthbench_store(
    path: str, model: Any, n_rows: int, seed: int = 0, chunk_rows: int = 4096
) -> Store:
    """A store of ``n_rows`` rows of ``model`` as ``models/synth/layer_0`` (fp32), seeded by ``seed``."""
    blocks = (
        b.x.cpu().numpy().astype(np.float32) for b in truth_batches(model, n_rows, chunk_rows, seed)
    )
    return write_synthetic_store(
        path, blocks, n_rows, model.cfg.hidden_dim, model="synth", layer=0, chunk_rows=chunk_rows
    )
