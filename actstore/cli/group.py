"""The ``actstore`` command group."""

from __future__ import annotations

import click

from actstore.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="actstore")
def main() -> None:
    """actstore: store transformer activations in Zarr, train SAEs on them, query features with SQL."""
