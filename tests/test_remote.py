"""Sharing stores over a real S3 API (moto's server on 127.0.0.1): URLs, copy, verify, safety, locks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import actstore
from actstore import open_store
from actstore.cli import main
from actstore.errors import ConcurrencyError, IntegrityError, StoreError
from actstore.storage.config import CopyConfig
from actstore.storage.copy import copy_store
from actstore.storage.guards import check_key
from actstore.storage.integrity import update_manifest
from actstore.storage.location import open_location
from actstore.storage.locks import StoreLock, lock_key
from actstore.storage.verify import verify

pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore:Object at .* is not recognized"),
]


# ---------------------------------------------------------------- fixtures
@pytest.fixture()
def s3():
    """A fresh s3fs filesystem (no cached listings)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem()


def new_url() -> str:
    return f"s3://team/{uuid.uuid4().hex[:8]}/store"


@pytest.fixture(scope="module")
def pushed(s3_server, tiny_store_ro, tmp_path_factory):
    """The tiny store copied into the bucket with ``actstore copy`` (module-wide; do not write to it)."""
    url = "s3://team/shared/tiny"
    local = tmp_path_factory.mktemp("pushsrc") / "tiny.zarr"
    shutil.copytree(tiny_store_ro, local)
    update_manifest(open_location(str(local), writable=True))
    res = copy_store(CopyConfig(str(local), url))
    assert res.ok and res.n_copied == res.n_objects
    return url


def extract_cfg(model_dir: str, corpus: str, layers: str, name: str = "tiny"):
    from actstore.data.corpora import DataConfig
    from actstore.store.config import ExtractConfig

    return ExtractConfig(
        model=model_dir,
        data=DataConfig(corpus),
        layers=layers,
        name=name,
        codec="fp32",
        chunk_rows=64,
        batch_size=8,
        device="cpu",
    )


# ---------------------------------------------------------------- keys and locations
@pytest.mark.parametrize(
    "key",
    [
        "../x",
        "a/../../x",
        "/etc/passwd",
        "a//b",
        "a\\..\\b",
        "C:evil",
        "./a",
        "a/.",
        "s3://x/y",
        "~/x",
    ],
)
def test_unsafe_keys_refused(key):
    with pytest.raises(StoreError, match="unsafe store key"):
        check_key(key)


def test_safe_keys_pass():
    for key in ("zarr.json", "models/m/layer_3/c/0/0", "saes/a.b-c/cfg.json", "x..y/z"):
        assert check_key(key) == key


def test_file_url_is_local(tiny_store_ro):
    st = open_store("file://" + tiny_store_ro)
    assert st.loc.local and st.models == ["tiny"]


# ---------------------------------------------------------------- extract to a bucket, read by URL
def test_extract_to_bucket_matches_local(s3_server, tiny_bert_dir, corpus_file, tiny_store_ro):
    from actstore.store.extract import extract

    url = new_url()
    res = extract(url, extract_cfg(tiny_bert_dir, corpus_file, "1,3"), progress=False)
    assert res.rows_written == res.n_tokens > 0
    remote, local = open_store(url), open_store(tiny_store_ro)
    assert not remote.loc.local and remote.loc.read_only
    assert remote.models == ["tiny"] and remote.layers("tiny") == [1, 3]
    for layer in (1, 3):
        np.testing.assert_array_equal(
            remote.activations("tiny", layer)[:], local.activations("tiny", layer)[:]
        )
    # streaming read over the bucket, chunk by chunk
    chunks = list(remote.iter_chunks("tiny", 3, rows=100))
    assert sum(c.stop - c.start for c in chunks) == res.n_tokens
    assert remote.tokens().equals(local.tokens()) and remote.samples().equals(local.samples())
    # the manifest was written by the extraction and vouches for every non-chunk file
    rep = verify(remote.loc)
    assert rep.ok and rep.manifest and not rep.problems, rep.problems
    assert rep.n_chunks > 0 and rep.n_files > 0


