"""``actstore serve``: the feature browser as a local web app (Starlette + Jinja2 + a little plain JavaScript).

Pages (stable URLs, so a link can be sent to a teammate who serves the same store)::

    /                                   the store: models, layers, SAEs and crosscoders, their metrics
    /similarity                         layer-wise similarity of each row-aligned model pair (computed once)
    /sae/<sae>                          its features: sort, filter by frequency, "fires on token", "associated with label"
    /sae/<sae>/feature/<f>              one feature: histogram, density, contexts, labels, other model, crosscoder
    /sae/<sae>/feature/<f>/contexts?page=N    more contexts (an HTML fragment: the page loads it on scroll)
    /sample/<n>                         a sample: its tokens with each one's top features per SAE
    /sql?q=...                          the SQL console; /sql.csv?q=... the same as CSV; /query/<name> named queries

Read-only: the store is opened read-only and every query runs sandboxed (``browse/console.py``). Every string from
the store reaches the page through Jinja2's autoescaping (``tojson`` inside single-quoted attributes); the pages
carry a Content-Security-Policy that allows only this server's own script and style files, so even an unescaped
string could not run. Binds 127.0.0.1 unless told otherwise (``ServeConfig.public``), and answers only requests
addressed to the host it was bound to (no DNS rebinding).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from actstore.browse.config import ServeConfig
from actstore.browse.data import Browser, PageSettings, to_json
from actstore.errors import ActstoreError, ConfigError, IntegrityError, NotFoundError

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from actstore.store.reader import Store

HERE = Path(__file__).resolve().parent
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")  # fmt: skip
SHADES = 10
"""Token shading levels (CSS classes v0..v9): no inline styles, so the CSP can forbid them."""


def shade(value: float, top: float) -> int:
    """The shading level ``0..SHADES-1`` of ``value`` on a scale whose maximum is ``top``."""
    if top <= 0 or value <= 0:
        return 0
    return max(1, min(SHADES - 1, int(round(value / top * (SHADES - 1)))))


class Links:
    """URLs of the pages: the server's (``static=False``) or the static export's relative files."""

    def __init__(self, static: bool = False) -> None:
        self.static = static

    def store(self) -> str | None:
        return "index.html" if self.static else "/"

    def sae(self, sae: str) -> str | None:
        return "index.html" if self.static else f"/sae/{sae}"

    def feature(self, sae: str, feature: int) -> str | None:
        return f"feature-{int(feature)}.html" if self.static else f"/sae/{sae}/feature/{int(feature)}"

    def sample(self, sample: int) -> str | None:
        return None if self.static else f"/sample/{int(sample)}"

    def static_file(self, name: str) -> str:
        return f"static/{name}" if self.static else f"/static/{name}"


def templates() -> Any:
    """The Jinja2 environment of the pages (autoescape on for every template)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True,
                             undefined=jinja2.StrictUndefined)  # fmt: skip
    env.globals.update(shade=shade, to_json=to_json)
    env.filters["num"] = _num
    return env


