"""The SQL console's query processes: ``actstore serve`` runs every console query in a process of its own, off its
event loop, so that one query can neither starve the server nor grow its memory.

A :class:`QueryPool` keeps up to ``size`` worker processes (``python -m actstore.browse.workers``), started on first
use. Each opens the store read-only, makes its sandboxed DuckDB connection once, then caps its own address space
(``RLIMIT_AS``) at what it uses plus ``memory_mb``: a query that needs more fails inside the worker (DuckDB's "Out of
Memory", Python's MemoryError) and is refused, and the server's memory never sees it. A worker answers each request
with the rows as Arrow IPC bytes (no pickle crosses the pipe: requests and errors are JSON) within its bounds of rows,
bytes and time (:func:`actstore.browse.console.fetch_table`); a worker that does not answer within the query timeout
plus :data:`GRACE_S` (or dies) is killed and replaced, and the request refused.

A store no other process can open (``memory://``) runs its queries in the server's threads with the same row, byte
and time bounds, without the memory cap.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Any

from actstore.browse.console import (
    ConsoleResult,
    Fetched,
    QueryRefused,
    check_statement,
    timed_out,
    to_result,
    too_big,
)
from actstore.errors import StoreError

GRACE_S = 5.0
"""Seconds a worker may take past the query timeout (fetching, Arrow encoding) before it is killed."""
START_S = 120.0
"""Seconds a new worker may take to open the store and connect."""


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    out = bytearray()
    while len(out) < n:
        left = None if deadline == float("inf") else deadline - time.monotonic()
        if left is not None and (left <= 0 or not select.select([fd], [], [], left)[0]):
            raise TimeoutError
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)


def _read_frame(fd: int, deadline: float) -> bytes:
    n = int.from_bytes(_read_exact(fd, 8, deadline), "little")
    return _read_exact(fd, n, deadline)


def _write_frame(stream: Any, data: bytes) -> None:
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


class QueryProcess:
    """One worker process and its pipes."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None, memory_mb: int) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actstore.browse.workers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        hello = {"url": url, "storage_options": storage_options or {}, "memory_mb": memory_mb}
        _write_frame(self.proc.stdin, json.dumps(hello).encode())
        ready = self._answer(time.monotonic() + START_S)
        if not ready.get("ok"):
            self.kill()
            raise StoreError(
                f"the console's query process could not open {url}: {ready.get('error')}"
            )

    def _answer(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        return json.loads(_read_frame(self.proc.stdout.fileno(), deadline))

    def run(
        self, sql: str, params: dict[str, Any] | None, max_rows: int, timeout: float, max_bytes: int
    ) -> Fetched:
        import pyarrow as pa

        req = {
            "sql": sql,
            "params": params or {},
            "max_rows": max_rows,
            "timeout": timeout,
            "max_bytes": max_bytes,
        }
        _write_frame(self.proc.stdin, json.dumps(req, default=str).encode())
        deadline = time.monotonic() + timeout + GRACE_S
        head = self._answer(deadline)
        if not head.get("ok"):
            raise QueryRefused(str(head.get("error")))
        assert self.proc.stdout is not None
        body = _read_frame(self.proc.stdout.fileno(), deadline)
        table = pa.ipc.open_stream(body).read_all()
        return Fetched(table, bool(head["truncated"]), float(head["seconds"]))

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(5)


class QueryPool:
    """Up to ``size`` query processes of one store (see the module docstring); :meth:`run` blocks its caller (a
    thread of the server), never the event loop."""

    def __init__(
        self, url: str, storage_options: dict[str, Any] | None, size: int, memory_mb: int
    ) -> None:
        self.url, self.storage_options, self.memory_mb = url, storage_options, memory_mb
        self.idle: list[QueryProcess] = []
        self.slots = threading.BoundedSemaphore(size)
        self.guard = threading.Lock()

    def run(
        self, sql: str, params: dict[str, Any] | None, max_rows: int, timeout: float, max_bytes: int
    ) -> ConsoleResult:
        check_statement(sql)  # refused here, before a process is woken
        with self.slots:
            with self.guard:
                worker = self.idle.pop() if self.idle else None
            if worker is None or worker.proc.poll() is not None:
                worker = QueryProcess(self.url, self.storage_options, self.memory_mb)
            try:
                fetched = worker.run(sql, params, max_rows, timeout, max_bytes)
            except QueryRefused:  # the worker answered: it stays
                with self.guard:
                    self.idle.append(worker)
                raise
            except TimeoutError:
                worker.kill()
                raise timed_out(timeout) from None
            except (EOFError, OSError, ValueError):
                worker.kill()  # died (out of memory beyond the cap's reach, a crash): a fresh one next time
                raise QueryRefused(
                    "the query's process died (too much memory?): add a WHERE or a LIMIT"
                ) from None
            with self.guard:
                self.idle.append(worker)
        return to_result(fetched, params)

    def close(self) -> None:
        with self.guard:
            workers, self.idle = self.idle, []
        for w in workers:
            w.kill()


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _cap_memory(memory_mb: int) -> None:
    """Cap this process's address space at what it maps now plus ``memory_mb`` (where the OS allows)."""
    try:
        import resource  # POSIX only: elsewhere the query process runs uncapped
    except ImportError:
        return
    used = _vm_bytes()
    if used and hasattr(resource, "RLIMIT_AS"):
        limit = used + memory_mb * 2**20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _worker_main() -> None:
    """A worker: open the store, connect, cap memory, then answer requests until standard input closes."""
    import pyarrow as pa

    from actstore.browse.console import fetch_table
    from actstore.query.views import connect
    from actstore.store.reader import open_store

    fin = sys.stdin.buffer
    # the protocol's pipe; anything else printed (DuckDB's progress bar) goes nowhere
    out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    deadline = float("inf")
    try:
        hello = json.loads(_read_frame(fin.fileno(), deadline))
        st = open_store(hello["url"], storage_options=hello["storage_options"] or None)
        base = connect(st)
        _cap_memory(int(hello["memory_mb"]))
    except Exception as exc:  # reported to the server, which refuses with it
        _write_frame(
            out, json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode()
        )
        return
    _write_frame(out, json.dumps({"ok": True}).encode())
    while True:
        try:
            req = json.loads(_read_frame(fin.fileno(), deadline))
        except EOFError:
            return
        try:
            got = fetch_table(
                base.cursor(),
                req["sql"],
                req["params"],
                int(req["max_rows"]),
                float(req["timeout"]),
                int(req["max_bytes"]),
            )
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, got.table.schema) as w:
                w.write_table(got.table)
            body = sink.getvalue().to_pybytes()
        except QueryRefused as exc:
            _write_frame(out, json.dumps({"ok": False, "error": str(exc)}).encode())
            continue
        except MemoryError:
            _write_frame(out, json.dumps({"ok": False, "error": str(too_big())}).encode())
            continue
        except Exception as exc:
            _write_frame(
                out,
                json.dumps(
                    {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                ).encode(),
            )
            continue
        _write_frame(
            out,
            json.dumps({"ok": True, "truncated": got.truncated, "seconds": got.seconds}).encode(),
        )
        _write_frame(out, body)


if __name__ == "__main__":
    _worker_main()