def test_sql_over_bucket_is_read_only(pushed, s3, tiny_store_ro):
    st = open_store(pushed)
    df = actstore.sql(st, "SELECT label, count(*) AS n FROM samples GROUP BY label ORDER BY label")
    want = open_store(tiny_store_ro).samples().group_by("label").len().sort("label")
    assert df["n"].to_list() == want["len"].to_list()
    con = actstore.connect(st)
    with pytest.raises(Exception):  # noqa: B017 - DuckDB raises its own error types
        con.execute(f"COPY (SELECT 1 AS x) TO '{pushed}/evil.parquet'")
    con.close()
    assert not s3.exists(pushed.removeprefix("s3://") + "/evil.parquet")


def test_url_is_read_only_unless_writable(pushed):
    from actstore.sae.config import SAEConfig
    from actstore.sae.files import save_sae
    from actstore.sae.model import SAE

    st = open_store(pushed)
    sae = SAE(SAEConfig(arch="relu-l1", d_in=32, d_sae=8))
    with pytest.raises(StoreError, match="read-only.*--writable"):
        save_sae(st, sae, "nope")
    with pytest.raises(StoreError, match="read-only"):
        StoreLock(st.loc, "x").acquire()


def test_cli_info_and_sql_by_url(pushed):
    r = CliRunner().invoke(main, ["info", pushed])
    assert r.exit_code == 0, r.output
    assert "model tiny" in r.output and "provenance" in r.output and "weights sha256" in r.output
    r = CliRunner().invoke(main, ["info", pushed, "--json"])
    prov = json.loads(r.output)["provenance"]
    tk = next(iter(prov["tokenizations"].values()))
    assert (
        len(tk["data_sha256"]) == 64 and len(tk["tokenizer_sha256"]) == 64 and tk["n_samples"] == 40
    )
    layer = prov["models"]["tiny"]["layers"]["2"]
    assert (
        layer["codec"] == "fp32"
        and layer["config"]["chunk_rows"] == 64
        and layer["actstore_version"]
    )
    assert prov["store"]["manifest"]["files"] > 0
    r = CliRunner().invoke(
        main, ["sql", pushed, "SELECT count(*) AS n FROM tokens", "--format", "csv"]
    )
    assert r.exit_code == 0 and r.output.splitlines()[1] == str(
        open_store(pushed).tokenization().n_tokens
    )


# ---------------------------------------------------------------- copy and verify
def test_copy_down_and_verify(pushed, tmp_path, tiny_store_ro):
    dst = tmp_path / "down.zarr"
    r = CliRunner().invoke(main, ["copy", pushed, str(dst), "--jobs", "4"])
    assert r.exit_code == 0, r.output
    a, b = open_store(str(dst)), open_store(tiny_store_ro)
    for layer in b.layers("tiny"):
        np.testing.assert_array_equal(
            a.activations("tiny", layer)[:], b.activations("tiny", layer)[:]
        )
    r = CliRunner().invoke(main, ["verify", str(dst)])
    assert r.exit_code == 0 and "ok" in r.output, r.output
    # resume: a second run copies nothing, and a deleted chunk is fetched again
    (dst / "models/tiny/layer_2/c/0/0").unlink()
    res = copy_store(CopyConfig(pushed, str(dst)))
    assert res.ok and res.n_copied == 1 and res.n_skipped == res.n_objects - 1


def test_copy_include_only_some_layers(pushed, tmp_path):
    dst = tmp_path / "part.zarr"
    res = copy_store(CopyConfig(pushed, str(dst), include=["tiny:2"]))
    assert res.ok
    st = open_store(str(dst))
    assert st.layers("tiny") == [2] and st.tokens().height > 0
    assert verify(st.loc).ok


def test_copy_refuses_another_store(pushed, tmp_path, tiny_store):
    meta_path = Path(tiny_store) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["actstore"]["created"] = (
        "2020-01-01T00:00:00+00:00"  # another store at the destination
    )
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="different store"):
        copy_store(CopyConfig(pushed, tiny_store))


