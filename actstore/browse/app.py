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

import contextlib
import csv
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from actstore.browse.config import ServeConfig
from actstore.browse.data import Browser, PageSettings, to_json
from actstore.browse.workers import GRACE_S
from actstore.errors import ActstoreError, ConfigError, IntegrityError, NotFoundError

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from actstore.store.reader import Store

HERE = Path(__file__).resolve().parent
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SHADES = 10
"""Token shading levels (CSS classes v0..v9): no inline styles, so the CSP can forbid them."""


class TooManyQueries(ConfigError):
    """A client's second console query while its first still runs (HTTP 429)."""


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
        return (
            f"feature-{int(feature)}.html" if self.static else f"/sae/{sae}/feature/{int(feature)}"
        )

    def sample(self, sample: int) -> str | None:
        return None if self.static else f"/sample/{int(sample)}"

    def static_file(self, name: str) -> str:
        return f"static/{name}" if self.static else f"/static/{name}"


def templates() -> Any:
    """The Jinja2 environment of the pages (autoescape on for every template)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
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


def host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port: ``[::1]:8765`` -> ``::1``, ``localhost:80`` -> ``localhost``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    name, sep, port = header.rpartition(":")
    return name if sep and port.isascii() and port.isdigit() else header


def allowed_hosts(cfg: ServeConfig) -> set[str] | None:
    """The ``Host`` names the server answers (None: any, with ``public``): the bound host and this machine's names."""
    if cfg.public:
        return None
    return {cfg.host.strip("[]").lower(), "127.0.0.1", "localhost"} | (
        {"::1"} if ":" in cfg.host else set()
    )


MAX_STEER_TEXT = 2000
"""Characters of text the steering form runs at most."""


