"""The CUDA paths of extraction (issue 29), run by ``bench/gpu_check.sh`` on a machine with a GPU and skipped
elsewhere. Their CPU twins run in every CI: the codec's parity (test_device_codecs), the device-encoded and
host-encoded writes against the stored fixture (test_stored_bytes, ``codec_on="device"``).

``ACTSTORE_GPU_TEST_DEVICE=cpu`` runs these same tests on the CPU (to check the tests themselves without a GPU).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import killed_on_call

import actstore
from actstore.data.corpora import DataConfig
from actstore.format import codecs, device_codecs
from actstore.models.taps import LayerTap
from actstore.store import worker as worker_mod
from actstore.store.config import ExtractConfig
from actstore.store.extract import extract

DEVICE = os.environ.get("ACTSTORE_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]


def hostile_rows(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((513, 96)) * 10.0 ** rng.uniform(-6, 5, (513, 96))).astype(np.float32)
    x[0] = 0.0
    x[1, 3] = 7e4  # beyond fp16
    x[2, :] = -1e-40  # subnormal
    return x


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_the_device_codec_is_bit_identical_to_numpy(codec):
    for seed in range(3):
        x = hostile_rows(seed)
        chan = codecs.channel_scale(x) if codec == "int8" else None
        t_chan = None if chan is None else torch.from_numpy(chan).to(DEVICE)
        got = device_codecs.to_host(
            device_codecs.encode(torch.from_numpy(x).to(DEVICE), codec, t_chan)
        )
        want = codecs.encode(x, codec, chan)
        np.testing.assert_array_equal(got.values, want.values)
        if codec == "int8":
            np.testing.assert_array_equal(got.scale, want.scale)


@pytest.mark.parametrize("case", ["f3-int8", "f3-bf16", "f3-int8-window", "f1-fp16"])
def test_pinned_slots_and_the_copy_stream_write_the_fixture_bytes(
    case, tmp_path, tiny_bert_dir, corpus_file, monkeypatch
):
    """The deterministic tap on the device: encoded there, copied on the copy stream into pinned slots, written."""
    import test_stored_bytes as sb

    monkeypatch.setattr(LayerTap, "__call__", sb.deterministic_hidden_states)
    fmt, codec, window = sb.CASES[case]
    path = sb.build(tmp_path, tiny_bert_dir, corpus_file, fmt, codec, window, "device", 4, DEVICE)
    assert json.loads(sb.FIXTURE.read_text())[case] == sb.digest(path, "m", 2)


def test_rows_on_the_device_match_a_cpu_fp32_extraction_within_bf16(
    tmp_path, tiny_bert_dir, corpus_file
):
    common = dict(name="m", codec="fp32", batch_size=8, chunk_rows=64, inner_rows=16)
    extract(
        str(tmp_path / "cpu.zarr"),
        ExtractConfig(
            tiny_bert_dir, DataConfig(corpus_file), [1, 3], device="cpu", dtype="fp32", **common
        ),
        progress=False,
    )
    extract(
        str(tmp_path / "dev.zarr"),
        ExtractConfig(tiny_bert_dir, DataConfig(corpus_file), [1, 3], device=DEVICE, **common),
        progress=False,
    )
    for layer in (1, 3):
        a = actstore.open_store(str(tmp_path / "cpu.zarr")).activations("m", layer)[:]
        b = actstore.open_store(str(tmp_path / "dev.zarr")).activations("m", layer)[:]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > 0.99 and np.abs(a - b).max() / np.abs(a).max() < 0.05


def test_a_run_killed_on_the_device_resumes_to_the_same_bytes(
    tmp_path, tiny_bert_dir, corpus_file, monkeypatch
):
    cfg = ExtractConfig(
        tiny_bert_dir,
        DataConfig(corpus_file),
        [2],
        name="m",
        codec="int8",
        chunk_rows=32,
        unit_rows=64,
        batch_size=8,
        device=DEVICE,
        codec_on="device",
    )
    ref, killed = str(tmp_path / "ref.zarr"), str(tmp_path / "killed.zarr")
    extract(ref, cfg, progress=False)
    real = worker_mod.compute_unit
    monkeypatch.setattr(worker_mod, "compute_unit", killed_on_call(real, 3))
    with pytest.raises(KeyboardInterrupt):
        extract(killed, cfg, progress=False)
    monkeypatch.setattr(worker_mod, "compute_unit", real)
    extract(killed, cfg, progress=False)
    for name in ("models/m/layer_2", "models/m/layer_2_scale"):
        a, b = (zarr.open_array(p, path=name, mode="r")[:] for p in (ref, killed))
        np.testing.assert_array_equal(a, b)
    assert not list(Path(killed).rglob("*.partial"))