def test_corrupted_chunk_is_caught(tiny_store):
    st = open_store(tiny_store)
    good = st.activations("tiny", 2)[:]
    chunk = Path(tiny_store) / "models/tiny/layer_2/c/3/0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    acts = open_store(tiny_store).activations("tiny", 2)
    np.testing.assert_array_equal(acts[:64], good[:64])  # other chunks still read
    with pytest.raises(
        IntegrityError, match=r"shard \(3, 0\) of array models/tiny/layer_2.*rows 192-255"
    ):
        acts[100:300]
    with pytest.raises(IntegrityError, match="models/tiny/layer_2/c/3/0"):
        list(acts.iter_chunks())
    rep = verify(st.loc)
    assert not rep.ok and [(p.key, p.kind) for p in rep.problems] == [
        ("models/tiny/layer_2/c/3/0", "corrupted")
    ]
    r = CliRunner().invoke(main, ["verify", tiny_store])
    assert r.exit_code != 0 and "models/tiny/layer_2/c/3/0" in r.output and "corrupted" in r.output


def test_verify_reports_missing_and_tampered_files(tiny_store):
    loc = open_location(tiny_store, writable=True)
    update_manifest(loc)
    root = Path(tiny_store)
    (root / "models/tiny/layer_1/c/2/0").unlink()
    parquet = next(root.glob("tokenizations/*/samples/part-00000.parquet"))
    data = bytearray(parquet.read_bytes())
    data[100] ^= 0x01  # one bit in the data pages: the file still parses
    parquet.write_bytes(bytes(data))
    (root / "models/tiny/notes.txt").write_text("added later")
    rep = verify(loc)
    got = {(p.key, p.kind) for p in rep.problems}
    assert ("models/tiny/layer_1/c/2/0", "missing") in got
    assert (str(parquet.relative_to(root)), "corrupted") in got
    assert ("models/tiny/notes.txt", "unlisted") in got
    assert not rep.ok


def test_corrupt_chunk_in_bucket_caught(pushed, s3, tmp_path):
    url = new_url()
    assert copy_store(CopyConfig(pushed, url)).ok
    key = url.removeprefix("s3://") + "/models/tiny/layer_3/c/1/0"
    raw = bytearray(s3.cat_file(key))
    raw[5] ^= 0x10
    s3.pipe_file(key, bytes(raw))
    with pytest.raises(IntegrityError, match=r"shard \(1, 0\) of array models/tiny/layer_3"):
        open_store(url).activations("tiny", 3)[:]
    r = CliRunner().invoke(main, ["verify", url])
    assert r.exit_code != 0 and "models/tiny/layer_3/c/1/0" in r.output
    # copying it down refuses the bad chunk instead of spreading it
    res = copy_store(CopyConfig(url, str(tmp_path / "d.zarr")))
    assert not res.ok and [p.key for p in res.problems] == ["models/tiny/layer_3/c/1/0"]


def test_malicious_key_refused_on_copy(pushed, s3, tmp_path):
    url = new_url()
    assert copy_store(CopyConfig(pushed, url)).ok
    bucket_key = url.removeprefix("s3://") + "/models/../../../escaped.txt"
    import boto3

    b, k = bucket_key.split("/", 1)
    boto3.client("s3").put_object(Bucket=b, Key=k, Body=b"pwned")  # a raw key with '..' parts
    dst = tmp_path / "inner" / "d.zarr"
    r = CliRunner().invoke(main, ["copy", url, str(dst)])
    assert r.exit_code != 0 and "unsafe" in r.output
    assert not list(tmp_path.rglob("escaped.txt")) and not dst.exists()


def test_malicious_manifest_key_refused(tiny_store):
    loc = open_location(tiny_store, writable=True)
    loc.write_bytes(
        "manifest.json", json.dumps({"files": {"../../x": {"size": 1, "sha256": "0"}}}).encode()
    )
    with pytest.raises(StoreError, match="unsafe store key"):
        verify(loc)


# ---------------------------------------------------------------- concurrency
def test_lock_refuses_second_writer(tiny_store):
    loc = open_location(tiny_store, writable=True)
    a = StoreLock(loc, "models/tiny/layer_1", "writer a").acquire()
    with pytest.raises(ConcurrencyError, match=r"models/tiny/layer_1.*being written.*pid"):
        StoreLock(loc, "models/tiny/layer_1", "writer b").acquire()
    StoreLock(loc, "models/tiny/layer_2", "writer c").acquire().release()  # another array: fine
    a.release()
    StoreLock(loc, "models/tiny/layer_1", "writer b").acquire().release()
    assert not loc.exists(lock_key("models/tiny/layer_1"))


