"""Options and helpers shared by the commands: the store argument, data options, output formats, errors."""

from __future__ import annotations

import ast
import functools
import inspect
import json
import re
from collections.abc import Callable
from typing import Any

import click

from actstore.errors import ActstoreError


def handle_errors(fn: Callable) -> Callable:
    """Turn ActstoreError (and a few user-facing built-ins) into a clean CLI error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (
            ActstoreError
        ) as exc:  # messages may quote a store's strings: shown, never obeyed by the terminal
            raise click.ClickException(terminal_safe(str(exc))) from None
        except OSError as exc:  # the disk or the network, not a bug: one line that says what to do
            raise click.ClickException(terminal_safe(os_error_message(exc))) from None
        except ModuleNotFoundError as exc:  # an optional part of actstore that is not installed
            extra = EXTRAS.get((exc.name or "").split(".")[0])
            if extra is None:
                raise
            raise click.ClickException(
                f"this command needs {exc.name}, which is not installed: pip install 'actstore[{extra}]'"
            ) from None

    return wrapper


EXTRAS = {
    "torch": "compute",
    "transformers": "compute",
    "safetensors": "compute",
    "matplotlib": "plots",
    "xarray": "xarray",
    "dask": "xarray",
    "s3fs": "remote",
    "gcsfs": "remote",
    "adlfs": "remote",
}
"""Optional package -> the actstore extra that installs it (pyproject.toml)."""


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system error (disk full, permission denied, ...) and what to do about it."""
    import errno

    where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
    what = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full{where} ({what}): free some space and rerun the same command; it resumes where it stopped"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not allowed{where} ({what}): choose a path you can write, or fix its permissions"
    return f"{what}{where.replace(' writing', ' at')}: check the path or connection and rerun"


def key_values(
    values: tuple[str, ...], param_hint: str, form: str = "key=value"
) -> list[tuple[str, str]]:
    """``("a=1", "b=x")`` -> ``[("a", "1"), ("b", "x")]``; anything without ``=`` or a key is refused."""
    out = []
    for item in values:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not {form}", param_hint=param_hint)
        out.append((key, val))
    return out


def parse_storage_options(values: tuple[str, ...]) -> dict[str, Any]:
    return {
        k: {"true": True, "false": False}.get(v.lower(), v)
        for k, v in key_values(values, "--storage-option")
    }


# ---- shared option decorators ------------------------------------------------
def store_argument(fn: Callable) -> Callable:
    """``STORE`` and ``--storage-option``."""
    fn = click.argument("store", metavar="STORE")(fn)
    return storage_option(fn)


def storage_option(fn: Callable) -> Callable:
    """``--storage-option KEY=VALUE``, the same on every command that opens a store."""
    return click.option(
        "--storage-option",
        "storage_options",
        multiple=True,
        metavar="KEY=VALUE",
        help="Option for a remote store's filesystem (fsspec), e.g. endpoint_url=http://127.0.0.1:9000.",
    )(fn)


quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")
"""``--quiet``, the same on every command that shows progress."""


def output_format_option(fn: Callable) -> Callable:
    fn = click.option(
        "--format",
        "fmt",
        type=click.Choice(["table", "csv", "json", "parquet"]),
        default="table",
        show_default=True,
        help="Output format.",
    )(fn)
    return click.option(
        "--out",
        type=click.Path(dir_okay=False),
        default=None,
        help="Write the result to this file.",
    )(fn)


def device_option(fn: Callable) -> Callable:
    return click.option(
        "--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."
    )(fn)


def writable_option(fn: Callable) -> Callable:
    """``--writable``: open a URL store for writing (URLs are read-only otherwise)."""
    return click.option(
        "--writable",
        is_flag=True,
        help="Allow writing to a store given by URL (read-only otherwise).",
    )(fn)


def ray_option(what: str) -> Callable[[Callable], Callable]:
    """``--ray [ADDRESS]``: run ``what`` on Ray, a local one (no address) or the cluster at ADDRESS."""

    def deco(fn: Callable) -> Callable:
        return click.option(
            "--ray",
            "ray_address",
            is_flag=False,
            flag_value="local",
            default=None,
            metavar="[ADDRESS]",
            help=f"{what} on Ray: a local Ray, or the cluster at ADDRESS (one GPU each when the cluster has GPUs).",
        )(fn)

    return deco


def break_lock_option(fn: Callable) -> Callable:
    return click.option(
        "--break-lock",
        is_flag=True,
        help="Take over write locks left by a writer that died on another host (same-host dead writers are detected).",
    )(fn)


CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""Characters a terminal acts on rather than shows (escape sequences, carriage return, bidi overrides); newline and
tab stay."""


def terminal_safe(text: str) -> str:
    """``text`` with every control character written as a visible escape (``\\x1b``, ``\\u202e``)."""
    return CONTROL_CHARS.sub(lambda m: ascii(m.group())[1:-1], text)


def emit_text(text: str, out: str | None = None) -> None:
    """Text for the user: to ``out`` (whole or not at all), or to standard output, byte-exact to a pipe or file
    and with control characters escaped on a terminal (a store's strings cannot drive the terminal)."""
    from actstore.storage.files import is_terminal, write_file, write_stdout

    if out:
        write_file(out, text.encode("utf-8", "backslashreplace"))
        return
    write_stdout(
        (terminal_safe(text) if is_terminal() else text).encode("utf-8", "backslashreplace")
    )


def emit(df: Any, fmt: str, out: str | None) -> None:
    """Print or save a polars DataFrame in the chosen format (files: whole or not at all; see ``emit_text``)."""
    import polars as pl

    from actstore.storage.files import write_file

    if fmt == "parquet":
        if not out:
            raise click.UsageError("--format parquet needs --out FILE")
        write_file(out, df.write_parquet)
        click.echo(f"wrote {df.height} rows to {out}", err=True)
        return
    if fmt == "csv":
        text = df.write_csv()
    elif fmt == "json":
        text = json.dumps(df.to_dicts(), indent=2, default=str) + "\n"
    else:
        with pl.Config(
            tbl_rows=max(df.height, 1), tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200
        ):
            text = str(df) + "\n"
    emit_text(text, out)
    if out:
        click.echo(f"wrote {df.height} rows to {out}", err=True)


# ---- encode / query --------------------------------------------------------------
def parse_params(values: tuple[str, ...]) -> dict[str, str]:
    return {k.strip(): v for k, v in key_values(values, "--param", "name=value")}


def sae_options(fn: Callable) -> Callable:
    fn = click.option("--sae", default=None, help="SAE name (needed when the layer has several).")(
        fn
    )
    fn = click.option(
        "--model",
        default=None,
        help="Model key in the store (needed when several models have the layer).",
    )(fn)
    return click.option(
        "--layer", type=int, default=None, help="Layer of the SAE (hidden_states index)."
    )(fn)


# ---------------------------------------------------------------- options from config fields
@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """A config dataclass's field docstrings (the string under each field), as ``--help`` shows them: reST literals
    plain, lines joined. A default is never restated here: ``--help`` shows the field's (or the value a ``None``
    default resolves to, :func:`actstore.fields.opt`'s ``resolved``)."""
    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    for stmt, nxt in zip(body, body[1:], strict=False):
        is_field = isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
        is_doc = (
            isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        )
        if is_field and is_doc:
            docs[stmt.target.id] = nxt.value.value.strip()  # type: ignore[union-attr]
    return {
        k: " ".join(re.sub(r"``(.+?)``", r"\1", v, flags=re.S).split()) for k, v in docs.items()
    }
