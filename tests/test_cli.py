"""The CLI as a user types it: help everywhere, real runs, one-line errors that damage nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from actstore.cli import main


def _snapshot(path: str) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(Path(path).rglob("*"))
        if p.is_file()
    }


def test_every_command_has_help():
    runner = CliRunner()
    res = runner.invoke(main, ["--help"])
    assert res.exit_code == 0
    assert main.commands, "no commands registered"
    for name, cmd in main.commands.items():
        r = runner.invoke(main, [name, "--help"])
        assert r.exit_code == 0, (name, r.output)
        assert cmd.help and cmd.help.strip(), f"command {name} has no help text"
        assert "Usage:" in r.output
        for p in cmd.params:
            if p.param_type_name == "option" and p.name not in ("help",):
                assert p.help, f"option {p.name} of {name} has no help"


def test_extract_info_sql(tmp_path, tiny_bert_dir, corpus_file):
    runner = CliRunner()
    store = str(tmp_path / "s.zarr")
    res = runner.invoke(
        main,
        [
            "extract",
            store,
            "--model",
            tiny_bert_dir,
            "--data",
            corpus_file,
            "--layers",
            "1,3",
            "--codec",
            "int8",
            "--quiet",
            "--name",
            "tiny",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "40 samples" in res.output and "layers 1,3" in res.output
    info = runner.invoke(main, ["info", store])
    assert (
        info.exit_code == 0
        and "model tiny" in info.output
        and "layer 3: int8, complete" in info.output
    )
    js = json.loads(runner.invoke(main, ["info", store, "--json"]).output)
    assert js["models"]["tiny"]["layers"]["1"]["codec"] == "int8"
    out = runner.invoke(
        main,
        [
            "sql",
            store,
            "select label, count(*) as n from samples group by label order by label",
            "--format",
            "csv",
        ],
    )
    assert out.exit_code == 0 and out.output.splitlines() == ["label,n", "neg,20", "pos,20"]
    bad = runner.invoke(main, ["sql", store, "select * from nowhere"])
    assert bad.exit_code != 0 and "SQL error" in bad.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model", "--layers", "1"], "cannot load model"),
        (["--layers", "9"], "out of range"),
        (["--layers", "x"], "cannot read layers"),
        (["--layers", "1", "--data-override", "missing.jsonl"], "does not exist"),
        (["--layers", "1", "--text-field", "body"], "--text-field"),
        (["--layers", "1", "--codec", "int8"], "--codec fp32"),
        (["--layers", "1", "--limit", "5"], "one corpus"),
    ],
)
def test_bad_inputs_one_line_no_damage(
    tmp_path, tiny_store, tiny_bert_dir, corpus_file, args, message
):
    runner = CliRunner()
    base = ["extract", tiny_store, "--data", corpus_file, "--quiet", "--name", "tiny"]
    if "--model" not in args:
        base += ["--model", tiny_bert_dir]
    if "--data-override" in args:
        i = args.index("--data-override")
        base[base.index("--data") + 1] = str(tmp_path / args[i + 1])
        args = args[:i]
    before = _snapshot(tiny_store)
    res = runner.invoke(main, base + args)
    assert res.exit_code != 0
    assert message in res.output, res.output
    err_lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(err_lines) == 1
    assert "Traceback" not in res.output
    assert _snapshot(tiny_store) == before


def test_unwritable_store(tmp_path, tiny_bert_dir, corpus_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = CliRunner().invoke(
        main,
        [
            "extract",
            str(blocker / "s.zarr"),
            "--model",
            tiny_bert_dir,
            "--data",
            corpus_file,
            "--layers",
            "1",
            "--quiet",
        ],
    )
    assert res.exit_code != 0 and "cannot write to store" in res.output
    assert blocker.read_text() == "not a folder"


def test_open_missing_store(tmp_path):
    res = CliRunner().invoke(main, ["info", str(tmp_path / "nope")])
    assert res.exit_code != 0 and "does not exist" in res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["info", str(tmp_path / "empty")])
    assert res.exit_code != 0 and "not an actstore store" in res.output