def test_lock_in_bucket_uses_conditional_write(pushed, s3):
    url = new_url()
    loc = open_location(url, create=True)
    a = StoreLock(loc, "models/m/layer_1").acquire()
    with pytest.raises(ConcurrencyError):
        StoreLock(loc, "models/m/layer_1").acquire()
    a.release()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_lock_from_dead_pid_taken_over(tiny_store):
    loc = open_location(tiny_store, writable=True)
    stale = {
        "name": "models/tiny/layer_1",
        "owner": "dead",
        "pid": _dead_pid(),
        "host": socket.gethostname(),
        "created": "2026-01-01T00:00:00+00:00",
        "purpose": "extract tiny",
    }
    loc.write_bytes(lock_key("models/tiny/layer_1"), json.dumps(stale).encode())
    lock = StoreLock(loc, "models/tiny/layer_1").acquire()
    assert json.loads(loc.read_bytes(lock_key("models/tiny/layer_1")))["owner"] == lock.info.owner
    lock.release()
    # held by another host: refused unless break_lock
    loc.write_bytes(
        lock_key("models/tiny/layer_1"),
        json.dumps({**stale, "host": "elsewhere", "pid": 1}).encode(),
    )
    with pytest.raises(ConcurrencyError, match="elsewhere.*--break-lock"):
        StoreLock(loc, "models/tiny/layer_1").acquire()
    StoreLock(loc, "models/tiny/layer_1", break_lock=True).acquire().release()


def test_extract_same_array_refused_other_layers_proceed(s3_server, tiny_bert_dir, corpus_file):
    from actstore.store.extract import extract

    """In a store of format 2 (one writer per array; format 3 shares an array's units instead, test_distributed)."""
    url = new_url()
    extract(url, extract_cfg(tiny_bert_dir, corpus_file, "1"), progress=False)
    loc = open_location(url, create=True)
    root = json.loads(loc.read_bytes("zarr.json"))
    root["attributes"]["actstore"]["format"] = 2
    loc.write_bytes("zarr.json", json.dumps(root).encode())
    # someone is writing layer 2
    other = StoreLock(loc, "models/tiny/layer_2", "another extraction").acquire()
    try:
        with pytest.raises(ConcurrencyError, match="models/tiny/layer_2"):
            extract(url, extract_cfg(tiny_bert_dir, corpus_file, "2"), progress=False)
        res = extract(
            url, extract_cfg(tiny_bert_dir, corpus_file, "3"), progress=False
        )  # a different layer
        assert res.rows_written == res.n_tokens
    finally:
        other.release()
    st = open_store(url)
    assert (
        len(st.activations("tiny", 3)) == res.n_tokens and len(st.activations("tiny", 2)) == 0
    )  # nothing written to 2
    assert not [k for k in loc.walk("locks")]  # every lock given back


WRITER = """
import sys
from actstore.data.corpora import DataConfig
from actstore.store.extract import ExtractConfig, extract
cfg = ExtractConfig(model=sys.argv[2], data=DataConfig(sys.argv[3]), layers=sys.argv[4], name=sys.argv[5], codec="fp32",
                    chunk_rows=64, batch_size=8, device="cpu", unit_rows=64)
r = extract(sys.argv[1], cfg, progress=False)
print("OK", r.rows_written)
"""


@pytest.mark.slow
def test_two_processes_extract_different_models_into_one_bucket(
    s3_server, tiny_bert_dir, corpus_file, tmp_path
):
    url = new_url()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), url, tiny_bert_dir, corpus_file, layers, name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for layers, name in (("1,2", "first"), ("3", "second"))
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and "OK" in out, err[-2000:]
    st = open_store(url)
    assert (
        st.models == ["first", "second"]
        and st.layers("first") == [1, 2]
        and st.layers("second") == [3]
    )
    assert np.abs(st.activations("second", 3)[:]).sum(axis=1).min() > 0  # every row written
    assert len(st.tokenization_keys()) == 1
    rep = verify(st.loc)
    assert rep.ok, rep.problems


