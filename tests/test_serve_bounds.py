"""``actstore serve`` under one bad request: queries off the event loop, results bounded in bytes and memory, options
checked, IPv6 loopback, the host check (issue 27, items 2 and 8)."""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner

import actstore
from actstore.cli import main
from actstore.encoding.config import EncodeConfig
from actstore.encoding.encode import encode
from actstore.storage.integrity import update_manifest
from tests.helpers import make_sae

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized")

SLOW = "SELECT sum(hash(range)) AS h FROM range(100000000000)"
LIST_BOMB = "SELECT list(range) FROM range(20000000)"
STRING_BOMB = "SELECT repeat('x', 200000000) AS s FROM range(1000)"
WIDE = "SELECT repeat('x', 100000) AS s FROM range(1000)"  # 100 MB in rows of 100 kB: within memory, past the byte bound
REFUSED = ("larger than 16 MiB", "more memory than the console allows")


@pytest.fixture(scope="module")
def served_store(tmp_path_factory, tiny_store_ro) -> str:
    import shutil

    path = tmp_path_factory.mktemp("serve") / "s.zarr"
    shutil.copytree(tiny_store_ro, path)
    st = actstore.open_store(str(path), writable=True)
    make_sae(st, "s", "topk", k=4)
    update_manifest(st.loc, prefixes=["saes/s"])
    encode(st, EncodeConfig(sae="s", batch_rows=128, n_buckets=4), progress=False)
    return str(path)


class Server:
    """``actstore serve`` in a process of its own: its URL and pid."""

    def __init__(self, store: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actstore.cli", "serve", store, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()  # "serving STORE at URL (Ctrl-C stops)"
        assert " at http" in line, line + self.proc.stderr.read()
        self.url = line.split(" at ", 1)[1].split(" ", 1)[0].rstrip("/")

    def get(self, path: str, timeout: float = 60) -> tuple[int, str, float]:
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read().decode(), time.perf_counter() - t0
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), time.perf_counter() - t0

    def peak_rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture()
def server(served_store):
    s = Server(served_store, "--query-timeout", "4")
    yield s
    s.stop()


def error_of(body: str) -> str:
    """The error paragraph of a page (unescaped), or the body when there is none."""
    import html
    import re

    m = re.search(r'id="error">(.*?)</p>', body, re.S) or re.search(
        r"<main>(.*?)</main>", body, re.S
    )
    return html.unescape(m.group(1)) if m else body


def q(sql: str) -> str:
    return "/sql?q=" + urllib.request.quote(sql)


def test_a_slow_query_does_not_hold_up_static_files_or_pages(server):
    assert server.get(q("SELECT 1 AS warm"))[0] == 200  # the query process is started
    slow = threading.Thread(target=server.get, args=(q(SLOW),))
    slow.start()
    time.sleep(0.5)
    status, _, secs = server.get("/static/style.css")
    status_page, _, secs_page = server.get("/")
    slow.join()
    assert status == 200 and secs <= 1.0, secs
    assert status_page == 200 and secs_page <= 1.0, secs_page


def test_one_query_per_client_at_a_time(server):
    results: list = []
    slow = threading.Thread(target=lambda: results.append(server.get(q(SLOW))))
    slow.start()
    time.sleep(1.0)
    status, body, _ = server.get(q("SELECT 2 AS x"))
    slow.join()
    assert status == 429 and "one console query at a time" in body
    assert results[0][0] == 400 and "ran past 4 s" in error_of(results[0][1])


@pytest.mark.parametrize("bomb", [LIST_BOMB, STRING_BOMB])
def test_a_byte_bomb_is_refused_with_bounded_server_memory(server, bomb):
    status, body, secs = server.get(q(bomb))
    err = error_of(body)
    assert status == 400 and any(r in err for r in REFUSED), err
    assert secs < 4 + 15
    assert server.peak_rss_mb() < 700, server.peak_rss_mb()
    # the server (and a query process) still answer
    assert server.get(q("SELECT 41 + 1 AS x"))[0] == 200


def test_rows_past_the_byte_bound_are_refused_while_fetched(server):
    for path in (q(WIDE), "/sql.csv?q=" + urllib.request.quote(WIDE)):
        status, body, _ = server.get(path)
        assert status == 400 and "larger than 16 MiB" in error_of(body), path
    assert server.peak_rss_mb() < 700


@pytest.mark.parametrize(
    "opt", ["--query-timeout", "--max-result-mb", "--query-memory-mb", "--max-rows"]
)
@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_numeric_options_are_checked(served_store, opt, value):
    r = CliRunner().invoke(main, ["serve", served_store, "--port", "0", opt, value])
    assert (
        r.exit_code != 0
        and "Traceback" not in r.output
        and r.output.strip().startswith(("Error", "Usage"))
    ), r.output
    assert len([x for x in r.output.strip().splitlines() if x.startswith("Error")]) == 1, r.output


def test_ipv6_loopback_answers(served_store):
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    s = Server(served_store, "--host", "::1")
    try:
        assert s.url.startswith("http://[::1]:")
        status, body, _ = s.get("/")
        assert status == 200 and "store" in body
    finally:
        s.stop()


def test_host_check_in_production(server):
    host, port = server.url.split("//")[1].rsplit(":", 1)
    for name, want in (
        ("testserver", 400),
        ("evil.example", 400),
        (f"127.0.0.1:{port}", 200),
        (f"localhost:{port}", 200),
    ):
        c = http.client.HTTPConnection(host, int(port), timeout=30)
        c.request("GET", "/", headers={"Host": name})
        assert c.getresponse().status == want, name
        c.close()


def test_favicon_and_contexts_out_of_range(server):
    status, _, _ = server.get("/favicon.ico")
    assert status == 200
    status, body, _ = server.get("/sae/s/feature/99999/contexts")
    assert status == 404 and "out of range" in body
