"""The feature browser's commands: ``serve`` a store as a local web app, export an SAE's pages as a ``dashboard``."""

from __future__ import annotations

import click

from actstore.browse.config import DashboardConfig, ServeConfig
from actstore.cli.group import main
from actstore.cli.options import config_options, handle_errors, parse_storage_options, store_argument

_serve, _dash = config_options(ServeConfig), config_options(DashboardConfig)


@main.command()
@store_argument
@_serve("host")
@_serve("port")
@_serve("public")
@_serve("max_rows")
@_serve("query_timeout")
@_serve("max_result_mb")
@_serve("query_workers")
@_serve("query_memory_mb")
@_serve("page_size")
@_serve("context")
@handle_errors
def serve(store: str, storage_options: tuple[str, ...], host: str, port: int, public: bool, max_rows: int,
          query_timeout: float, max_result_mb: float, query_workers: int, query_memory_mb: int, page_size: int,
          context: int) -> None:  # fmt: skip
    """Browse STORE in a web browser: SAEs, features, samples and SQL (read-only; 127.0.0.1 unless --public).

    Pages have stable URLs (/sae/NAME/feature/N, /sample/N, /sql?q=...): send a teammate the link.
    """
    from actstore.browse.app import serve as run

    cfg = ServeConfig(host=host, port=port, public=public, max_rows=max_rows, query_timeout=query_timeout,
                      max_result_mb=max_result_mb, query_workers=query_workers, query_memory_mb=query_memory_mb,
                      page_size=page_size, context=context)  # fmt: skip
    say = lambda url: click.echo(f"serving {store} at {url} (Ctrl-C stops)")  # noqa: E731
    run(store, cfg, parse_storage_options(storage_options), ready=say)


@main.command()
@store_argument
@_dash("sae", required=True)
@_dash("out", required=True, type=click.Path(file_okay=False))
@_dash("features")
@_dash("top")
@_dash("contexts")
@_dash("context")
@handle_errors
def dashboard(store: str, storage_options: tuple[str, ...], sae: str, out: str, features: str | None, top: int, contexts: int,
              context: int) -> None:  # fmt: skip
    """Write an SAE's feature pages as a static folder (HTML + JSON, no server) to share or attach to a paper."""
    from actstore.browse.dashboard import write_dashboard
    from actstore.store.reader import open_store

    cfg = DashboardConfig(sae=sae, out=out, features=features, top=top, contexts=contexts, context=context)
    res = write_dashboard(open_store(store, storage_options=parse_storage_options(storage_options)), cfg)
    click.echo(f"{store}: {len(res.features)} feature pages of {sae} in {res.out} ({res.n_bytes / 2**20:.1f} MiB, "
               f"{res.seconds:.1f}s); open {res.index}")  # fmt: skip