# ---------------------------------------------------------------- train, encode and query from the bucket
def test_train_encode_and_top_tokens_over_bucket(pushed, s3):
    from actstore.encoding.config import EncodeConfig
    from actstore.encoding.encode import encode
    from actstore.query.lookups import top_tokens
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae

    url = new_url()
    assert copy_store(CopyConfig(pushed, url)).ok
    st = open_store(url, writable=True)
    train_sae(
        st,
        TrainConfig(
            model="tiny", layer=2, d_sae=16, epochs=1, batch_size=64, name="s", device="cpu"
        ),
        progress=False,
    )
    ro = open_store(url)  # a teammate opens it by URL, read-only
    assert actstore.sae_names(ro) == ["s"] and actstore.load_sae(ro, "s").cfg.d_sae == 16
    # a URL opened read-only refuses writes before any work
    with pytest.raises(StoreError, match="--writable"):
        encode(
            ro,
            EncodeConfig(sae="s", batch_rows=256, n_buckets=2, row_group_rows=64),
            progress=False,
        )
    with pytest.raises(StoreError, match="--writable"):
        train_sae(
            ro,
            TrainConfig(
                model="tiny", layer=2, d_sae=16, epochs=1, batch_size=64, name="t", device="cpu"
            ),
            progress=False,
        )
    encode(
        st, EncodeConfig(sae="s", batch_rows=256, n_buckets=2, row_group_rows=64), progress=False
    )
    ro = open_store(url)
    top = top_tokens(ro, feature=0, sae="s", n=5)
    assert 0 < top.height <= 5 and top["value"].to_list() == sorted(
        top["value"].to_list(), reverse=True
    )
    # the same feature's values recomputed from the activations in the bucket
    acts = ro.activations("tiny", 2)[:]
    import torch

    with torch.no_grad():
        want = actstore.load_sae(ro, "s").encode(torch.from_numpy(acts))[:, 0].numpy()
    np.testing.assert_allclose(
        top["value"].to_numpy(), np.sort(want)[::-1][: top.height], rtol=1e-4, atol=1e-5
    )
    r = CliRunner().invoke(main, ["top-tokens", url, "--sae", "s", "--feature", "0", "-n", "3"])
    assert r.exit_code == 0, r.output
    update_manifest(open_location(url, writable=True))
    assert verify(ro.loc).ok


def test_damaged_checkpoint_in_bucket_is_a_clear_error(pushed, s3):
    """An unfinished run's checkpoint in a bucket whose run state was edited (markup in place of its options) is
    refused with an IntegrityError; the bucket's other objects are left as they were."""
    from actstore.format import layout
    from actstore.models.checkpoint import pack, unpack
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae

    url = new_url()
    assert copy_store(CopyConfig(pushed, url)).ok
    st = open_store(url, writable=True)

    def cfg() -> TrainConfig:
        return TrainConfig(
            model="tiny",
            layer=2,
            d_sae=16,
            epochs=2,
            batch_size=64,
            checkpoint_every=2,
            name="d",
            device="cpu",
        )

    class Stop(Exception):
        pass

    def die(step, _info):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train_sae(st, cfg(), progress=False, on_step=die)
    key = f"{url[5:]}/saes/d/{layout.SAE_CHECKPOINT}"
    packed = unpack(s3.cat_file(key))
    meta = dict(packed.meta)
    meta["meta"]["config"] = "<script>alert(1)</script>"
    s3.pipe_file(key, pack(packed.tensors, meta))
    before = bucket_snapshot(s3, url)
    with pytest.raises(
        IntegrityError, match="checkpoint of unfinished run 'd' in s3://.* is damaged"
    ):
        train_sae(open_store(url, writable=True), cfg(), progress=False)
    s3.invalidate_cache()
    assert bucket_snapshot(s3, url) == before


# ---------------------------------------------------------------- the same promises over S3
def bucket_snapshot(s3, url: str) -> dict[str, str]:
    """Every object of the store in the bucket with its ETag (changes when an object is rewritten)."""
    root = url.removeprefix("s3://")
    s3.invalidate_cache()
    return {k: v["ETag"] for k, v in s3.find(root, detail=True).items()}


