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
from tests.helpers import make_sae, one_line_error, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized")


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
    published = read_encoding(st, "s").dir
    new = "gen-" + str(int(published.split("-")[1]) + 1)
    gen = Path(encoded) / "features" / "s" / new
    (gen / "acts").mkdir(parents=True)
    good = next((Path(encoded) / "features" / "s" / published / "acts").glob("*.parquet"))
    # what a full disk leaves
    (gen / "acts" / good.name).write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    r = CliRunner().invoke(main, ["verify", encoded])
    assert r.exit_code == 0, r.output
    assert "corrupted:" not in r.output and " 0 corrupted" in r.output, r.output
    assert (
        f"unfinished: features/s/{new}" in r.output and "rerun actstore encode --sae s" in r.output
    )
    assert ": ok" in r.output and "1 unfinished" in r.output
    assert actstore.features(st, "s").collect().height > 0  # the published encoding reads as before


# ---------------------------------------------------------------- 7. hostile cfg.json in import-sae
def exported(encoded_ro: str, tmp_path: Path, fmt: str) -> Path:
    out = tmp_path / f"{fmt}-sae"
    r = CliRunner().invoke(
        main, ["export-sae", encoded_ro, "s", "--format", fmt, "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    return out


def _deep(n: int) -> str:
    return "[" * n + "]" * n


SAELENS_CASES = {
    "norm_scaling_factor abc": {
        "normalize_activations": "expected_average_only_in",
        "norm_scaling_factor": "abc",
    },
    "norm_scaling_factor [1]": {
        "normalize_activations": "expected_average_only_in",
        "norm_scaling_factor": [1],
    },
    "d_in Infinity": {"d_in": float("inf")},
    "d_in 384.9": {"d_in": 32.9},
    "k 8.7": {"k": 4.7},
    "hook_name a number": {"metadata": {"hook_name": 12}},
    "activation_fn_kwargs a string": {"k": None, "activation_fn_kwargs": "kk"},
}
SPARSIFY_CASES = {
    "num_latents abc": {"num_latents": "abc"},
    "num_latents 1e400": {"num_latents": float("inf")},
    "num_latents [256]": {"num_latents": [256]},
    "k -3": {"k": -3},
}


def _write_cfg(folder: Path, changes: dict) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "cfg.json").write_text(json.dumps(cfg))  # Infinity is what json writes for inf


@pytest.mark.parametrize(
    "case", sorted(SAELENS_CASES) + ["nested 200k deep", "topk_threshold of 3"]
)
def test_hostile_saelens_cfg_is_one_line(encoded, encoded_ro, tmp_path, case):
    folder = exported(encoded_ro, tmp_path, "saelens")
    if case == "nested 200k deep":
        (folder / "cfg.json").write_text('{"d_in": 32, "metadata": ' + _deep(200_000) + "}")
    elif case == "topk_threshold of 3":
        import torch
        from safetensors.torch import load_file, save_file

        t = load_file(str(folder / "sae_weights.safetensors"))
        t.pop("threshold", None)
        t["topk_threshold"] = torch.ones(3)
        save_file(t, str(folder / "sae_weights.safetensors"))
        _write_cfg(folder, {"architecture": "batchtopk", "k": 4})
    else:
        _write_cfg(folder, SAELENS_CASES[case])
    before = snapshot(encoded)
    r = CliRunner().invoke(
        main,
        [
            "import-sae",
            encoded,
            str(folder),
            "--format",
            "saelens",
            "--layer",
            "2",
            "--name",
            "x",
            "--force",
        ],
    )
    one_line_error(r)
    assert snapshot(encoded) == before


@pytest.mark.parametrize("case", sorted(SPARSIFY_CASES))
def test_hostile_sparsify_cfg_is_one_line(encoded, encoded_ro, tmp_path, case):
    folder = exported(encoded_ro, tmp_path, "sparsify")
    _write_cfg(folder, SPARSIFY_CASES[case])
    before = snapshot(encoded)
    r = CliRunner().invoke(
        main,
        [
            "import-sae",
            encoded,
            str(folder),
            "--format",
            "sparsify",
            "--layer",
            "2",
            "--name",
            "x",
            "--force",
        ],
    )
    one_line_error(r)
    assert snapshot(encoded) == before


def test_a_whole_float_width_is_still_read(encoded, encoded_ro, tmp_path):
    folder = exported(encoded_ro, tmp_path, "saelens")
    _write_cfg(folder, {"d_in": 32.0})
    r = CliRunner().invoke(
        main,
        [
            "import-sae",
            encoded,
            str(folder),
            "--format",
            "saelens",
            "--layer",
            "2",
            "--name",
            "x",
            "--force",
        ],
    )
    assert r.exit_code == 0, r.output


def test_a_refused_export_leaves_no_empty_folder(encoded, tmp_path):
    st = actstore.open_store(encoded, writable=True)
    make_sae(st, "r", "relu-l1")  # sparsify holds TopK SAEs only
    out = tmp_path / "new" / "out"
    r = CliRunner().invoke(
        main, ["export-sae", encoded, "r", "--format", "sparsify", "--out", str(out)]
    )
    one_line_error(r, "sparsify holds TopK SAEs only")
    assert not out.exists()


# ---------------------------------------------------------------- 7/8. corpora: lone surrogates, repeated and missing ids
def corpus(tmp_path: Path, lines: list[str]) -> str:
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


@pytest.mark.parametrize("field", ["text", "id", "label"])
def test_a_lone_surrogate_in_a_corpus_field_is_repaired(tiny_bert_dir, tmp_path, field):
    rows = [
        {"id": f"r{i}", "text": f"the movie number {i} was good", "label": "pos"} for i in range(6)
    ]
    lines = [json.dumps(r) for r in rows]
    lines[2] = lines[2].replace(
        '"r2"' if field == "id" else '"pos"' if field == "label" else '"the movie',
        '"x\\ud800' + ('"' if field != "text" else " the movie"),
        1,
    )
    assert "\\ud800" in lines[2]
    store = str(tmp_path / "s.zarr")
    r = CliRunner().invoke(
        main,
        [
            "extract",
            store,
            "--model",
            tiny_bert_dir,
            "--data",
            corpus(tmp_path, lines),
            "--layers",
            "1",
            "--codec",
            "fp32",
            "--quiet",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0 and isinstance(r.exception, SystemExit | None), (r.exception, r.output)
    assert "1 rows had lone surrogates, now U+FFFD" in r.output
    got = actstore.sql(actstore.open_store(store), f"SELECT {field} FROM samples WHERE sample = 2")[
        field
    ][0]
    assert "x\ufffd" in got


def test_repeated_and_missing_ids_become_unique(tiny_bert_dir, tmp_path):
    lines = [
        json.dumps({"id": "a", "text": "good film", "label": "pos"}),
        json.dumps({"id": "a", "text": "bad film", "label": "neg"}),
        json.dumps({"text": "no id here, so its row number", "label": "neg"}),
        json.dumps({"id": "2", "text": "an explicit id equal to that row number", "label": "pos"}),
    ]
    store = str(tmp_path / "s.zarr")
    r = CliRunner().invoke(
        main,
        [
            "extract",
            store,
            "--model",
            tiny_bert_dir,
            "--data",
            corpus(tmp_path, lines),
            "--layers",
            "1",
            "--codec",
            "fp32",
            "--quiet",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "2 repeated ids made unique" in r.output
    ids = actstore.sql(actstore.open_store(store), "SELECT id FROM samples ORDER BY sample")[
        "id"
    ].to_list()
    assert ids == ["a", "a#2", "2", "2#2"]


def test_a_tokenization_mismatch_names_the_requested_max_length(
    tiny_store, tiny_bert_dir, corpus_file
):
    r = CliRunner().invoke(
        main,
        [
            "extract",
            tiny_store,
            "--model",
            tiny_bert_dir,
            "--data",
            corpus_file,
            "--name",
            "tiny2",
            "--layers",
            "1",
            "--max-length",
            "17",
            "--quiet",
        ],
    )
    line = one_line_error(r, "at max length 17", "--new-tokenization")
    assert "max length 128" in line


# ---------------------------------------------------------------- 7. a metrics.json with strings where numbers belong
@pytest.mark.parametrize(
    "metrics",
    [
        {"eval": {"fvu": "abc", "l0": "x"}, "train": {"dead_fraction": [1]}, "tokens": "many"},
        {"eval": "not an object"},
        {"eval": {"l0": {"a": 1}}},
    ],
)
def test_hostile_metrics_are_shown_as_unknown(encoded, metrics):
    from starlette.testclient import TestClient

    from actstore.browse.app import create_app
    from actstore.browse.config import ServeConfig

    (Path(encoded) / "saes" / "s" / "metrics.json").write_text(json.dumps(metrics))
    r = CliRunner().invoke(main, ["saes", encoded, "--format", "csv"])
    assert r.exit_code == 0, r.exception
    row = r.output.strip().splitlines()[1].split(",")
    assert row[0] == "s"
    c = TestClient(
        create_app(actstore.open_store(encoded), ServeConfig()), base_url="http://127.0.0.1"
    )
    assert c.get("/").status_code == 200


def test_metrics_that_are_not_an_object_are_one_line(encoded):
    (Path(encoded) / "saes" / "s" / "metrics.json").write_text("[1, 2]")
    one_line_error(
        CliRunner().invoke(main, ["saes", encoded]), "metrics.json of SAE s", "not a JSON object"
    )


# ---------------------------------------------------------------- 7. --ray addresses that cannot work
@pytest.mark.parametrize(
    ("address", "needle"),
    [
        ("127.0.0.1:1", "no Ray cluster answers there"),
        ("ray://127.0.0.1:1", "ray[client]"),
        ("nonsense", "HOST:PORT"),
    ],
)
def test_a_ray_address_that_cannot_work_is_one_line_and_quick(tiny_store, address, needle):
    import importlib.util
    import time

    if address.startswith("ray://") and importlib.util.find_spec("grpc") is not None:
        needle = "no Ray cluster answers there"
    t0 = time.perf_counter()
    r = CliRunner().invoke(
        main,
        [
            "train",
            tiny_store,
            "--model",
            "tiny",
            "--layer",
            "1,2",
            "--d-sae",
            "16",
            "--arch",
            "topk",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "--ray",
            address,
        ],
    )
    one_line_error(r, needle)
    assert time.perf_counter() - t0 < 30
    assert actstore.sae_names(actstore.open_store(tiny_store)) == []


# ---------------------------------------------------------------- 8. names parsed with ASCII digits only
def test_unicode_digits_are_not_unit_markers_or_generations():
    from actstore.format import layout

    assert layout.parse_unit_marker("000000004096.done") == 4096
    assert layout.parse_unit_marker("\u0660" * 11 + "\u0661.done") is None  # Arabic-Indic digits
    assert layout.parse_generation("gen-3") == 3
    assert layout.parse_generation("gen-\u0663") is None


# ---------------------------------------------------------------- DuckDB errors in our hierarchy
def test_a_query_duckdb_refuses_is_a_query_error(encoded):
    from actstore.errors import QueryError

    with pytest.raises(QueryError, match="SQL error: .*no_such_table"):
        actstore.sql(actstore.open_store(encoded), "SELECT * FROM no_such_table")
    one_line_error(CliRunner().invoke(main, ["sql", encoded, "SELEC 1"]), "SQL error")
    r = CliRunner().invoke(
        main,
        [
            "query",
            encoded,
            "top_tokens",
            "--param",
            "sae=s",
            "--param",
            "feature=0",
            "--param",
            "n=-1",
        ],
    )
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.exception
