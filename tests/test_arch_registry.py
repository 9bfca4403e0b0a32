"""A new SAE architecture is one module plus its line in the registry: one defined here (BatchTopK with an L1 on the
activations its batch keeps, added through ``Arch.extra_loss``, and a start of its own through ``Arch.start``) is
trained, saved, loaded and encoded by the code as it is, asking the object."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actstore.errors import ConfigError
from actstore.sae import archs
from actstore.sae.archs.batchtopk import BatchTopK
from actstore.sae.config import TrainConfig
from actstore.sae.files import load_sae
from actstore.sae.train import train_sae
from actstore.store.reader import open_store
from actstore.testing.synthetic import write_synthetic_store


class KeptL1(BatchTopK):
    """BatchTopK plus ``0.2 x`` the mean activation its batch keeps."""

    name = "kept-l1-test"
    calls = {"loss": 0, "start": 0}

    def extra_loss(self, sae, entries, target_n, options):
        self.calls["loss"] += 1
        return 0.2 * entries.values.sum() / entries.n_rows

    def start(self, sae, rows_n, mean_n):
        self.calls["start"] += 1
        super().start(sae, rows_n, mean_n)


@pytest.fixture
def registered(monkeypatch):
    arch = KeptL1()
    monkeypatch.setitem(archs.REGISTRY, arch.name, arch)
    return arch


def _store(tmp_path) -> str:
    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((24, 16)).astype(np.float32)
    codes = (rng.random((6000, 24)) < 0.1) * rng.uniform(1, 2, (6000, 24))
    x = (codes @ atoms).astype(np.float32)
    path = str(tmp_path / "s.zarr")
    write_synthetic_store(path, [x], len(x), 16, chunk_rows=512)
    return path


def test_an_architecture_defined_in_one_module_trains_saves_and_encodes(registered, tmp_path):
    path = _store(tmp_path)
    cfg = TrainConfig(model="synth", layer=0, arch=registered.name, d_sae=48, k=3, epochs=2, batch_size=256,
                      device="cpu", name="mine", task_samples=0)  # fmt: skip
    res = train_sae(path, cfg, progress=False)
    assert (
        registered.calls["start"] == 1 and registered.calls["loss"] > 10
    )  # the trainer asked the object
    assert res.metrics["eval"]["fvu"] < 0.5
    loaded = load_sae(open_store(path), "mine")
    assert loaded.cfg.arch == registered.name
    x = torch.from_numpy(np.asarray(open_store(path).activations("synth", 0)[:200]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), res.sae.encode(x))


def test_its_extra_loss_lowers_what_the_batch_keeps(registered, tmp_path):
    path = _store(tmp_path)
    total = {}
    for arch in ("batchtopk", registered.name):
        cfg = TrainConfig(model="synth", layer=0, arch=arch, d_sae=48, k=3, epochs=2, batch_size=256,
                          device="cpu", name=arch, task_samples=0, seed=1)  # fmt: skip
        sae = train_sae(path, cfg, progress=False).sae
        x = torch.from_numpy(np.asarray(open_store(path).activations("synth", 0)[:2000]))
        with torch.no_grad():
            total[arch] = float(sae.encode(x).sum(1).mean())  # the mean total activation per row
    assert total[registered.name] < 0.7 * total["batchtopk"], total  # measured: 1.57 against 3.99


def test_an_unregistered_architecture_is_one_line():
    with pytest.raises(ConfigError, match="unknown --arch 'kept-l1-test'"):
        TrainConfig(model="synth", layer=0, arch="kept-l1-test", k=3)