@pytest.mark.parametrize("writable", [False, True])
def test_sql_sandbox_over_bucket(pushed, s3, tmp_path, writable):
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = TOP-SECRET")
    out = tmp_path / "x.csv"
    before = bucket_snapshot(s3, pushed)
    st = open_store(pushed, writable=writable)
    for stmt in (
        f"SELECT * FROM read_text('{secret}')",
        f"SELECT * FROM read_csv('{secret}')",
        f"COPY (SELECT 1) TO '{out}'",
        f"COPY (SELECT 1) TO '{pushed}/evil.csv'",
        "SELECT * FROM read_parquet('s3://team/*/*.parquet')",
        "RESET allowed_paths",
        "SET enable_external_access = true",
        "LOAD httpfs",
        f"ATTACH '{tmp_path / 'db.duckdb'}' AS x",
    ):
        with pytest.raises(Exception) as info:  # noqa: PT011 - any DuckDB error; the statement must fail
            actstore.sql(st, stmt)
        assert "TOP-SECRET" not in str(info.value)
        r = CliRunner().invoke(main, ["sql", pushed, stmt])
        assert r.exit_code != 0 and "TOP-SECRET" not in r.output, (stmt, r.output)
    assert not out.exists() and not (tmp_path / "db.duckdb").exists()
    assert bucket_snapshot(s3, pushed) == before
    assert actstore.sql(st, "SELECT count(*) AS n FROM tokens")["n"][0] > 0


@pytest.fixture(scope="module")
def pushed_two_models(s3_server, tiny_store_ro, tiny_bert_dir, corpus_file, tmp_path_factory):
    """Two models (same weights, two keys) with an SAE each at layer 2, in the bucket; do not write to it."""
    from actstore.sae.config import TrainConfig
    from actstore.sae.train import train_sae
    from actstore.store.extract import extract

    local = tmp_path_factory.mktemp("two") / "two.zarr"
    shutil.copytree(tiny_store_ro, local)
    extract(str(local), extract_cfg(tiny_bert_dir, corpus_file, "2", name="tiny2"), progress=False)
    for model, seed in (("tiny", 0), ("tiny2", 1)):
        train_sae(
            str(local),
            TrainConfig(
                model=model,
                layer=2,
                arch="topk",
                k=4,
                d_sae=16,
                tokens=512,
                seed=seed,
                name=f"{model}-s",
            ),
            progress=False,
        )
    url = f"s3://team/two-{uuid.uuid4().hex[:6]}"
    assert copy_store(CopyConfig(str(local), url)).ok
    return url


def test_report_and_diff_leave_a_bucket_untouched_unless_writable(pushed_two_models, s3, tmp_path):
    url = pushed_two_models
    before = bucket_snapshot(s3, url)
    r = CliRunner().invoke(
        main, ["diff-features", url, "--sae", "tiny-s", "--sae", "tiny2-s", "--rows", "0"]
    )
    assert r.exit_code == 0 and "not saved" in r.output, r.output
    r = CliRunner().invoke(
        main, ["report", url, "--out", str(tmp_path / "rep"), "--models", "tiny,tiny2"]
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "index.html").exists()
    assert bucket_snapshot(s3, url) == before
    r = CliRunner().invoke(
        main, ["diff-features", url, "--sae", "tiny-s", "--sae", "tiny2-s", "--writable"]
    )
    assert r.exit_code == 0 and "saved as diffs/tiny-s__tiny2-s" in r.output, r.output
    after = bucket_snapshot(s3, url)
    assert any("/diffs/tiny-s__tiny2-s/diff.parquet" in k for k in after) and after != before


def test_remote_reads_check_the_manifest(pushed, s3):
    url = new_url()
    assert copy_store(CopyConfig(pushed, url)).ok
    st = open_store(url)
    key = next(k for k in st.tokenization().parquet_keys("samples"))
    obj = url.removeprefix("s3://") + "/" + key
    raw = bytearray(s3.cat_file(obj))
    raw[60:124] = bytes(64)
    s3.pipe_file(obj, bytes(raw))
    with pytest.raises(IntegrityError, match="samples/part-00000.parquet.*corrupted"):
        open_store(url).samples()
    r = CliRunner().invoke(main, ["sql", url, "SELECT count(*) FROM samples"])
    assert r.exit_code != 0 and "corrupted" in r.output and "Traceback" not in r.output


