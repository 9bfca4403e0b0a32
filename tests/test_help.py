"""Help that does not lie (issue 30, the defects it names): no reST markup in any ``--help``; train-crosscoder says the
architecture it uses by default; --epochs says what the config does with --tokens; a layer range parses for a
crosscoder's sources as it does for a sweep."""

from __future__ import annotations

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
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(option + " ") or line.strip() == option)
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
    assert "batchtopk (default)" in arch and "relu-l1 (default)" not in arch


def test_epochs_help_says_tokens_cannot_come_with_it():
    epochs = option_help("train", "--epochs")
    assert "ignored" not in epochs and "not both" in epochs
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(model="m", layer=1, epochs=2, tokens=1000)


def test_a_layer_range_gives_a_crosscoder_its_sources_in_order():
    assert parse_sources("a", "0-2") == [Source("a", 0), Source("a", 1), Source("a", 2)]
    with pytest.raises(ConfigError, match="runs backwards"):
        parse_sources("a", "4-2")
    assert parse_sources("a,b", "3,1") == [Source("a", 3), Source("b", 1)]  # order kept: model i at layer i
    assert parse_layers("0-2") == [0, 1, 2]


def test_quiet_is_one_option_with_one_wording():
    helps = {c: option_help(c, "--quiet") for c in COMMANDS if "--quiet" in main.commands[c].get_help(click.Context(main))}
    assert len(helps) >= 7 and set(helps.values()) == {"--quiet No progress bars."}
