"""Hostile inputs answered with one line and nothing written, and verify's word on an unfinished encode (issue 27,
items 5, 7 and 8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.encoding.config import EncodeConfig
from actstore.encoding.encode import encode
from actstore.storage.integrity import update_manifest
from tests.helpers import make_sae

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized")


def one_line_error(r, *needles: str) -> str:
    """A CLI result that failed with one clean line (no traceback) containing every needle; the line."""
    assert r.exit_code != 0, r.output
    assert isinstance(r.exception, SystemExit), f"traceback instead of a one-line error: {r.exception!r}\n{r.output}"
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(root: str | Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def encoded_ro(tmp_path_factory, tiny_store_ro) -> str:
    path = tmp_path_factory.mktemp("hostile_in") / "s.zarr"
    shutil.copytree(tiny_store_ro, path)
    st = actstore.open_store(str(path), writable=True)
    make_sae(st, "s", "topk", k=4)
    update_manifest(st.loc, prefixes=["saes/s"])
    encode(st, EncodeConfig(sae="s", batch_rows=128, n_buckets=4), progress=False)
    return str(path)


@pytest.fixture()
def encoded(tmp_path, encoded_ro) -> str:
    dst = tmp_path / "s.zarr"
    shutil.copytree(encoded_ro, dst)
    return str(dst)


# ---------------------------------------------------------------- 5. verify after a failed overwrite
def test_verify_after_a_failed_overwrite_reports_an_unfinished_encode(encoded):
    from actstore.encoding.table import read_encoding

    st = actstore.open_store(encoded)
    published = read_encoding(st, "s")["dir"]
    new = "gen-" + str(int(published.split("-")[1]) + 1)
    gen = Path(encoded) / "features" / "s" / new
    (gen / "acts").mkdir(parents=True)
    good = next((Path(encoded) / "features" / "s" / published / "acts").glob("*.parquet"))
    (gen / "acts" / good.name).write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # what a full disk leaves
    r = CliRunner().invoke(main, ["verify", encoded])
    assert r.exit_code == 0, r.output
    assert "corrupted:" not in r.output and " 0 corrupted" in r.output, r.output
    assert f"unfinished: features/s/{new}" in r.output and "rerun actstore encode --sae s" in r.output
    assert ": ok" in r.output and "1 unfinished" in r.output
    assert actstore.features(st, "s").collect().height > 0  # the published encoding reads as before
