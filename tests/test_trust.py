"""The store's promises outside the happy path (issue 9): one writer at a time, nothing lost, no link followed,
read-only unless asked, corruption caught on read, edited attributes refused, markup escaped, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.encoding.config import EncodeConfig
from actstore.encoding.encode import encode
from actstore.encoding.table import files_dir, read_encoding
from actstore.errors import ConcurrencyError, ConfigError, IntegrityError, StoreError
from actstore.format import layout
from actstore.sae.config import SAEConfig
from actstore.sae.files import save_sae
from actstore.sae.model import SAE
from actstore.storage.integrity import update_manifest
from actstore.storage.location import open_location
from actstore.storage.locks import StoreLock
from actstore.storage.verify import verify
from actstore.store.units import completed_units
from tests.helpers import one_line_error, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized")


def make_sae(
    st, name: str = "s", layer: int = 2, d_sae: int = 40, k: int = 4, seed: int = 0
) -> SAE:
    tk = st.model_info("tiny").tokenization
    torch.manual_seed(seed)
    sae = SAE(
        SAEConfig(
            arch="topk",
            d_in=32,
            d_sae=d_sae,
            k=k,
            model="tiny",
            layer=layer,
            tokenization=tk,
            name=name,
        )
    )
    save_sae(st, sae, name)
    update_manifest(st.loc, prefixes=[f"saes/{name}"])
    return sae


@pytest.fixture(scope="module")
def encoded_ro(tmp_path_factory, tiny_store_ro) -> str:
    """The tiny store with SAE ``s`` (topk, layer 2) trained-by-hand and encoded; the manifest lists everything."""
    path = tmp_path_factory.mktemp("trust") / "s.zarr"
    shutil.copytree(tiny_store_ro, path)
    st = actstore.open_store(str(path), writable=True)
    make_sae(st)
    encode(st, EncodeConfig(sae="s", batch_rows=128, n_buckets=4), progress=False)
    return str(path)


@pytest.fixture()
def encoded(tmp_path, encoded_ro) -> str:
    dst = tmp_path / "s.zarr"
    shutil.copytree(encoded_ro, dst)
    return str(dst)


def feature_count(path: str) -> int:
    return int(
        actstore.sql(actstore.open_store(path), "SELECT count(*) AS n FROM features")["n"][0]
    )


def edit_attrs(path: str, array: str, **changes) -> None:
    meta_path = Path(path) / array / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["actstore"].update(changes)
    meta_path.write_text(json.dumps(meta))


def drop_markers(path: str, array: str, first: int) -> None:
    """Forget the completion of every unit of ``array`` from row ``first`` (format 3: the markers are the truth)."""
    loc = open_location(path, writable=True)
    for u0 in completed_units(loc, array):
        if u0 >= first:
            loc.delete(layout.unit_marker(array, u0))


# ---------------------------------------------------------------- 1. one writer per artifact
def test_second_encode_of_one_sae_is_refused(encoded):
    st = actstore.open_store(encoded, writable=True)
    holder = StoreLock(st.loc, "features/s", "encode s (another process)").acquire()
    try:
        with pytest.raises(
            ConcurrencyError, match=r"features/s .*being written.*encode s \(another process\)"
        ):
            encode(st, EncodeConfig(sae="s", overwrite=True), progress=False)
    finally:
        holder.release()
    assert read_encoding(st, "s").complete


def test_concurrent_encodes_never_interleave(tiny_store):
    st = actstore.open_store(tiny_store, writable=True)
    make_sae(st)
    ref_path = tiny_store + "-ref"
    shutil.copytree(tiny_store, ref_path)
    encode(
        actstore.open_store(ref_path, writable=True),
        EncodeConfig(sae="s", n_buckets=4),
        progress=False,
    )
    want = feature_count(ref_path)
    cmd = [
        sys.executable,
        "-m",
        "actstore.cli",
        "encode",
        tiny_store,
        "--sae",
        "s",
        "--quiet",
        "--spill-entries",
        "200",
        "--batch-rows",
        "64",
        "--buckets",
        "4",
        "--workers",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(2)
    ]
    outs = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    for rc, out in outs:
        assert rc == 0 or "being written by another writer" in out, out
        assert "Traceback" not in out, out
    assert any(rc == 0 for rc, _ in outs)
    if all(rc != 0 for rc, _ in outs):
        pytest.fail("both refused")
    # whoever won, the table is whole: the same rows as one run alone
    assert feature_count(tiny_store) == want
    assert verify(open_location(tiny_store)).ok


def test_train_refuses_a_second_trainer_of_one_name(tiny_store):
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae

    loc = open_location(tiny_store, writable=True)
    holder = StoreLock(loc, "saes/busy", "train busy (another process)").acquire()
    try:
        with pytest.raises(ConcurrencyError, match="saes/busy"):
            train_sae(
                tiny_store,
                TrainConfig(model="tiny", layer=1, tokens=64, d_sae=8, name="busy"),
                progress=False,
            )
    finally:
        holder.release()


# ---------------------------------------------------------------- 2. SQL sandbox (local; S3 in test_remote.py)
FORBIDDEN = [
    "SELECT * FROM read_text('{secret}')",
    "SELECT * FROM read_csv('{secret}')",
    "COPY (SELECT 1) TO '{out}'",
    "RESET allowed_paths",
    "SET allowed_paths = ['/']",
    "SET enable_external_access = true",
    "INSTALL httpfs",
    "LOAD httpfs",
    "ATTACH '{out}.db' AS x",
    "CREATE TABLE t AS SELECT 1",
    "SELECT * FROM glob('/etc/*')",
]


@pytest.mark.parametrize("writable", [False, True])
def test_sql_sandbox_local(encoded, tmp_path, writable):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    out = tmp_path / "leak.csv"
    st = actstore.open_store(encoded, writable=writable)
    for stmt in FORBIDDEN:
        q = stmt.format(secret=secret, out=out)
        with pytest.raises(Exception) as info:  # noqa: PT011 - any DuckDB error will do; the point is that it fails
            actstore.sql(st, q)
        assert "TOP-SECRET" not in str(info.value)
        r = CliRunner().invoke(main, ["sql", encoded, q])
        assert r.exit_code != 0 and "TOP-SECRET" not in r.output, (q, r.output)
    assert not out.exists() and not Path(f"{out}.db").exists()
    assert feature_count(encoded) > 0  # the store's own views still answer


# ---------------------------------------------------------------- 3. links inside a store
def test_symlinked_file_is_not_copied(encoded, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("PRIVATE KEY")
    tk = next(p for p in (Path(encoded) / "tokenizations").iterdir() if p.is_dir())
    (tk / "x").symlink_to(victim)
    r = CliRunner().invoke(main, ["copy", encoded, str(tmp_path / "dst.zarr"), "--quiet"])
    one_line_error(r, "symbolic link", "x")
    copied = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p != victim]
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in copied)
    one_line_error(CliRunner().invoke(main, ["verify", encoded]), "symbolic link")


def test_symlinked_features_folder_is_not_deleted_through(encoded, tmp_path):
    other = tmp_path / "precious"
    shutil.copytree(Path(encoded) / "features", other)
    kept = snapshot(other)
    shutil.rmtree(Path(encoded) / "features")
    (Path(encoded) / "features").symlink_to(other, target_is_directory=True)
    r = CliRunner().invoke(main, ["encode", encoded, "--sae", "s", "--overwrite", "--quiet"])
    one_line_error(r, "symbolic link", "features")
    assert snapshot(other) == kept


def test_symlinked_directory_one_line_everywhere(encoded, tmp_path):
    outside = tmp_path / "outside"
    shutil.move(str(Path(encoded) / "models" / "tiny" / "layer_3"), outside)
    (Path(encoded) / "models" / "tiny" / "layer_3").symlink_to(outside, target_is_directory=True)
    for args in (
        ["verify", encoded],
        ["copy", encoded, str(tmp_path / "d.zarr"), "--quiet"],
        ["info", encoded],
    ):
        one_line_error(CliRunner().invoke(main, args), "symbolic link")
    with pytest.raises(StoreError, match="symbolic link"):
        actstore.open_store(encoded).activations("tiny", 3)[:]
    assert (outside / "zarr.json").exists()


# ---------------------------------------------------------------- 4. writes only where asked
def test_read_only_location_refuses_every_write(encoded):
    before = snapshot(encoded)
    st = actstore.open_store(encoded)
    for attempt in (
        lambda: st.loc.write_bytes("x", b"1"),
        lambda: st.loc.delete("manifest.json"),
        lambda: st.loc.rmtree("features"),
        lambda: st.loc.fs.rm(st.loc.fs_path("features"), recursive=True),
        lambda: encode(st, EncodeConfig(sae="s", overwrite=True), progress=False),
        lambda: update_manifest(st.loc),
    ):
        with pytest.raises((StoreError, PermissionError)):
            attempt()
    assert snapshot(encoded) == before


def test_encode_overwrite_keeps_the_good_encoding_until_the_new_one_is_ready(encoded, monkeypatch):
    from actstore.encoding import encode as enc

    st = actstore.open_store(encoded, writable=True)
    want = actstore.features(st, "s").collect().sort(["row", "feature"])

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(enc, "finish_bucket", boom)
    with pytest.raises(OSError):
        encode(st, EncodeConfig(sae="s", overwrite=True), progress=False)
    monkeypatch.undo()
    assert actstore.features(st, "s").collect().sort(["row", "feature"]).equals(want)
    # a layer whose attributes are damaged: refused before anything is deleted
    edit_attrs(encoded, "models/tiny/layer_2", committed_rows=-5)
    with pytest.raises(IntegrityError, match="committed_rows"):
        encode(
            actstore.open_store(encoded, writable=True),
            EncodeConfig(sae="s", overwrite=True),
            progress=False,
        )
    edit_attrs(encoded, "models/tiny/layer_2", committed_rows=read_encoding(st, "s").n_rows)
    assert actstore.features(st, "s").collect().sort(["row", "feature"]).equals(want)
    # and a completed overwrite replaces it and leaves one generation
    res = encode(st, EncodeConfig(sae="s", overwrite=True, n_buckets=2), progress=False)
    assert res.n_feature_rows == want.height and st.loc.list_dirs("features/s") == [
        read_encoding(st, "s").dir
    ]


# ---------------------------------------------------------------- 5. corruption caught on read
def test_deleted_chunk_raises_everywhere(encoded, tmp_path):
    (Path(encoded) / "models/tiny/layer_2/c/1/0").unlink()
    st = actstore.open_store(encoded, writable=True)
    with pytest.raises(
        IntegrityError, match=r"shard \(1, 0\) of array models/tiny/layer_2 .*rows 64-127.*missing"
    ):
        st.activations("tiny", 2)[:]
    with pytest.raises(IntegrityError, match=r"layer_2.*missing"):
        st.activations("tiny", 2).take(np.array([70]))
    with pytest.raises(IntegrityError, match=r"models/tiny/layer_2"):
        encode(st, EncodeConfig(sae="s", overwrite=True), progress=False)
    r = CliRunner().invoke(
        main,
        [
            "train",
            encoded,
            "--model",
            "tiny",
            "--layer",
            "2",
            "--tokens",
            "256",
            "--d-sae",
            "8",
            "--name",
            "t",
            "--quiet",
        ],
    )
    one_line_error(r, "models/tiny/layer_2", "missing")
    r = CliRunner().invoke(main, ["copy", encoded, str(tmp_path / "d.zarr"), "--quiet"])
    assert r.exit_code != 0 and "models/tiny/layer_2/c/1/0" in r.output and "absent" in r.output
    assert not (tmp_path / "d.zarr").exists()


def test_zeroed_parquet_bytes_raise_in_sql_and_top_tokens(encoded):
    st = actstore.open_store(encoded)
    good = float(actstore.sql(st, "SELECT sum(value) AS s FROM features")["s"][0])
    man = read_encoding(st, "s")
    bucket = Path(encoded) / files_dir("s", man) / "acts" / man.files[0]["file"]
    data = bytearray(bucket.read_bytes())
    data[200:264] = bytes(64)
    bucket.write_bytes(bytes(data))
    st = actstore.open_store(encoded)
    with pytest.raises(IntegrityError, match=r"acts/bucket-00000.parquet.*corrupted"):
        actstore.sql(st, "SELECT sum(value) AS s FROM features")
    r = CliRunner().invoke(main, ["sql", encoded, "SELECT sum(value) AS s FROM features"])
    one_line_error(r, "bucket-00000.parquet", "corrupted")
    r = CliRunner().invoke(main, ["top-tokens", encoded, "--sae", "s", "--feature", "0"])
    one_line_error(r, "bucket-00000.parquet")
    with pytest.raises(IntegrityError):
        actstore.features(st, "s").collect()
    assert good != 0


def test_overwritten_safetensors_refused_by_encode(encoded):
    w = Path(encoded) / "saes/s/sae.safetensors"
    data = bytearray(w.read_bytes())
    data[-64:] = b"\x7f" * 64  # values only: the file still parses
    w.write_bytes(bytes(data))
    st = actstore.open_store(encoded, writable=True)
    with pytest.raises(IntegrityError, match=r"saes/s/sae.safetensors.*corrupted"):
        encode(st, EncodeConfig(sae="s", overwrite=True), progress=False)
    assert read_encoding(st, "s").complete


def test_truncated_files_are_one_line(encoded):
    # truncated safetensors no manifest vouches for: still a named error, not a traceback
    w = Path(encoded) / "saes/s/sae.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    (Path(encoded) / "manifest.json").unlink()
    one_line_error(
        CliRunner().invoke(main, ["encode", encoded, "--sae", "s", "--overwrite", "--quiet"]),
        "sae.safetensors",
    )
    samples = next((Path(encoded) / "tokenizations").glob("*/samples/part-00000.parquet"))
    samples.write_bytes(samples.read_bytes()[: samples.stat().st_size // 2])
    one_line_error(
        CliRunner().invoke(main, ["top-tokens", encoded, "--sae", "s", "--feature", "1"]), "samples"
    )


# ---------------------------------------------------------------- 6. attributes checked on open
@pytest.mark.parametrize("value", [99_999_999, -1, "12", None, 3.5])
def test_edited_committed_rows_refused(encoded, value):
    before = snapshot(encoded)
    edit_attrs(encoded, "models/tiny/layer_2", committed_rows=value)
    after_edit = snapshot(encoded)
    with pytest.raises(IntegrityError, match=r"models/tiny/layer_2.*committed_rows"):
        actstore.open_store(encoded).activations("tiny", 2)
    r = CliRunner().invoke(main, ["encode", encoded, "--sae", "s", "--overwrite", "--quiet"])
    one_line_error(r, "committed_rows")
    assert snapshot(encoded) == after_edit and len(before) == len(after_edit)  # nothing deleted


def test_edited_encoding_manifest_refused(encoded):
    st = actstore.open_store(encoded)
    key = "features/s/encoding.json"
    man = json.loads(st.loc.read_bytes(key))
    man["n_rows"] = 99_999_999
    (Path(encoded) / key).write_text(json.dumps(man))
    with pytest.raises(IntegrityError, match="encoding.json"):
        actstore.feature_stats(actstore.open_store(encoded), "s").collect()


# ---------------------------------------------------------------- 7. markup from a store
def test_hostile_names_are_escaped_in_the_report(tiny_store, tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    root = Path(tiny_store)
    (root / "models" / "tiny").rename(root / "models" / evil)
    tk = next(p for p in (root / "tokenizations").iterdir() if p.is_dir())
    meta = json.loads((tk / "zarr.json").read_text())
    meta["attributes"]["actstore"]["data"]["source"] = "<script>alert(2)</script>"
    meta["attributes"]["actstore"]["tokenizer_source"] = "<b>40</b>"
    (tk / "zarr.json").write_text(json.dumps(meta))
    # a store that names a path holding a report.json: it must not be read
    trap = tmp_path / "trap"
    trap.mkdir()
    (trap / "report.json").write_text(
        json.dumps({"labels": ["<i>x</i>"], "pretrained": {"accuracy": 1}, "finetuned": {}})
    )
    gmeta = json.loads((root / "models" / evil / "zarr.json").read_text())
    gmeta["attributes"]["actstore"]["path"] = str(trap)
    (root / "models" / evil / "zarr.json").write_text(json.dumps(gmeta))
    r = CliRunner().invoke(main, ["report", tiny_store, "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "index.html").read_text()
    for bad in ("<img src=x", "<script>alert", "<b>40", "<i>x"):
        assert bad not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_a_count_that_is_markup_is_refused_as_damaged(tiny_store, tmp_path):
    """A number that is not a number (here markup) is one IntegrityError naming the token index, before any page."""
    tk = next(p for p in (Path(tiny_store) / "tokenizations").iterdir() if p.is_dir())
    meta = json.loads((tk / "zarr.json").read_text())
    meta["attributes"]["actstore"]["n_samples"] = "<b>40</b>"
    (tk / "zarr.json").write_text(json.dumps(meta))
    r = CliRunner().invoke(main, ["report", tiny_store, "--out", str(tmp_path / "rep")])
    assert r.exit_code == 1 and "attribute n_samples is '<b>40</b>', not an integer" in r.output
    assert not (tmp_path / "rep" / "index.html").exists()


# ---------------------------------------------------------------- 8. one line, not a traceback
def test_bad_inputs_are_one_line(encoded, tmp_path):
    not_a_model = tmp_path / "nm"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text('{"a": 1}')
    base = ["extract", str(tmp_path / "x.zarr"), "--data", "bundled:bbc", "--limit", "2"]
    one_line_error(
        CliRunner().invoke(main, [*base, "--model", str(not_a_model), "--layers", "1"]),
        "cannot load model",
    )
    one_line_error(
        CliRunner().invoke(main, [*base, "--model", str(tmp_path), "--layers", "1"]), "config.json"
    )
    one_line_error(
        CliRunner().invoke(main, [*base, "--model", "bundled:minilm", "--layers", "5-3"]),
        "backwards",
        "3-5",
    )
    r = CliRunner().invoke(
        main,
        ["train", encoded, "--model", "tiny", "--layer", "1", "--name", "a/b", "--tokens", "64"],
    )
    one_line_error(r, "'a/b'", "not a valid name")
    assert not (Path(encoded) / "saes" / "a").exists()
    v2 = tmp_path / "v2.zarr"
    v2.mkdir()
    (v2 / ".zgroup").write_text('{"zarr_format": 2}')
    one_line_error(CliRunner().invoke(main, ["info", str(v2)]), "Zarr v2")


def test_partial_files_after_a_kill_are_ignored(encoded, tmp_path):
    (Path(encoded) / "models/tiny/zarr.json.partial").write_text("{")
    (Path(encoded) / "models/tiny/layer_1/c/0/0.partial").write_bytes(b"xx")
    rep = verify(open_location(encoded))
    assert rep.ok and not [p for p in rep.problems if ".partial" in p.key]
    r = CliRunner().invoke(main, ["copy", encoded, str(tmp_path / "d.zarr"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert not list((tmp_path / "d.zarr").rglob("*.partial"))


def test_training_on_a_partial_layer_warns(tiny_store):
    from actstore.sae.config import TrainConfig
    from actstore.sae.rows import PartialLayerWarning
    from actstore.sae.train import train_sae

    edit_attrs(tiny_store, "models/tiny/layer_1", committed_rows=128, complete=False)
    drop_markers(tiny_store, "models/tiny/layer_1", first=0)  # the attributes say how far it got
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        train_sae(
            tiny_store,
            TrainConfig(model="tiny", layer=1, tokens=128, d_sae=8, name="p"),
            progress=False,
        )
    assert any(
        issubclass(w.category, PartialLayerWarning) and "128 of" in str(w.message) for w in got
    )


def test_disk_full_is_one_line(tiny_bert_dir, corpus_file, tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        r = CliRunner().invoke(
            main,
            [
                "extract",
                str(mnt / "s.zarr"),
                "--model",
                tiny_bert_dir,
                "--data",
                corpus_file,
                "--layers",
                "all",
                "--codec",
                "fp32",
                "--chunk-rows",
                "64",
                "--quiet",
            ],
        )
        one_line_error(r, "disk full")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_finished_finetune_is_not_redone(tiny_bert_dir, tmp_path):
    from conftest import make_texts

    from actstore.data.corpora import DataConfig
    from actstore.models.config import FinetuneConfig
    from actstore.models.finetune import finetune

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in make_texts(30)) + "\n")
    cfg = FinetuneConfig(
        model=tiny_bert_dir,
        data=DataConfig(str(data)),
        out=str(tmp_path / "ft"),
        epochs=1,
        batch_size=8,
        max_length=32,
        device="cpu",
    )
    first = finetune(cfg, progress=False)
    stamp = (tmp_path / "ft" / "model.safetensors").stat().st_mtime_ns
    again = finetune(cfg, progress=False)
    assert again.skipped and not first.skipped
    assert again.finetuned.accuracy == first.finetuned.accuracy
    assert (tmp_path / "ft" / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError):
        FinetuneConfig(
            model=tiny_bert_dir, data=DataConfig(str(data)), out=str(tmp_path / "ft"), epochs=0
        )


def test_output_folders_have_one_writer(tiny_store_ro, tiny_bert_dir, tmp_path):
    from actstore.analysis.config import ReportConfig
    from actstore.data.corpora import DataConfig
    from actstore.models.config import FinetuneConfig
    from actstore.models.finetune import finetune
    from actstore.paper.report import build_report
    from actstore.storage.locks import output_lock

    out = tmp_path / "busy"
    with output_lock(out, "another finetune"):
        cfg = FinetuneConfig(
            model=tiny_bert_dir,
            data=DataConfig("bundled:bbc"),
            out=str(out),
            epochs=1,
            device="cpu",
        )
        with pytest.raises(ConcurrencyError, match="another finetune"):
            finetune(cfg, progress=False)
        with pytest.raises(ConcurrencyError, match="another finetune"):
            build_report(actstore.open_store(tiny_store_ro), ReportConfig(out=str(out)))
    assert not (out / "locks").exists()  # released, and nothing left behind
    build_report(actstore.open_store(tiny_store_ro), ReportConfig(out=str(out)))
    assert (out / "index.html").exists() and not (out / "locks").exists()
