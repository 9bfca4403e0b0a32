"""Claims and locks that cannot wedge a writer: forged leases, empty lock objects, --break-lock on unit claims, lock
objects written whole or not at all, a waiting writer that says whom it waits for (issue 27, item 3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import actstore
from actstore.clock import now
from actstore.format import layout
from actstore.storage.location import open_location
from actstore.storage.locks import UNREADABLE_LAPSE_S, StoreLock
from actstore.store.units import completed_units

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized")

CLI = [sys.executable, "-m", "actstore.cli"]
ARRAY = "models/tiny/layer_1"
CLAIM = layout.unit_claim("tiny", 64)


def extract_args(store: str, model: str, corpus: str, *extra: str) -> list[str]:
    return [
        *CLI,
        "extract",
        store,
        "--model",
        model,
        "--data",
        corpus,
        "--layers",
        "1",
        "--name",
        "tiny",
        "--codec",
        "fp32",
        "--chunk-rows",
        "64",
        "--unit-rows",
        "64",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def done_store(tmp_path_factory, tiny_bert_dir, corpus_file) -> str:
    path = str(tmp_path_factory.mktemp("claims") / "c.zarr")
    r = subprocess.run(
        extract_args(path, tiny_bert_dir, corpus_file), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return path


@pytest.fixture()
def unfinished(tmp_path, done_store) -> str:
    """The store with every unit from row 64 on forgotten (its markers gone): an extract must redo them."""
    path = str(tmp_path / "c.zarr")
    shutil.copytree(done_store, path)
    loc = open_location(path, writable=True)
    for u0 in completed_units(loc, ARRAY):
        if u0 >= 64:
            loc.delete(layout.unit_marker(ARRAY, u0))
    meta = Path(path) / ARRAY / "zarr.json"
    m = json.loads(meta.read_text())
    m["attributes"]["actstore"].update(committed_rows=64, complete=False)
    meta.write_text(json.dumps(m))
    return path


def forge(store: str, name: str, body: bytes, age_s: float = 0.0) -> Path:
    """A lock object written by hand (another host's, or what a crash left), ``age_s`` seconds old."""
    p = Path(store) / layout.lock_key(name)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(body)
    if age_s:
        t = time.time() - age_s
        os.utime(p, (t, t))
    return p


def claim_body(created: str, expires: str, host: str = "other-host") -> bytes:
    return json.dumps(
        {
            "name": CLAIM,
            "owner": "f" * 32,
            "pid": 4242,
            "host": host,
            "created": created,
            "purpose": "extract tiny",
            "expires": expires,
        }
    ).encode()


def run_extract(
    store: str, model: str, corpus: str, *extra: str, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        extract_args(store, model, corpus, *extra), capture_output=True, text=True, timeout=timeout
    )


def finished(store: str) -> bool:
    return bool(actstore.open_store(store).activations("tiny", 1).attrs.complete)


def test_a_claim_whose_lease_says_9999_lapses_one_lease_after_it_was_written(
    unfinished, tiny_bert_dir, corpus_file
):
    forge(
        unfinished,
        CLAIM,
        claim_body("2020-01-01T00:00:00+00:00", "9999-01-01T00:00:00+00:00"),
        age_s=3600,
    )
    r = run_extract(unfinished, tiny_bert_dir, corpus_file)
    assert r.returncode == 0, r.stderr
    assert finished(unfinished)


def test_a_forged_lease_is_capped_whatever_its_created_says():
    from actstore.storage.locks import LockInfo

    for created in ("9999-01-01T00:00:00+00:00", now(), "garbage"):
        info = LockInfo(
            "x",
            "o",
            1,
            "h",
            created,
            "p",
            expires="9999-01-01T00:00:00+00:00",
            mtime=time.time() - 10,
        )
        until = info.lapses(5.0)
        assert until is not None and until.timestamp() <= time.time(), created


def test_an_empty_claim_left_by_a_crash_is_taken_over(unfinished, tiny_bert_dir, corpus_file):
    forge(unfinished, CLAIM, b"", age_s=UNREADABLE_LAPSE_S + 5)
    r = run_extract(unfinished, tiny_bert_dir, corpus_file)
    assert r.returncode == 0, r.stderr
    assert finished(unfinished)


def test_break_lock_reaches_unit_claims(unfinished, tiny_bert_dir, corpus_file):
    from actstore.clock import deadline

    # a live-looking claim from another host
    forge(unfinished, CLAIM, claim_body(now(), deadline(300)))
    r = run_extract(unfinished, tiny_bert_dir, corpus_file, "--break-lock")
    assert r.returncode == 0, r.stderr
    assert finished(unfinished)


def test_a_waiting_extract_says_whom_it_waits_for_and_until_when(
    unfinished, tiny_bert_dir, corpus_file
):
    from actstore.clock import deadline

    forge(unfinished, CLAIM, claim_body(now(), deadline(300)))
    with pytest.raises(subprocess.TimeoutExpired) as got:
        run_extract(unfinished, tiny_bert_dir, corpus_file, timeout=25)
    err = (
        (got.value.stderr or b"").decode()
        if isinstance(got.value.stderr, bytes)
        else (got.value.stderr or "")
    )
    assert "pid 4242 on other-host" in err and "until 20" in err and "--break-lock" in err, err


def test_an_empty_setup_lock_is_taken_over_after_its_grace(unfinished, tiny_bert_dir, corpus_file):
    forge(unfinished, "setup", b"", age_s=UNREADABLE_LAPSE_S + 5)
    r = run_extract(unfinished, tiny_bert_dir, corpus_file)
    assert r.returncode == 0, r.stderr
    assert finished(unfinished)


def test_a_fresh_unreadable_lock_says_until_when(tmp_path):
    loc = open_location(str(tmp_path / "s"), create=True, writable=True)
    forge(loc.root, "setup", b"")
    said: list[str] = []
    with pytest.raises(actstore.errors.ConcurrencyError):
        StoreLock(loc, "setup", "test", say=said.append).acquire(wait_s=0.3)
    assert len(said) == 1 and "unreadable lock object" in said[0] and "until 20" in said[0], said


def test_lock_objects_are_never_left_empty_by_a_full_disk(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        loc = open_location(str(mnt / "s"), create=True, writable=True)
        (mnt / "s" / "locks").mkdir()
        free = shutil.disk_usage(mnt).free
        # not one byte left (tmpfs pages: the lock's own page cannot come)
        (mnt / "filler").write_bytes(b"\0" * free)
        with pytest.raises(OSError):
            StoreLock(loc, "setup", "extract tiny").acquire()
        assert not (mnt / "s" / "locks" / "setup.lock").exists()
        assert list((mnt / "s" / "locks").iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_file_removed_while_a_folder_is_listed_is_not_an_error(tmp_path, monkeypatch):
    """Another writer's temporary file (create_exclusive writes one beside each marker and claim) may vanish between
    the listing of a folder and the size of its entries: the walk leaves it out instead of failing."""
    from actstore.storage import location

    loc = open_location(str(tmp_path / "s"), create=True, writable=True)
    assert loc.create_exclusive("units/a/000000000000.done", b"{}")
    tmp = Path(loc.root) / "units" / "a" / "000000000032.done.tmp123"
    tmp.write_bytes(b"x")
    real = location.os.scandir

    def racing_scandir(path):
        entries = list(real(path))
        if Path(path) == tmp.parent and tmp.exists():
            tmp.unlink()  # the other writer links its file and removes the temporary one, right after the listing
        return iter(entries)

    monkeypatch.setattr(location.os, "scandir", racing_scandir)
    assert list(loc.walk("units")) == ["units/a/000000000000.done"]
    assert not tmp.exists()
    assert completed_units(loc, "a") == {0}


def test_a_lock_folder_removed_by_another_release_between_mkdir_and_write_is_made_again(
    tmp_path, monkeypatch
):
    """A released lock removes its empty folders, ``locks/`` too; another process creating a lock at that moment
    made the folder, then found it gone when writing its temporary file, and failed with one line naming
    ``locks/manifest.lock.tmpNNN`` (seen with two extract drivers). Now it makes the folder again."""
    loc = open_location(str(tmp_path / "s"), create=True, writable=True)
    real_mkdir = Path.mkdir
    removed = []

    def racing_mkdir(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if (
            self.name == "locks" and not removed
        ):  # the other process's release: rmdir of the empty folder
            self.rmdir()
            removed.append(self)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    assert loc.create_exclusive("locks/manifest.lock", b"{}")
    assert removed and (Path(loc.root) / "locks" / "manifest.lock").read_bytes() == b"{}"