def _num(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def render(env: Any, name: str, links: Links, **ctx: Any) -> str:
    return env.get_template(name).render(links=links, **ctx)


def create_app(store: Store, cfg: ServeConfig | None = None) -> Starlette:
    """The Starlette app serving ``store`` (opened read-only)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    cfg = cfg or ServeConfig()
    if store.writable:
        raise ConfigError(f"serve opens stores read-only: open {store.url} without writable=True")
    browser = Browser(store, PageSettings(cfg.page_size, cfg.context, cfg.histogram_bins))
    env = templates()
    links = Links()

    def page(name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        return HTMLResponse(render(env, name, links, store_url=store.url, **ctx), status_code=status)

    def q_int(request: Request, key: str, default: int, lo: int = 0, hi: int = 10**9) -> int:
        raw = request.query_params.get(key)
        if raw in (None, ""):
            return default
        try:
            v = int(raw)
        except ValueError:
            raise ConfigError(f"{key} must be a whole number, got {raw!r}") from None
        return max(lo, min(hi, v))

    def q_float(request: Request, key: str) -> float | None:
        raw = request.query_params.get(key)
        if raw in (None, ""):
            return None
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {raw!r}") from None

    async def home(request: Request) -> Response:
        return page("store.html", data=browser.store_page())

    async def similarity(request: Request) -> Response:
        return page("similarity.html", data=browser.similarity())

    async def sae_page(request: Request) -> Response:
        sae = request.path_params["sae"]
        data = browser.features_page(
            sae, sort=request.query_params.get("sort", "variance"), desc=request.query_params.get("desc", "1") != "0",
            token=request.query_params.get("token") or None, label=request.query_params.get("label") or None,
            min_freq=q_float(request, "min_freq"), max_freq=q_float(request, "max_freq"),
            limit=q_int(request, "limit", 100, 1, 5000), offset=q_int(request, "offset", 0),
        )  # fmt: skip
        return page("sae.html", data=data)

    async def feature_page(request: Request) -> Response:
        sae, f = request.path_params["sae"], int(request.path_params["feature"])
        data = browser.feature_page(sae, f, q_int(request, "page", 0))
        return page("feature.html", data=data, views=browser.view_names(sae))

    async def contexts(request: Request) -> Response:
        sae, f = request.path_params["sae"], int(request.path_params["feature"])
        browser.table(sae)
        rows = browser.contexts(sae, f, q_int(request, "page", 0))
        return HTMLResponse(render(env, "contexts.html", links, sae=sae, contexts=rows, views=browser.view_names(sae)))

    async def sample_page(request: Request) -> Response:
        return page("sample.html", data=browser.sample_page(int(request.path_params["sample"])))

    async def sql_page(request: Request) -> Response:
        from actstore.browse.console import run_console
        from actstore.query.named import list_queries

        q = request.query_params.get("q", "")
        result, error = None, None
        if q.strip():
            try:
                result = run_console(store, q, max_rows=cfg.max_rows, timeout=cfg.query_timeout, base=browser.console())
            except ConfigError as exc:
                error = str(exc)
        return page("sql.html", q=q, result=result, error=error, queries=list_queries(), max_rows=cfg.max_rows,
                    status=400 if error else 200)  # fmt: skip

    async def sql_csv(request: Request) -> Response:
        from actstore.browse.console import run_console

        res = run_console(store, request.query_params.get("q", ""), max_rows=cfg.max_rows, timeout=cfg.query_timeout,
                          base=browser.console())  # fmt: skip
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(res.columns)
        w.writerows(res.rows)
        return Response(buf.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="actstore-query.csv"'})  # fmt: skip

    async def named(request: Request) -> Response:
        from actstore.browse.console import named_console
        from actstore.query.named import load_query

        q = load_query(request.path_params["name"])
        given = {p.name: request.query_params.get(p.name) for p in q.params}
        result, error = None, None
        if request.query_params.get("run"):
            try:
                result = named_console(store, q.name, given, cfg.max_rows, cfg.query_timeout, browser.console())
            except ConfigError as exc:
                error = str(exc)
        return page("named.html", query=q, given=given, result=result, error=error, status=400 if error else 200)

    async def on_error(request: Request, exc: Exception) -> Response:
        status = 404 if isinstance(exc, NotFoundError) else 400 if isinstance(exc, ConfigError) else 500
        if isinstance(exc, IntegrityError):
            status = 500
        msg = str(exc) if isinstance(exc, ActstoreError) else f"{type(exc).__name__}"
        return page("error.html", status=status, message=msg, code=status)

    async def not_found(request: Request, exc: Exception) -> Response:
        return page("error.html", status=404, message=f"no page at {request.url.path}", code=404)

    async def headers(request: Request, call_next: Any) -> Response:
        resp = await call_next(request)
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Cache-Control"] = "no-store"
        return resp

    routes = [
        Route("/", home),
        Route("/similarity", similarity),
        Route("/sae/{sae}", sae_page),
        Route("/sae/{sae}/feature/{feature:int}", feature_page),
        Route("/sae/{sae}/feature/{feature:int}/contexts", contexts),
        Route("/sample/{sample:int}", sample_page),
        Route("/sql", sql_page),
        Route("/sql.csv", sql_csv),
        Route("/query/{name}", named),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    # the Host header must name this machine (no DNS rebinding); "testserver" is Starlette's TestClient
    hosts = ["*"] if cfg.public else sorted({cfg.host, "127.0.0.1", "localhost", "testserver"})
    from starlette.middleware.base import BaseHTTPMiddleware

    app = Starlette(routes=routes, exception_handlers={ActstoreError: on_error, 404: not_found, Exception: on_error},
                    middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts),
                                Middleware(BaseHTTPMiddleware, dispatch=headers)])  # fmt: skip
    app.state.browser = browser
    return app


class Bound(NamedTuple):
    """A server bound to its socket, not yet running: ``server.run(sockets=[sock])``; ``server.should_exit`` stops it."""

    server: Any
    sock: Any
    url: str


def bind(store_path: str, cfg: ServeConfig, storage_options: dict[str, Any] | None = None) -> Bound:
    """Open ``store_path`` read-only and bind the app to ``cfg.host:cfg.port`` (port 0: a free one)."""
    import socket

    import uvicorn

    from actstore.store.reader import open_store

    st = open_store(store_path, storage_options=storage_options)
    app = create_app(st, cfg)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    return Bound(server, sock, f"http://{'[' + host + ']' if ':' in host else host}:{port}/")


def serve(store_path: str, cfg: ServeConfig, storage_options: dict[str, Any] | None = None,
          ready: Any = None) -> None:  # fmt: skip
    """Serve ``store_path`` (read-only) until interrupted; ``ready(url)`` is called once it listens."""
    b = bind(store_path, cfg, storage_options)
    if ready is not None:
        ready(b.url)
    b.server.run(sockets=[b.sock])
