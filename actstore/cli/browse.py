"""The feature browser's commands: ``serve`` a store as a local web app, export an SAE's pages as a ``dashboard``."""

from __future__ import annotations

import click

from actstore.browse.config import DashboardConfig, ServeConfig
from actstore.cli.command import configured
from actstore.cli.group import main
from actstore.cli.options import handle_errors, parse_storage_options, store_argument


@main.command()
@handle_errors
@store_argument
@configured(ServeConfig)
def serve(store: str, storage_options: tuple[str, ...], cfg: ServeConfig) -> None:
    """Browse STORE in a web browser: SAEs, features, samples and SQL (read-only; 127.0.0.1 unless --public).

    Pages have stable URLs (/sae/NAME/feature/N, /sample/N, /sql?q=...): send a teammate the link.
    """
    from actstore.browse.app import serve as run

    say = lambda url: click.echo(f"serving {store} at {url} (Ctrl-C stops)")  # noqa: E731
    run(store, cfg, parse_storage_options(storage_options), ready=say)


@main.command()
@handle_errors
@store_argument
@configured(DashboardConfig)
def dashboard(store: str, storage_options: tuple[str, ...], cfg: DashboardConfig) -> None:
    """Write an SAE's feature pages as a static folder (HTML + JSON, no server) to share or attach to a paper."""
    from actstore.browse.dashboard import write_dashboard
    from actstore.store.reader import open_store

    res = write_dashboard(
        open_store(store, storage_options=parse_storage_options(storage_options)), cfg
    )
    click.echo(
        f"{store}: {len(res.features)} feature pages of {cfg.sae} in {res.out} ({res.n_bytes / 2**20:.1f} MiB, "
        f"{res.seconds:.1f}s); open {res.index}"
    )
