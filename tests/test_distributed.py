"""Many writers per array (issue 14): units complete in any order by markers and claims, extraction on a real
local Ray (2 workers, local folder and a bucket on moto's S3 server), workers and drivers killed with SIGKILL,
two drivers at once, a format-2 store resumed unchanged."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import actstore
from actstore.data.corpora import DataConfig
from actstore.format import layout
from actstore.storage.location import open_location
from actstore.storage.locks import StoreLock
from actstore.store.config import ExtractConfig
from actstore.store.extract import extract
from actstore.store.units import completed_prefix, completed_ranges, completed_units

LAYERS = [1, 3]


def cfg_for(model_dir: str, corpus: str, codec: str = "fp16", **kw) -> ExtractConfig:
    """Small units (32 rows, one shard each) so a run has many of them; one torch thread like every Ray worker."""
    return ExtractConfig(
        model_dir,
        DataConfig(corpus),
        LAYERS,
        name="m",
        codec=codec,
        chunk_rows=32,
        inner_rows=16,
        unit_rows=32,
        batch_size=4,
        device="cpu",
        threads=1,
        **kw,
    )


def array_objects(store: str) -> dict[str, bytes]:
    """Every chunk or shard object of the model's layer arrays, by key (metadata, with its timestamps, left out)."""
    loc = open_location(store)
    keys = [k for k in loc.walk(layout.model_dir("m")) if "/c/" in k]
    return {k: loc.read_bytes(k) for k in keys}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert_dir, corpus_file) -> dict[str, dict[str, bytes]]:
    """Single-process extractions (fp16 and int8) to compare every distributed run with, object by object."""
    out = {}
    for codec in ("fp16", "int8"):
        path = str(tmp_path_factory.mktemp("ref") / f"{codec}.zarr")
        extract(path, cfg_for(tiny_bert_dir, corpus_file, codec), progress=False)
        out[codec] = array_objects(path)
    return out


def assert_same(store: str, ref: dict[str, bytes]) -> None:
    got = array_objects(store)
    assert sorted(got) == sorted(ref)
    different = [k for k in ref if got[k] != ref[k]]
    assert not different, f"{len(different)} objects differ, e.g. {different[:3]}"
    st_ = actstore.open_store(store)
    for layer in LAYERS:
        acts = st_.activations("m", layer)
        assert acts.attrs.complete and len(acts) == acts.attrs.n_rows


def forget_units(
    path: str, layers: list[int], units: list[int] | None = None, first: int = 0
) -> None:
    """Make a finished extraction unfinished: drop the markers of ``units`` (or of every unit from row ``first``)
    and set the attributes as if none of the commits after them had been written."""
    loc = open_location(path, writable=True)
    for layer in layers:
        array = layout.layer_array("m", layer)
        for u0 in completed_units(loc, array):
            if (u0 in units) if units is not None else u0 >= first:
                loc.delete(layout.unit_marker(array, u0))
        meta_path = Path(path) / array / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta["attributes"]["actstore"].update(committed_rows=0, complete=False)
        meta_path.write_text(json.dumps(meta))