def test_dot_dot_folder_listed_by_a_bucket_is_refused(pushed, s3):
    """An object store lists 'models/..' for a raw key models/../../x: readers refuse it in one line, never follow it."""
    url = new_url()
    assert copy_store(CopyConfig(pushed, url)).ok
    import boto3

    b, k = (url.removeprefix("s3://") + "/models/../../escape.txt").split("/", 1)
    boto3.client("s3").put_object(Bucket=b, Key=k, Body=b"x")
    s3.invalidate_cache()
    with pytest.raises(StoreError, match=r"unsafe store key 'models/\.\.'"):
        open_store(url).models  # noqa: B018
    r = CliRunner().invoke(main, ["info", url])
    assert (
        r.exit_code != 0 and isinstance(r.exception, SystemExit) and "unsafe store key" in r.output
    )


# ---------------------------------------------------------------- remote reads: requests and shards
@pytest.fixture()
def counted(s3_server, monkeypatch):
    """S3 requests routed through a counting proxy in front of the moto server."""
    from helpers import Counter, counting_proxy

    counter = Counter()
    proxy = counting_proxy(int(s3_server.rsplit(":", 1)[1]), counter)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield counter
    proxy.shutdown()
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_remote_stream_fetches_each_shard_with_one_request(pushed, counted):
    st = open_store(pushed)
    acts = st.activations("tiny", 2)
    counted.reset()
    got = np.concatenate([c.values for c in acts.iter_chunks()])
    reqs = counted.by_method("/shared/tiny/models/tiny/layer_2/c/")
    n_objects = -(-len(acts) // acts.chunk_rows)
    assert acts.chunk_rows == 64  # shards of 64 rows (16-row inner chunks)
    assert {m for m, _ in reqs} == {"GET"} and len(reqs) == n_objects  # no HEAD before a GET
    last = f"/c/{n_objects - 1}/0"
    # one GET per whole shard
    assert {n for (_, path), n in reqs.items() if not path.endswith(last)} == {1}
    assert (
        sum(n for (_, path), n in reqs.items() if path.endswith(last)) <= 2
    )  # the last, partial one: index + chunks
    np.testing.assert_array_equal(got, actstore.open_store(pushed).activations("tiny", 2)[:])


def test_random_rows_fetch_inner_chunks_not_whole_shards(pushed, counted, tiny_store_ro):
    acts = open_store(pushed).activations("tiny", 2)
    counted.reset()
    rows = acts.take(np.array([5, 200]))
    np.testing.assert_array_equal(
        rows, open_store(tiny_store_ro).activations("tiny", 2).take(np.array([5, 200]))
    )
    shard_bytes = sum(
        p.stat().st_size
        for p in (Path(tiny_store_ro) / "models/tiny/layer_2/c").rglob("*")
        if p.is_file()
    )
    per_shard = shard_bytes / -(-len(acts) // 64)
    # 2 rows: two inner chunks and two indexes, well under two whole shards
    assert counted.bytes < 2 * per_shard


def test_a_corrupted_inner_chunk_in_a_bucket_is_named(pushed, s3):
    url = new_url()
    assert copy_store(CopyConfig(pushed, url)).ok
    key = f"{url.removeprefix('s3://')}/models/tiny/layer_3/c/1/0"
    raw = bytearray(s3.cat_file(key))
    index = np.frombuffer(bytes(raw[-(16 * 4 + 4) : -4]), dtype="<u8").reshape(4, 2)
    raw[int(index[1][0]) + 3] ^= 0xFF  # inner chunk 1 of shard 1: rows 80-95
    s3.pipe_file(key, bytes(raw))
    acts = open_store(url).activations("tiny", 3)
    with pytest.raises(
        IntegrityError,
        match=r"shard \(1, 0\) of array models/tiny/layer_3 .*inner chunk \(1, 0\) \(rows 80-95\)",
    ):
        acts[64:128]
