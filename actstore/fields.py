"""Config fields that carry their command-line option: ``opt(default, choices=..., ...)``.

Each stage's config dataclass is the one place its settings are typed: a field's default, its docstring (the string
under it) and what this module adds (choices, a flag's spelling, option names, the value a ``None`` default resolves
to) are all the CLI needs to generate the option (``actstore.cli.command.config_command``). Adding an option to a
command is adding a field. Imports nothing, so every config module may use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

KEY = "actstore.cli"
"""The key of a field's metadata that holds its option's settings."""


def opt(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | Any = dataclasses.MISSING,
    choices: Sequence[str] | None = None,
    names: Sequence[str] = (),
    flag: str | None = None,
    metavar: str | None = None,
    resolved: Any = dataclasses.MISSING,
    shown: str | None = None,
    multiple: bool = False,
    sweep: bool = False,
    cli: bool = True,
    kw_only: bool = False,
) -> Any:
    """A dataclass field with what its option needs beyond the default and docstring.

    ``choices``: the values allowed (click.Choice); ``names``: the option's names (default ``--field-name``);
    ``flag``: a boolean's spelling, ``--x/--no-x`` (its default then shows as the one it resolves to);
    ``resolved``: what a ``None`` default becomes when not given (shown as the default in ``--help``, and checked
    against the stage by ``tests/test_help.py``); ``shown``: the default in words where it depends on the data or the
    model (``min(512, the model's limit)``); ``multiple``: a list given by repeating the option (``--sae A --sae B``;
    otherwise lists are comma separated); ``sweep``: ``train`` takes comma-separated values and trains each;
    ``cli=False``: not an option (set by code, or saved provenance).
    """
    meta = {
        KEY: {
            "choices": tuple(choices) if choices else None,
            "names": tuple(names),
            "flag": flag,
            "metavar": metavar,
            "resolved": resolved,
            "shown": shown,
            "multiple": multiple,
            "sweep": sweep,
            "cli": cli,
        }
    }
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta, kw_only=kw_only)
    return dataclasses.field(default=default, metadata=meta, kw_only=kw_only)


def cli(**kw: Any) -> dict[str, Any]:
    """The metadata of a required field with option settings (those of :func:`opt`):
    ``format: str = field(metadata=cli(choices=FORMATS))``, a plain ``field`` as type checkers read dataclasses."""
    return dict(opt(**kw).metadata)


def settings(f: dataclasses.Field) -> dict[str, Any]:
    """A field's option settings (those of :func:`opt`, or the defaults for a plain field)."""
    base = {
        "choices": None,
        "names": (),
        "flag": None,
        "metavar": None,
        "resolved": dataclasses.MISSING,
        "shown": None,
        "multiple": False,
        "sweep": False,
        "cli": True,
    }
    return {**base, **(f.metadata.get(KEY) or {})}
