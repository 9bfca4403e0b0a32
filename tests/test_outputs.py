"""Output paths under a full disk and hostile bytes: nothing truncated that looks complete, nothing altered, nothing
that drives the terminal (issue 27, items 1 and 6)."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.data.corpora import DataConfig
from actstore.encoding.config import EncodeConfig
from actstore.encoding.encode import encode
from actstore.storage.integrity import update_manifest
from actstore.store.config import ExtractConfig
from actstore.store.extract import extract
from tests.helpers import make_sae

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized")

ANSI_ID = "ansi\x1b[31mred"
OSC_TEXT = "great movie \x1b]0;pwned\x07 \x1b]52;c;ZXZpbA==\x07 the end"
CLI = [sys.executable, "-m", "actstore.cli"]


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory, tiny_bert_dir) -> str:
    """A store whose ids and texts carry ANSI (CSI) and OSC escape sequences, with an encoded SAE ``s``."""
    d = tmp_path_factory.mktemp("hostile")
    rows = [{"id": ANSI_ID, "text": OSC_TEXT, "label": "pos\x1b[2J"}]
    rows += [
        {"id": f"r{i}", "text": f"the film was good number {i} " * 5, "label": "neg"}
        for i in range(30)
    ]
    corpus = d / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = d / "h.zarr"
    cfg = ExtractConfig(
        model=tiny_bert_dir,
        data=DataConfig(str(corpus)),
        layers="2",
        name="tiny",
        codec="fp32",
        chunk_rows=64,
        inner_rows=16,
        batch_size=8,
        device="cpu",
    )
    extract(str(path), cfg, progress=False)
    st = actstore.open_store(str(path), writable=True)
    make_sae(st, "s", "topk", k=4)
    update_manifest(st.loc, prefixes=["saes/s"])
    encode(st, EncodeConfig(sae="s", batch_rows=128, n_buckets=4), progress=False)
    return str(path)


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only, as the other disk-full tests)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


BIG_QUERY = "SELECT f.*, r.range FROM features f, range(300) r"  # ~ MBs of CSV


def test_sql_to_stdout_on_a_full_disk_fails_loudly(hostile_store, small_disk):
    target = small_disk / "out.csv"
    with open(target, "wb") as f:
        r = subprocess.run(
            [*CLI, "sql", hostile_store, BIG_QUERY, "--format", "csv"],
            stdout=f,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert r.returncode != 0, "a truncated result was reported as success"
    assert "disk full" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_sql_out_on_a_full_disk_leaves_no_partial_file(hostile_store, small_disk):
    target = small_disk / "out.csv"
    r = CliRunner().invoke(
        main, ["sql", hostile_store, BIG_QUERY, "--format", "csv", "--out", str(target)]
    )
    assert r.exit_code != 0 and "disk full" in r.output, r.output
    assert list(small_disk.iterdir()) == [], "a truncated file (or its temporary) was left behind"


def test_sql_out_failure_keeps_the_previous_file(hostile_store, small_disk):
    target = small_disk / "out.csv"
    target.write_text("old result\n")
    r = CliRunner().invoke(
        main, ["sql", hostile_store, BIG_QUERY, "--format", "parquet", "--out", str(target)]
    )
    assert r.exit_code != 0 and "disk full" in r.output, r.output
    assert target.read_text() == "old result\n" and [p.name for p in small_disk.iterdir()] == [
        "out.csv"
    ]


def fill(mnt: Path, leave: int = 4096) -> None:
    """Fill the tmpfs at ``mnt`` up to ``leave`` free bytes."""
    free = shutil.disk_usage(mnt).free
    (mnt / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_export_features_delphi_on_a_full_disk_is_one_line(hostile_store, small_disk):
    fill(small_disk)
    r = CliRunner().invoke(
        main,
        [
            "export-features",
            hostile_store,
            "--sae",
            "s",
            "--format",
            "delphi",
            "--out",
            str(small_disk / "delphi"),
            "--n-splits",
            "1",
        ],
    )
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.exception
    assert "disk full" in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_sql_out_writes_the_whole_result(hostile_store, tmp_path):
    out = tmp_path / "r.csv"
    r = CliRunner().invoke(
        main,
        [
            "sql",
            hostile_store,
            "SELECT id FROM samples ORDER BY sample",
            "--format",
            "csv",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert out.read_bytes().decode().splitlines()[1] == ANSI_ID


@pytest.mark.parametrize("fmt", ["csv", "table"])
def test_store_bytes_reach_a_pipe_unaltered(hostile_store, fmt):
    r = subprocess.run(
        [
            *CLI,
            "sql",
            hostile_store,
            "SELECT id, label, text FROM samples WHERE sample = 0",
            "--format",
            fmt,
        ],
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert ANSI_ID.encode() in r.stdout and b"\x1b]52;c;ZXZpbA==\x07" in r.stdout, r.stdout


def run_on_a_terminal(args: list[str]) -> bytes:
    """What ``args`` prints when its standard output is a terminal (a pty)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=slave, stderr=subprocess.DEVNULL, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(master)
    assert proc.returncode == 0
    return out


@pytest.mark.parametrize("fmt", ["csv", "table"])
def test_store_bytes_on_a_terminal_are_escaped(hostile_store, fmt):
    out = run_on_a_terminal(
        [
            *CLI,
            "sql",
            hostile_store,
            "SELECT id, label, text FROM samples WHERE sample = 0",
            "--format",
            fmt,
        ]
    )
    assert b"\x1b" not in out and b"\x07" not in out, out
    assert b"ansi\\x1b[31mred" in out, out


def test_info_on_a_terminal_escapes_a_hostile_source(hostile_store, tmp_path):
    st = tmp_path / "i.zarr"
    shutil.copytree(hostile_store, st)
    meta = Path(st) / "models" / "tiny" / "zarr.json"
    m = json.loads(meta.read_text())
    m["attributes"]["actstore"]["source"] = "evil\x1b]0;title\x07"
    meta.write_text(json.dumps(m))
    out = run_on_a_terminal([*CLI, "info", str(st)])
    assert b"\x1b" not in out and b"evil\\x1b]0;title\\x07" in out, out