def create_app(store: Store, cfg: ServeConfig | None = None) -> Starlette:
    """The Starlette app serving ``store`` (opened read-only).

    Page work (DuckDB and Parquet reads) runs in one worker thread and console queries in query processes
    (``browse/workers.py``), so the event loop keeps serving static files and other clients while they run."""
    import functools

    import anyio
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, PlainTextResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from actstore.browse.console import named_sql, timed_out
    from actstore.browse.workers import QueryPool

    cfg = cfg or ServeConfig()
    if store.writable:
        raise ConfigError(f"serve opens stores read-only: open {store.url} without writable=True")
    browser = Browser(store, PageSettings(cfg.page_size, cfg.context, cfg.histogram_bins))
    env = templates()
    links = Links()
    max_bytes = int(cfg.max_result_mb * 2**20)
    # a store no other process can open, or no POSIX pipes to talk to one: threads, without the memory cap
    in_process = store.url.startswith("memory://") or os.name != "posix"
    pool = (
        None
        if in_process
        else QueryPool(store.url, store.loc.storage_options, cfg.query_workers, cfg.query_memory_mb)
    )
    # the Browser's caches and connection: one page at a time
    page_limiter = anyio.CapacityLimiter(1)
    query_limiter = anyio.CapacityLimiter(cfg.query_workers)
    busy: set[str] = set()  # clients with a console query running

    def run_query(sql: str, params: dict[str, Any] | None) -> Any:
        if pool is not None:
            return pool.run(sql, params, cfg.max_rows, cfg.query_timeout, max_bytes)
        from actstore.browse.console import run_console

        return run_console(
            store, sql, params, cfg.max_rows, cfg.query_timeout, browser.console(), max_bytes
        )

    async def off_loop(fn: Any, *args: Any, limiter: Any = page_limiter) -> Any:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=limiter)

    def page_html(name: str, **ctx: Any) -> str:
        return render(env, name, links, store_url=store.url, **ctx)

    async def page(name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        return HTMLResponse(
            await off_loop(functools.partial(page_html, name, **ctx)), status_code=status
        )

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
            v = float(raw)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {raw!r}") from None
        if v != v:
            raise ConfigError(f"{key} must be a number, got {raw!r}")
        return v

    async def home(request: Request) -> Response:
        return await page("store.html", data=await off_loop(browser.store_page))

    async def similarity(request: Request) -> Response:
        return await page("similarity.html", data=await off_loop(browser.similarity))

    async def sae_page(request: Request) -> Response:
        sae = request.path_params["sae"]
        get = functools.partial(
            browser.features_page,
            sae,
            sort=request.query_params.get("sort", "variance"),
            desc=request.query_params.get("desc", "1") != "0",
            token=request.query_params.get("token") or None,
            label=request.query_params.get("label") or None,
            min_freq=q_float(request, "min_freq"),
            max_freq=q_float(request, "max_freq"),
            limit=q_int(request, "limit", 100, 1, 5000),
            offset=q_int(request, "offset", 0),
        )
        return await page("sae.html", data=await off_loop(get))

    async def feature_page(request: Request) -> Response:
        sae, f = request.path_params["sae"], int(request.path_params["feature"])
        data = await off_loop(browser.feature_page, sae, f, q_int(request, "page", 0))
        return await page(
            "feature.html",
            data=data,
            views=browser.view_names(sae),
            steer_models=sorted(steer_paths),
        )

    steer_paths = cfg.steer_paths()
    steerers: dict[tuple[str, str], Any] = {}  # (sae, model key) -> a loaded Steerer

    def run_steer(sae: str, key: str, feature: int, value: float, text: str) -> Any:
        from actstore.effects.steer import Steerer

        if (sae, key) not in steerers:
            steerers[(sae, key)] = Steerer(store, sae, key, "cpu", steer_paths[key])
        return steerers[(sae, key)].run(feature, value, text, tokens=5)

    async def steer_page(request: Request) -> Response:
        sae, f = request.path_params["sae"], int(request.path_params["feature"])
        key = request.query_params.get("model", "")
        text = request.query_params.get("text", "")
        value = q_float(request, "value")
        if key not in steer_paths:
            raise ConfigError(
                f"model {key!r} has no steering form: serve with --steer-model KEY=PATH to run one"
            )
        if not text.strip() or len(text) > MAX_STEER_TEXT or value is None or abs(value) > 1e6:
            raise ConfigError(
                f"steering needs a text of 1..{MAX_STEER_TEXT} characters and a value"
            )
        res = await off_loop(run_steer, sae, key, f, value, text)
        return await page("steer.html", sae=sae, feature=f, model=key, text=text, value=value,
                          columns=res.table.columns, rows=res.table.rows(), lines=res.lines)  # fmt: skip

    async def contexts(request: Request) -> Response:
        sae, f = request.path_params["sae"], int(request.path_params["feature"])

        def build() -> str:
            rows = browser.contexts(sae, f, q_int(request, "page", 0))
            return render(
                env, "contexts.html", links, sae=sae, contexts=rows, views=browser.view_names(sae)
            )

        return HTMLResponse(await off_loop(build))

    async def sample_page(request: Request) -> Response:
        return await page(
            "sample.html",
            data=await off_loop(browser.sample_page, int(request.path_params["sample"])),
        )

    async def console(request: Request, sql: str, params: dict[str, Any] | None) -> Any:
        """One console query of this client, off the loop, within the time bound (query and rows both)."""
        client = request.client.host if request.client else "?"
        if client in busy:
            raise TooManyQueries(
                "one console query at a time per client: wait for the one running to finish"
            )
        busy.add(client)
        try:
            with anyio.fail_after(cfg.query_timeout + 2 * GRACE_S):
                return await off_loop(run_query, sql, params, limiter=query_limiter)
        except TimeoutError:
            raise timed_out(cfg.query_timeout) from None
        finally:
            busy.discard(client)

    async def sql_page(request: Request) -> Response:
        from actstore.query.named import list_queries

        q = request.query_params.get("q", "")
        result, error = None, None
        if q.strip():
            try:
                result = await console(request, q, None)
            except TooManyQueries:
                raise
            except ConfigError as exc:
                error = str(exc)
        return await page(
            "sql.html",
            q=q,
            result=result,
            error=error,
            queries=list_queries(),
            max_rows=cfg.max_rows,
            status=400 if error else 200,
        )

    async def sql_csv(request: Request) -> Response:
        res = await console(request, request.query_params.get("q", ""), None)

        def build() -> str:
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(res.columns)
            w.writerows(res.rows)
            return buf.getvalue()

        return Response(
            await off_loop(build),
            media_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="actstore-query.csv"'},
        )

    async def named(request: Request) -> Response:
        from actstore.query.named import load_query

        q = load_query(request.path_params["name"])
        given = {p.name: request.query_params.get(p.name) for p in q.params}
        result, error = None, None
        if request.query_params.get("run"):
            try:
                sql, values = await off_loop(named_sql, store, q.name, given)
                result = await console(request, sql, values)
            except TooManyQueries:
                raise
            except ConfigError as exc:
                error = str(exc)
        return await page(
            "named.html",
            query=q,
            given=given,
            result=result,
            error=error,
            status=400 if error else 200,
        )

    async def favicon(request: Request) -> Response:
        return Response((HERE / "static" / "favicon.svg").read_bytes(), media_type="image/svg+xml")

    async def on_error(request: Request, exc: Exception) -> Response:
        status = (
            404 if isinstance(exc, NotFoundError) else 400 if isinstance(exc, ConfigError) else 500
        )
        if isinstance(exc, TooManyQueries):
            status = 429
        if isinstance(exc, IntegrityError):
            status = 500
        msg = str(exc) if isinstance(exc, ActstoreError) else f"{type(exc).__name__}"
        return HTMLResponse(page_html("error.html", message=msg, code=status), status_code=status)

    async def not_found(request: Request, exc: Exception) -> Response:
        return HTMLResponse(
            page_html("error.html", message=f"no page at {request.url.path}", code=404),
            status_code=404,
        )

    hosts = allowed_hosts(cfg)

    async def headers(request: Request, call_next: Any) -> Response:
        # the Host header must name this machine (no DNS rebinding)
        if hosts is not None and host_name(request.headers.get("host", "")) not in hosts:
            return PlainTextResponse("Invalid host header", status_code=400)
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
        Route("/sae/{sae}/feature/{feature:int}/steer", steer_page),
        Route("/sae/{sae}/feature/{feature:int}/contexts", contexts),
        Route("/sample/{sample:int}", sample_page),
        Route("/sql", sql_page),
        Route("/sql.csv", sql_csv),
        Route("/query/{name}", named),
        Route("/favicon.ico", favicon),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    from starlette.middleware.base import BaseHTTPMiddleware

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        yield
        if pool is not None:
            pool.close()

    app = Starlette(
        routes=routes,
        exception_handlers={ActstoreError: on_error, 404: not_found, Exception: on_error},
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=headers)],
        lifespan=lifespan,
    )
    app.state.browser = browser
    app.state.pool = pool
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
    sock.listen(128)  # connections queue from the moment the URL is printed
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    return Bound(server, sock, f"http://{'[' + host + ']' if ':' in host else host}:{port}/")


def serve(
    store_path: str,
    cfg: ServeConfig,
    storage_options: dict[str, Any] | None = None,
    ready: Any = None,
) -> None:
    """Serve ``store_path`` (read-only) until interrupted; ``ready(url)`` is called once it listens."""
    b = bind(store_path, cfg, storage_options)
    if ready is not None:
        ready(b.url)
    b.server.run(sockets=[b.sock])
