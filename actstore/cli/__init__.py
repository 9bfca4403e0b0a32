"""The ``actstore`` command line: thin commands that parse options, call one library function, and turn
actstore's errors into one-line messages. ``main`` is the group; importing this package registers every command."""

from actstore.cli import browse, crosscoders, effects, evals, interop, read, write  # noqa: F401 - registers the commands
from actstore.cli.group import main

__all__ = ["main"]
