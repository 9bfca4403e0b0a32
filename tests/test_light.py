"""Reading a store is light: the query commands import neither torch, transformers nor matplotlib (issue 13)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers import make_sae

import actstore
from actstore.encoding.config import EncodeConfig
from actstore.encoding.encode import encode

HEAVY = ("torch", "transformers", "matplotlib")
RUN = """
import json, sys
from actstore.cli import main
try:
    main(sys.argv[1:], prog_name="actstore")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


@pytest.fixture(scope="module")
def light_store(tmp_path_factory, tiny_store_ro) -> str:
    path = tmp_path_factory.mktemp("light") / "s.zarr"
    shutil.copytree(tiny_store_ro, path)
    st = actstore.open_store(str(path), writable=True)
    make_sae(st, "s", "topk", k=4)
    encode(st, EncodeConfig(sae="s", batch_rows=64, n_buckets=2), progress=False)
    return str(path)


COMMANDS = {
    "help": ["--help"],
    "info": ["info", "S"],
    "info-json": ["info", "S", "--json"],
    "sql": ["sql", "S", "SELECT count(*) AS n FROM features"],
    "query": ["query", "S", "top_tokens", "--param", "feature=1", "--param", "sae=s"],
    "query-list": ["query", "--list"],
    "top-tokens": ["top-tokens", "S", "--sae", "s", "--feature", "1"],
    "top-features": ["top-features", "S", "--sae", "s"],
    "saes": ["saes", "S"],
    "verify": ["verify", "S"],
    "copy": ["copy", "S", "DST"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_query_commands_import_no_torch(light_store, tmp_path, name):
    args = [
        light_store if a == "S" else str(tmp_path / "copy.zarr") if a == "DST" else a
        for a in COMMANDS[name]
    ]
    out = subprocess.run(
        [sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=120
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["code"] in (0, None), out.stdout + out.stderr
    assert res["heavy"] == [], f"actstore {name} imported {res['heavy']}"


def test_the_check_sees_torch_when_a_command_needs_it(light_store, tmp_path):
    """The same harness reports torch for a command that computes with it (so the test above can fail)."""
    args = [
        "show",
        light_store,
        "--sae",
        "s",
        "--feature",
        "1",
        "--sample-id",
        "s0",
        "--out",
        str(tmp_path / "v.html"),
    ]
    out = subprocess.run(
        [sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=120
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["code"] in (0, None), out.stdout + out.stderr
    assert "torch" in res["heavy"]


def test_a_command_without_its_extra_says_which_to_install(light_store, tmp_path):
    """With torch absent (as after a plain ``pip install actstore``), extract names the extra that brings it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from actstore.cli import main\n"
        f"main(['extract', {light_store!r}, '--model', 'x', '--data', 'y.jsonl', '--layers', '1'], prog_name='actstore')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "pip install 'actstore[compute]'" in out.stderr and "Traceback" not in out.stderr
