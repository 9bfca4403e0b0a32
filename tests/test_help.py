"""Help that does not lie: for every command and option the default ``--help`` shows is the value the stage receives
when the option is omitted; every command has help and an example in the docs; no reST markup in any ``--help``;
train-crosscoder says the architecture it uses by default; --epochs says what the config does with --tokens; a layer
range parses for a crosscoder's sources as it does for a sweep."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from actstore.cli import main
from actstore.errors import ConfigError
from actstore.sae.config import TrainConfig
from actstore.store.config import Source, parse_layers, parse_sources

COMMANDS = sorted(main.commands)


def option_help(command: str, option: str) -> str:
    """The help text of ``option`` in ``actstore COMMAND --help``, its wrapped lines joined."""
    lines = CliRunner().invoke(main, [command, "--help"], terminal_width=100).output.splitlines()
    start = next(
        i
        for i, line in enumerate(lines)
        if line.lstrip().startswith(option + " ") or line.strip() == option
    )
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if line.lstrip().startswith("-") or not line.startswith("    "):
            break
        block.append(line)
    return " ".join(" ".join(block).split())


@pytest.mark.parametrize("command", COMMANDS)
def test_no_rest_markup_in_help(command):
    out = CliRunner().invoke(main, [command, "--help"], terminal_width=200).output
    assert "``" not in out, f"actstore {command} --help shows reST markup"


def test_train_crosscoder_help_names_the_architecture_it_uses():
    arch = option_help("train-crosscoder", "--arch")
    assert "[default: batchtopk]" in arch and "[default: relu-l1]" not in arch


def test_train_crosscoder_offers_only_what_a_crosscoder_can_be():
    """Its --arch choices are the architectures a crosscoder may have, and it has none of the options only SAEs'
    architectures read (Matryoshka's prefixes, a transcoder's sites)."""
    out = CliRunner().invoke(main, ["train-crosscoder", "--help"], terminal_width=200).output
    assert "--arch [relu-l1|topk|batchtopk]" in out
    for flag in ("--matryoshka-widths", "--source", "--target", "--skip"):
        assert flag not in out, flag
    r = CliRunner().invoke(main, ["train-crosscoder", "s.zarr", "--models", "a,b", "--layer", "1", "--arch",
                                  "transcoder"])  # fmt: skip
    assert r.exit_code == 2 and "'transcoder' is not one of" in r.output


def test_epochs_help_says_tokens_cannot_come_with_it():
    epochs = option_help("train", "--epochs")
    assert "ignored" not in epochs and "not both" in epochs
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(model="m", layer=1, epochs=2, tokens=1000)


def test_a_layer_range_gives_a_crosscoder_its_sources_in_order():
    assert parse_sources("a", "0-2") == [Source("a", 0), Source("a", 1), Source("a", 2)]
    with pytest.raises(ConfigError, match="runs backwards"):
        parse_sources("a", "4-2")
    assert parse_sources("a,b", "3,1") == [
        Source("a", 3),
        Source("b", 1),
    ]  # order kept: model i at layer i
    assert parse_layers("0-2") == [0, 1, 2]


def test_quiet_is_one_option_with_one_wording():
    helps = {
        c: option_help(c, "--quiet")
        for c in COMMANDS
        if "--quiet" in main.commands[c].get_help(click.Context(main))
    }
    assert len(helps) >= 7 and set(helps.values()) == {"--quiet No progress bars."}


# ---------------------------------------------------------------- every default shown is the default received
REQUIRED = {
    "train-crosscoder": ["--models", "a,b", "--layer", "1"],
    "train": ["--model", "m", "--layer", "1"],
}
"""Command lines that satisfy a command's required options where a generic value would not (a crosscoder needs two
sources)."""
D_IN = 768
"""The layer width a TrainConfig is resolved at to read what its run receives (bert-base's)."""


def minimal_args(cmd: click.Command, name: str) -> list[str]:
    """The fewest arguments the command accepts: its positional arguments and required options, each a plain value
    (a Choice's first choice, 1 for numbers, ``x`` otherwise)."""
    args: list[str] = []
    extra = REQUIRED.get(name, [])
    for p in cmd.params:
        if isinstance(p, click.Argument):
            args.append("1")
        elif p.required and p.opts[0] not in extra:
            value = p.type.choices[0] if isinstance(p.type, click.Choice) else "1"
            args += [p.opts[0], str(value)]
    return args + extra


def built_config(name: str, args: list[str]):
    """What the configured command ``name`` would hand its stage for ``args`` (nothing runs)."""
    from actstore.cli.command import building_only

    with building_only():
        return main.main([name, *args], standalone_mode=False)


def received(cfg, field: str):
    """A field's value as the stage receives it: a training config resolved at a layer of width D_IN (where an
    expansion is received as the width it gives)."""
    if isinstance(cfg, list):
        cfg = cfg[0]
    if isinstance(cfg, TrainConfig):
        cfg = cfg.resolve(D_IN)
        if field == "expansion":
            return cfg.d_sae / D_IN
    return getattr(cfg, field)


CONTEXT = {("train", "k"): ["--arch", "topk"], ("train-crosscoder", "l1"): ["--arch", "relu-l1"]}
"""Options that apply to one architecture, read where they apply (k is topk's, l1 relu-l1's)."""


def shown_default(name: str, option: str) -> str | None:
    text = option_help(name, option)
    m = re.search(r"\[default: (.*?)\]", text)
    return m.group(1) if m else None


CONFIGURED = [c for c in COMMANDS if hasattr(main.commands[c].callback, "field_options")]


def test_the_stages_commands_are_built_from_their_configs():
    assert {
        "extract",
        "train",
        "train-crosscoder",
        "encode",
        "finetune",
        "report",
        "demo",
        "import-sae",
        "serve",
        "dashboard",
        "export-features",
        "diff-crosscoder",
    } <= set(CONFIGURED)


def lies(name: str) -> tuple[list[str], int]:
    """Where ``actstore NAME --help`` shows a default the stage does not receive when the option is omitted, and
    how many options were compared (required ones, arguments and defaults in words have no single value)."""
    from actstore.fields import settings

    cmd = main.commands[name]
    base = minimal_args(cmd, name)
    cls = type(built_config(name, base)[0] if name == "train" else built_config(name, base))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out, checked = [], 0
    for o in cmd.callback.field_options:
        if (
            o.argument
            or o.param.startswith("data_")
            or o.kw.get("required")
            or settings(fields[o.field])["shown"]
        ):
            continue
        opt = o.decls[0].split("/")[0]
        cfg = built_config(name, base + CONTEXT.get((name, o.field), []))
        shown, got = shown_default(name, opt), received(cfg, o.field)
        if isinstance(got, bool) and "/" in o.decls[0]:
            want = o.decls[0].split("/")[0 if got else 1].strip().lstrip("-")
        elif isinstance(got, list | tuple):
            want = ",".join(map(str, got)) or None
        else:
            want = None if got is None or got is False else str(got)
        if shown != want:
            out.append(f"{name} {opt}: --help shows {shown!r}, the stage receives {got!r}")
        checked += 1
    return out, checked


@pytest.mark.parametrize("name", CONFIGURED)
def test_every_default_shown_is_the_value_the_stage_receives(name):
    wrong, checked = lies(name)
    assert not wrong and checked >= 2, "\n".join(wrong)


def test_the_help_check_catches_a_default_that_lies(monkeypatch):
    """A config whose field says one default while the stage gets another is caught."""
    from actstore.encoding.config import EncodeConfig

    real = EncodeConfig.__post_init__

    def lying(self):
        real(self)
        self.batch_rows = 1  # the stage would get 1 while --help says 8192

    monkeypatch.setattr(EncodeConfig, "__post_init__", lying)
    assert lies("encode")[0] == ["encode --batch-rows: --help shows '8192', the stage receives 1"]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_and_an_example_in_the_docs(name):
    """sqlite-utils' rule: a command nobody can find an example of does not exist for its users."""
    cmd = main.commands[name]
    assert (cmd.help or "").strip(), f"actstore {name} has no help text"
    docs = [
        Path(__file__).resolve().parents[1] / "README.md",
        *(Path(__file__).resolve().parents[1] / "docs").glob("*.md"),
    ]
    assert any(f"actstore {name} " in p.read_text(encoding="utf-8") for p in docs), (
        f"no example of actstore {name}"
    )