# ---------------------------------------------------------------- units: markers, claims, prefix
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 50), st.integers(1, 9), st.sets(st.integers(0, 60)))
def test_the_prefix_is_the_contiguous_run_of_completed_units(unit_rows, n_units, done_idx):
    n_rows = unit_rows * n_units - (unit_rows // 2)  # a short last unit
    n_units = -(-n_rows // unit_rows)
    done = {i * unit_rows for i in done_idx if i < n_units}
    prefix = completed_prefix(done, unit_rows, n_rows)
    first_missing = next((i for i in range(n_units) if i * unit_rows not in done), n_units)
    assert prefix == min(first_missing * unit_rows, n_rows)
    ranges = completed_ranges(done, unit_rows, n_rows)
    covered = {r for a, b in ranges for r in range(a, b)}
    assert covered == {r for u in done for r in range(u, min(u + unit_rows, n_rows))}
    assert all(
        b < c for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False)
    )  # merged: no touching ranges


def test_new_stores_record_each_unit_by_its_marker(tmp_path, tiny_bert_dir, corpus_file):
    path = str(tmp_path / "s.zarr")
    extract(path, cfg_for(tiny_bert_dir, corpus_file), progress=False)
    root = json.loads((Path(path) / "zarr.json").read_text())["attributes"]["actstore"]
    assert root["format"] == layout.FORMAT_VERSION == 3
    acts = actstore.open_store(path).activations("m", 1)
    assert acts.attrs.progress == "units"
    n_units = -(-acts.attrs.n_rows // 32)
    assert completed_units(open_location(path), layout.layer_array("m", 1)) == {
        i * 32 for i in range(n_units)
    }
    # claims released
    assert not (Path(path) / "locks").exists() or not any((Path(path) / "locks").rglob("*.lock"))


def test_a_reader_sees_the_prefix_and_can_ask_for_every_completed_unit(
    tmp_path, tiny_bert_dir, corpus_file, reference
):
    """Units 0, 1 and 3 finished (unit 2 lost with its worker): readers stream rows 0..64; iter_completed adds unit 3."""
    path = str(tmp_path / "s.zarr")
    extract(path, cfg_for(tiny_bert_dir, corpus_file), progress=False)
    full = actstore.open_store(path).activations("m", 3)[:]
    loc = open_location(path)
    array = layout.layer_array("m", 3)
    forget_units(path, [3], units=[64] + sorted(completed_units(loc, array))[4:])
    acts = actstore.open_store(path).activations("m", 3)
    assert len(acts) == 64  # the contiguous prefix, from the markers
    assert acts.completed_ranges() == [(0, 64), (96, 128)]
    chunks = list(acts.iter_completed(rows=16))
    assert [(c.start, c.stop) for c in chunks] == [
        (0, 16),
        (16, 32),
        (32, 48),
        (48, 64),
        (96, 112),
        (112, 128),
    ]
    np.testing.assert_array_equal(
        np.concatenate([c.values for c in chunks]), np.concatenate([full[:64], full[96:128]])
    )


def test_a_dead_workers_claim_and_partial_chunks_are_taken_over(
    tmp_path, tiny_bert_dir, corpus_file, reference
):
    """A worker process claims unit 64, overwrites part of its chunks with garbage and is SIGKILLed; the next run
    takes the claim over (its pid is gone), recomputes the unit and ends byte-identical to an uninterrupted run."""
    path = str(tmp_path / "s.zarr")
    extract(path, cfg_for(tiny_bert_dir, corpus_file), progress=False)
    forget_units(path, LAYERS, first=64)
    loc = open_location(path, writable=True)
    script = f"""
import sys, time, zarr, numpy as np
from actstore.storage.location import open_location
from actstore.storage.locks import StoreLock
from actstore.format import layout
loc = open_location({path!r}, writable=True)
StoreLock(loc, layout.unit_claim("m", 64), "extract m", lease_s=300).acquire()
arr = zarr.open_array(loc.zarr_store, path=layout.layer_array("m", 1), mode="r+")
arr[64:80] = np.full((16, arr.shape[1]), 7, arr.dtype)  # half a unit written, then killed
print("ready", flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    holder = json.loads(loc.read_bytes(layout.lock_key(layout.unit_claim("m", 64))))
    # the dead worker's leased claim is still there
    assert holder["pid"] == proc.pid and holder["expires"]
    res = extract(path, cfg_for(tiny_bert_dir, corpus_file), progress=False)
    assert res.rows_written == res.n_tokens - 64
    assert_same(path, reference["fp16"])


def test_a_live_claim_is_left_alone_and_a_lapsed_one_taken_over(tmp_path):
    loc = open_location(str(tmp_path / "x"), create=True)
    a = StoreLock(loc, "models/m/unit-000000000000", "worker a", lease_s=2)
    assert a.try_acquire() is None
    b = StoreLock(loc, "models/m/unit-000000000000", "worker b", lease_s=2)
    # same host, a live pid (this one) and an unexpired lease: b must not take it
    assert b.try_acquire() is not None
    time.sleep(2.5)  # a stopped renewing (a worker on another host that died): the lease lapses
    assert b.try_acquire() is None
    assert a.renew() is False and not a.held  # a learns it lost the claim


# ---------------------------------------------------------------- two drivers, a killed driver (plain processes)
def _cli_extract(store: str, model_dir: str, corpus: str, *extra: str) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "actstore.cli",
        "extract",
        store,
        "--model",
        model_dir,
        "--data",
        corpus,
        "--layers",
        "1,3",
        "--name",
        "m",
        "--codec",
        "fp16",
        "--chunk-rows",
        "32",
        "--inner-rows",
        "16",
        "--unit-rows",
        "32",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--quiet",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def test_two_drivers_at_once_share_the_work(tmp_path, tiny_bert_dir, corpus_file, reference):
    """Two `actstore extract` of one new store started together: one makes the token index and arrays while the
    other waits, then both take units; neither fails, and the arrays equal a single process's."""
    path = str(tmp_path / "s.zarr")
    procs = [_cli_extract(path, tiny_bert_dir, corpus_file) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    wrote = [int(o.split("wrote ")[1].split(" rows")[0]) for o, _ in outs]
    n_rows = actstore.open_store(path).activations("m", 1).attrs.n_rows
    # between them every unit was computed (a unit is never refused, only shared)
    assert sum(wrote) >= n_rows
    assert_same(path, reference["fp16"])


# ---------------------------------------------------------------- on a real local Ray
def _ray_extract(path: str, cfg: ExtractConfig, **kw) -> object:
    pytest.importorskip("ray")
    return extract(path, cfg, progress=False, ray_address="local", **kw)


def test_ray_extraction_with_2_workers_equals_one_process(
    tmp_path, tiny_bert_dir, corpus_file, reference
):
    path = str(tmp_path / "s.zarr")
    res = _ray_extract(path, cfg_for(tiny_bert_dir, corpus_file, "int8", ray_workers=2))
    assert res.rows_written == res.n_tokens
    # int8: every worker derives the same channel scale from unit 0
    assert_same(path, reference["int8"])


def test_ray_extraction_into_a_bucket_equals_one_process(
    s3_server, tiny_bert_dir, corpus_file, reference
):
    import uuid

    url = f"s3://team/{uuid.uuid4().hex[:8]}/ray.zarr"
    _ray_extract(url, cfg_for(tiny_bert_dir, corpus_file, ray_workers=2))
    assert_same(url, reference["fp16"])


def _actor_pids(actor: str = "ExtractActor") -> list[int]:
    """Pids of this process's Ray actors of class ``actor`` (Ray names their processes ``ray::Class...``)."""
    import psutil

    me = psutil.Process()
    return [p.pid for p in me.children(recursive=True) if actor in " ".join(_cmdline(p))]


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:
        return []


def test_a_ray_worker_killed_mid_run_changes_nothing(
    tmp_path, tiny_bert_dir, corpus_file, reference
):
    """SIGKILL one of two actors once the first units are done: a new actor takes its place, its unit is computed
    again (its claim's pid is gone), and the arrays equal a single process's."""
    path = str(tmp_path / "s.zarr")
    killed: list[int] = []

    def kill_one() -> None:
        marker_dir = Path(path) / layout.units_dir(layout.layer_array("m", 1))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pids = _actor_pids()
            if len(pids) == 2 and marker_dir.exists() and len(list(marker_dir.iterdir())) >= 2:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    res = _ray_extract(path, cfg_for(tiny_bert_dir, corpus_file, ray_workers=2))
    killer.join()
    assert killed, "no actor was killed: the run ended before two units were done"
    assert res.rows_written >= res.n_tokens
    assert_same(path, reference["fp16"])


def test_a_ray_driver_killed_and_started_again_resumes(
    tmp_path, tiny_bert_dir, corpus_file, reference
):
    """`actstore extract --ray` SIGKILLed with its local Ray (the whole session) mid-run; the same command again
    computes only the units without markers and ends byte-identical."""
    pytest.importorskip("ray")
    path = str(tmp_path / "s.zarr")
    proc = _cli_extract(path, tiny_bert_dir, corpus_file, "--ray", "--ray-workers", "2")
    marker_dir = Path(path) / layout.units_dir(layout.layer_array("m", 3))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if marker_dir.exists() and len(list(marker_dir.iterdir())) >= 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
    proc.wait()
    n_done = len(completed_units(open_location(path), layout.layer_array("m", 3)))
    acts = actstore.open_store(path).activations("m", 3)
    assert n_done >= 3 and not acts.attrs.complete, "the driver finished before it could be killed"
    again = _cli_extract(path, tiny_bert_dir, corpus_file, "--ray", "--ray-workers", "2")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    wrote = int(out.split("wrote ")[1].split(" rows")[0])
    assert wrote < acts.attrs.n_rows  # resumed: the completed units were not computed again
    assert_same(path, reference["fp16"])


def test_a_format_2_store_resumes_by_its_prefix_and_refuses_ray(
    tmp_path, tiny_bert_dir, corpus_file, reference
):
    """A store made before unit markers (root format 2): new layers keep one writer and committed_rows, no markers;
    --ray says why it cannot fan out there."""
    path = str(tmp_path / "old.zarr")
    extract(
        path, dataclasses.replace(cfg_for(tiny_bert_dir, corpus_file), layers=[1]), progress=False
    )
    meta_path = Path(path) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["actstore"]["format"] = 2
    meta_path.write_text(json.dumps(meta))
    import shutil

    shutil.rmtree(Path(path) / "units")
    # layer 3 is new, layer 1 is done
    res = extract(path, cfg_for(tiny_bert_dir, corpus_file), progress=False)
    assert res.rows_written == res.n_tokens
    acts = actstore.open_store(path).activations("m", 3)
    assert (
        acts.attrs.progress is None
        and not (Path(path) / layout.units_dir(layout.layer_array("m", 3))).exists()
    )
    assert_same(path, reference["fp16"])
    with pytest.raises(actstore.ActstoreError, match="format 2.*--ray needs a store of format 3"):
        extract(path, cfg_for(tiny_bert_dir, corpus_file), progress=False, ray_address="local")


# ---------------------------------------------------------------- encode through Ray
def _encoded_files(store: str, sae: str) -> dict[str, bytes]:
    """The published encoding's files (bucket files and stats.parquet) by name."""
    from actstore.encoding.table import files_dir, read_encoding

    st_ = actstore.open_store(store)
    man = read_encoding(st_, sae)
    work = files_dir(sae, man)
    return {k[len(work) + 1 :]: st_.loc.read_bytes(k) for k in st_.loc.walk(work)}


@pytest.fixture()
def two_sae_stores(tmp_path, tiny_store_ro) -> tuple[str, str]:
    import shutil

    from helpers import make_sae

    a = tmp_path / "a.zarr"
    shutil.copytree(tiny_store_ro, a)
    make_sae(actstore.open_store(str(a), writable=True), "s", "topk", k=5)
    b = tmp_path / "b.zarr"
    shutil.copytree(a, b)
    return str(a), str(b)


def test_ray_encode_with_2_workers_equals_one_process(two_sae_stores):
    """Segments (several spills each) on 2 actors, one of them SIGKILLed once its first segment is marked; the
    bucket files and stats equal a single process's byte for byte."""
    pytest.importorskip("ray")
    from actstore.encoding.config import EncodeConfig
    from actstore.encoding.encode import encode

    a, b = two_sae_stores
    here = encode(
        actstore.open_store(a, writable=True),
        EncodeConfig(sae="s", batch_rows=64, n_buckets=3),
        progress=False,
    )
    killed: list[int] = []

    def kill_one() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pids = _actor_pids("EncodeActor")
            done = list(Path(b).glob("features/s/gen-*/spill/done/*.done"))
            if len(pids) == 2 and done:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    cfg = EncodeConfig(
        sae="s", batch_rows=64, n_buckets=3, spill_entries=300, ray_workers=2, threads=1
    )
    there = encode(actstore.open_store(b, writable=True), cfg, progress=False, ray_address="local")
    killer.join()
    assert killed, "no actor was killed: the encoding ended before its first segment was marked"
    assert there.n_feature_rows == here.n_feature_rows and there.n_rows == here.n_rows
    got, want = _encoded_files(b, "s"), _encoded_files(a, "s")
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)
    assert not list(Path(b).glob("features/s/gen-*/spill"))  # spill files and segment markers gone
