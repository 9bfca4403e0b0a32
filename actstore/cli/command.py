"""The config is the command: ``@configured(ExtractConfig)`` gives a command one option per field of its stage's
config and hands the command the config, built and checked once.

An option's type, default, choices and help come from the field (its annotation, default, docstring and
:func:`actstore.fields.opt`'s settings), so a default is typed once and
``--help`` shows what the stage receives (``tests/test_help.py`` checks every option of every command). A field of
type ``DataConfig`` becomes the data options (``--data``, ``--text-field``, ...; a recipe supplies the fields not
given). Fields marked ``sweep`` take comma-separated values and the command receives every combination's config
(``expand``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click

from actstore.cli.options import field_docs
from actstore.errors import ConfigError
from actstore.fields import settings
from actstore.store.config import int_list

BUILD_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "actstore_build_only", default=False
)
"""Set by :func:`building_only`: a configured command returns its config instead of running its stage."""

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}
DATA_FIELDS = ("source", "text_field", "label_field", "id_field", "limit", "labels")
"""DataConfig's fields, as the data options: ``--data`` (source), then the others."""


class ShownOption(click.Option):
    """An option whose ``--help`` default is given as text (``[default: 32]``, ``[default: expansion x d_model]``):
    the value a ``None`` default resolves to, or a default in words."""

    def __init__(self, *args: Any, shown_text: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shown_text = shown_text

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        if self.shown_text is not None:
            extra["default"] = self.shown_text
        return extra


@contextlib.contextmanager
def building_only() -> Iterator[None]:
    """Within this block a configured command returns the config it built (or the list of them) and runs nothing:
    how the tests read what a stage would receive from a command line."""
    token = BUILD_ONLY.set(True)
    try:
        yield
    finally:
        BUILD_ONLY.reset(token)


def _base_type(annotation: Any) -> str:
    """``"int | None"`` -> ``"int"``; ``"list[int] | None"`` -> ``"list[int]"`` (a string annotation, or a type where
    the module does not postpone annotations)."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    parts = [p.strip() for p in text.split("|") if p.strip() != "None"]
    return parts[0] if len(parts) == 1 else " | ".join(parts)


def parse_list(raw: str, item: str, option: str) -> list[Any]:
    """``"2,4,6"`` -> ``[2, 4, 6]`` for ``item`` int (ranges ``0-3`` too, read as ``--layers`` is:
    :func:`actstore.store.config.int_list`), float or str; BadParameter naming ``option`` otherwise."""
    if item == "int":
        try:
            return int_list(raw, f"{option} values", option)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None
    out: list[Any] = []
    for part in (p.strip() for p in str(raw).split(",")):
        if not part:
            continue
        try:
            out.append(_SCALARS.get(item, str)(part))
        except ValueError:
            raise click.BadParameter(
                f"{part!r} is not a{'n' if item == 'int' else ''} {item}", param_hint=option
            ) from None
    return out


@dataclasses.dataclass
class FieldOption:
    """One field's option: how click declares it and how its value becomes the field's."""

    field: str
    param: str
    """The click parameter's name (the field's, or ``data_<field>`` for the data options)."""
    decls: tuple[str, ...]
    kw: dict[str, Any]
    convert: Callable[[Any], Any] | None = None
    sweep_item: str | None = None
    """The item type of a swept field (its value is a list of these)."""
    shown: Any = None
    """The default ``--help`` shows: the value the stage receives when the option is omitted."""
    argument: bool = False
    """Given as a positional argument rather than an option."""
    choices: tuple[str, ...] | None = None
    """The values allowed (each of a swept field's)."""

    def sweep_values(self, raw: str | None) -> list[Any]:
        """A swept option's comma-separated values, each checked against the choices."""
        if raw is None:
            return [None]
        values = parse_list(raw, self.sweep_item or "str", self.decls[0])
        bad = [v for v in values if self.choices and v not in self.choices]
        if bad:
            raise click.BadParameter(
                f"{bad[0]!r} is not one of {', '.join(self.choices or ())}",
                param_hint=self.decls[0],
            )
        return values

    def option(self) -> Callable[[Callable], Callable]:
        if self.argument:
            return click.argument(
                self.param, metavar=self.field.upper(), type=self.kw.get("type", str)
            )
        kw = dict(self.kw)
        text = kw.pop("show_default", None)
        if isinstance(text, str):
            kw.update(cls=ShownOption, shown_text=text)
        elif text is not None:
            kw["show_default"] = text
        return click.option(*self.decls, self.param, **kw)


def field_option(
    cls: type,
    f: dataclasses.Field,
    shown_override: Any = dataclasses.MISSING,
    sweep: bool = True,
    required: bool = False,
) -> FieldOption:
    """The option of field ``f`` of config dataclass ``cls`` (``sweep``: comma lists where the field allows them;
    ``required``: the command needs it although the field has a default)."""
    s = settings(f)
    s["sweep"] = s["sweep"] and sweep
    doc = field_docs(cls).get(f.name, "")
    names = s["names"] or (f"--{f.name.replace('_', '-')}",)
    default: Any = f.default
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    required = required or default is dataclasses.MISSING
    typ = _base_type(f.type)
    kw: dict[str, Any] = {"help": doc}
    out = FieldOption(f.name, f.name, tuple(names), kw)
    shown = s["resolved"] if default is None or required else default
    if shown_override is not dataclasses.MISSING:
        shown = shown_override
    out.shown = shown
    if typ == "bool":
        if s["flag"]:
            out.decls = (s["flag"],)
            yes, no = (x.strip().lstrip("-") for x in s["flag"].split("/"))
            kw.update(
                default=default, show_default=None if shown is None else (yes if shown else no)
            )
        elif default is True:  # a True default needs a way to turn it off
            n = f.name.replace("_", "-")
            out.decls = (f"--{n}/--no-{n}",)
            kw.update(default=True, show_default=True)
        else:
            kw.update(is_flag=True, default=bool(default))
        return out
    if s["sweep"]:
        item = typ if typ in _SCALARS else "str"
        out.sweep_item = item
        kw.update(
            type=str,
            metavar=s["metavar"] or f"{f.name.upper()}[,{f.name.upper()}...]",
            help=f"{doc} Comma-separated values make a sweep.",
        )
        if not required:
            kw["default"] = None if default is None else str(default)
    elif s["multiple"]:
        kw.update(
            multiple=True, required=required, default=None if required else tuple(default or ())
        )
        out.convert = lambda v: list(v) if v else ([] if default is not None else None)
    elif typ in _SCALARS:
        kw["type"] = _SCALARS[typ]
    elif typ.startswith(("list[", "tuple[")) and "|" not in typ:
        item = typ[typ.index("[") + 1 : -1].split(",")[0].strip()
        kw["type"] = str
        kw.setdefault("metavar", f"{item.upper()}[,{item.upper()}...]")
        is_tuple = typ.startswith("tuple[")
        out.convert = lambda v, item=item, hint=names[0], t=is_tuple: (
            None
            if v is None
            else (tuple if t else list)(parse_list(v, item, hint))
            if isinstance(v, str)
            else v
        )
        if isinstance(default, list | tuple):
            kw["default"] = ",".join(map(str, default))
    else:  # a union such as ``list[int] | str``: the config parses the text itself
        kw["type"] = str
    if s["choices"] and out.sweep_item is None:
        kw["type"] = click.Choice(s["choices"])
    out.choices = s["choices"]
    # a sweep's metavar only when swept
    if s["metavar"] and not (s["metavar"].endswith("...]") and not s["sweep"]):
        kw["metavar"] = s["metavar"]
    if required:
        kw["required"] = True
    elif "default" not in kw:
        kw["default"] = default
    text = _shown_text(shown, s)
    if text is not None and not s["multiple"]:
        kw["show_default"] = text
    return out


def _shown_text(shown: Any, s: dict[str, Any]) -> str | None:
    if s["shown"]:
        return str(s["shown"])
    if (
        shown is dataclasses.MISSING
        or shown is None
        or shown is False
        or shown == ()
        or shown == []
    ):
        return None
    if isinstance(shown, list | tuple):
        return ",".join(map(str, shown))
    return str(shown)


def data_options(data_cls: type) -> list[FieldOption]:
    """The data options of a config with a ``DataConfig`` field: ``--data`` (required) and the fields, which are
    None when not given, so that a recipe's own field stays unless the option is passed (even as its default)."""
    fields = {f.name: f for f in dataclasses.fields(data_cls)}
    docs = field_docs(data_cls)
    out = [
        FieldOption(
            "source", "data_source", ("--data",), {"required": True, "help": docs["source"]}
        )
    ]
    for name in DATA_FIELDS[1:]:
        f = fields[name]
        typ = _base_type(f.type)
        kw: dict[str, Any] = {"default": None, "help": docs[name]}
        if typ in _SCALARS:
            kw["type"] = _SCALARS[typ]
        if f.default not in (None, dataclasses.MISSING):
            kw["show_default"] = f"{f.default}, or the recipe's"
        opt = FieldOption(
            name, f"data_{name}", (f"--{name.replace('_', '-')}",), kw, shown=f.default
        )
        if typ.startswith("tuple["):
            kw["metavar"] = "LABEL[,LABEL...]"
        out.append(opt)
    return out


def configured(
    cls: type,
    *,
    skip: Sequence[str] = (),
    shown: dict[str, Any] | None = None,
    fixed: dict[str, Any] | None = None,
    required: Sequence[str] = (),
    arguments: Sequence[str] = (),
    expand: Callable[[dict[str, Any], dict[str, list[Any]]], list[Any]] | None = None,
    choices: dict[str, Sequence[str]] | None = None,
) -> Callable[[Callable], Callable]:
    """Options for every field of ``cls`` (less ``skip`` and fields marked ``cli=False``); the decorated command
    receives ``cfg`` (the built config) instead of them, or ``cfgs`` (every combination of the swept fields,
    built by ``expand(values, sweeps)``) when given (without it, fields are not swept). ``required`` are fields the
    command needs although they have defaults; ``arguments`` are fields given as positional arguments, in that
    order. ``shown`` overrides the default a field
    shows where the command resolves it otherwise (train-crosscoder's ``arch``); ``fixed`` are fields the command
    sets itself; ``choices`` narrows a field's choices for this command (train-crosscoder's ``arch``)."""
    opts: list[FieldOption] = []
    data_cls = None
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in (fixed or {}) or not settings(f)["cli"]:
            continue
        if _base_type(f.type) == "DataConfig":
            from actstore.data.corpora import DataConfig

            data_cls = DataConfig
            opts += data_options(DataConfig)
            continue
        o = field_option(
            cls,
            f,
            (shown or {}).get(f.name, dataclasses.MISSING),
            expand is not None,
            f.name in required,
        )
        if f.name in arguments:
            o.argument = True
        if f.name in (choices or {}):
            o.choices = tuple((choices or {})[f.name])
            if isinstance(o.kw.get("type"), click.Choice):
                o.kw["type"] = click.Choice(o.choices)
        opts.append(o)
    opts.sort(key=lambda o: (not o.argument, list(arguments).index(o.field) if o.argument else 0))

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values: dict[str, Any] = dict(fixed or {})
            sweeps: dict[str, list[Any]] = {}
            data: dict[str, Any] = {}
            for o in opts:
                v = kwargs.pop(o.param)
                if o.param.startswith("data_"):
                    data[o.field] = v
                elif o.sweep_item is not None:
                    sweeps[o.field] = o.sweep_values(v)
                else:
                    values[o.field] = o.convert(v) if o.convert else v
            if data_cls is not None:
                from actstore.data.corpora import data_config

                values["data"] = data_config(**data)
            if expand is not None:
                built: Any = expand(values, sweeps)
                name = "cfgs"
            else:
                built = cls(**values, **{k: v[0] for k, v in sweeps.items()})
                name = "cfg"
            if BUILD_ONLY.get():
                return built
            return fn(*args, **{name: built}, **kwargs)

        command: Any = wrapper
        for o in reversed(opts):
            command = o.option()(command)
        command.field_options = opts  # the tests read what each option maps to
        return command

    return deco


def config_option(cls: type, name: str, *decls: str, **kw: Any) -> Callable[[Callable], Callable]:
    """The option of field ``name`` of ``cls``, built as :func:`configured` builds it, for a command that takes the
    value itself (``decls``: other names; ``kw``: what the field cannot say, e.g. ``multiple``)."""
    o = field_option(cls, {f.name: f for f in dataclasses.fields(cls)}[name], sweep=False)
    o.decls = decls or o.decls
    o.kw.update(kw)
    return o.option()


def config_options(cls: type) -> Callable[..., Callable[[Callable], Callable]]:
    """``opt = config_options(CopyConfig)`` then ``@opt("jobs")``: the options of one config, briefly."""
    return functools.partial(config_option, cls)
