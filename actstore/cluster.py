"""Running work on Ray: one session per command, and a pool of stateful actors that survives workers dying.

The heavy stages fan out here (``extract --ray``, ``encode --ray``; SAE sweeps use :func:`ray_session` too). An
actor loads its model or SAE once and is handed work items (units of rows, or buckets) one or two at a time; the
driver only schedules and reports. When an actor's process dies (a SIGKILL, a lost node), the pool starts a new
actor in its place and hands its unfinished items out again; what those items wrote is made safe by the stage
itself (claims and markers: a unit recomputed writes the same bytes, and is recorded once).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from actstore.errors import ActstoreError, ConfigError

IN_FLIGHT = 2
"""Items handed to each actor at once: one computing, one queued behind it."""
MAX_RESTARTS = 8
"""Actor deaths a pool tolerates per actor slot before it gives up."""


def ray_module() -> Any:
    """The ``ray`` module, or ConfigError saying how to install it."""
    try:
        import ray
    except ModuleNotFoundError:
        raise ConfigError("--ray needs Ray: pip install 'actstore[ray]'") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, connected: ``"local"`` (or empty) starts a local Ray, else joins the cluster at ``address``; a session
    this call started is shut down at the end, one already running is left as it was."""
    ray = ray_module()
    started = not ray.is_initialized()
    if started:
        target = None if address in (None, "", "local") else address
        if target is not None:
            check_reachable(target)
        try:
            ray.init(address=target, include_dashboard=False, log_to_driver=False)
        except (ValueError, ConnectionError, RuntimeError, TimeoutError) as exc:
            raise ConfigError(
                f"could not join the Ray cluster at {target}: {str(exc).splitlines()[0][:300]}"
            ) from None
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


CONNECT_TIMEOUT_S = 10.0
"""Seconds to reach a Ray cluster's address before giving up (Ray itself would retry for minutes)."""


def check_reachable(address: str) -> None:
    """ConfigError, within :data:`CONNECT_TIMEOUT_S`, unless something listens at ``address`` (``HOST:PORT`` or
    ``ray://HOST:PORT``; ``auto`` is left to Ray); a ``ray://`` address also needs Ray's client (``ray[client]``)."""
    import importlib.util
    import socket

    if address == "auto":
        return
    client = address.startswith("ray://")
    if client and importlib.util.find_spec("grpc") is None:
        raise ConfigError(
            f"--ray {address}: a ray:// address needs Ray's client, which is not installed: "
            "pip install 'ray[client]' (or give the cluster's HOST:PORT from inside it)"
        )
    hostport = address.removeprefix("ray://").split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit():
        raise ConfigError(
            f"--ray {address}: give the cluster's address as HOST:PORT (or ray://HOST:PORT, or local)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(
            f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc}): start one with "
            "'ray start --head', check the address, or drop the address for a local Ray"
        ) from None


def has_gpus(ray: Any) -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def actor_resources(ray: Any, threads: int | None) -> dict[str, Any]:
    """One GPU per actor when the cluster has GPUs, else ``threads`` CPUs (default 1)."""
    return {"num_gpus": 1} if has_gpus(ray) else {"num_cpus": threads or 1}


def default_workers(ray: Any, threads: int | None) -> int:
    """One actor per GPU, else one per ``threads`` CPUs of the cluster."""
    res = ray.cluster_resources()
    if res.get("GPU", 0) > 0:
        return int(res["GPU"])
    return max(1, int(res.get("CPU", 1)) // (threads or 1))


def _cause(exc: BaseException) -> BaseException:
    """The stage's own error inside a Ray task error (so the CLI prints its one-line message)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class ActorPool:
    """``n`` actors made by ``make()``; :meth:`map` hands items to them and replaces actors that die."""

    def __init__(self, ray: Any, make: Callable[[], Any], n: int) -> None:
        self.ray, self.make = ray, make
        self.actors = [make() for _ in range(n)]
        self.generation = [0] * n
        self.restarts = 0

    def _replace(self, i: int, gen: int) -> None:
        """A new actor in slot ``i`` unless it was replaced already (several in-flight calls fail on one death)."""
        if self.generation[i] != gen:
            return
        self.restarts += 1
        if self.restarts > MAX_RESTARTS * len(self.actors):
            raise ActstoreError(
                f"Ray workers died {self.restarts} times: see the Ray logs of the cluster (ray status)"
            )
        with contextlib.suppress(Exception):
            self.ray.kill(self.actors[i])
        self.actors[i] = self.make()
        self.generation[i] += 1

    def map(
        self,
        method: str,
        items: list[Any],
        on_result: Callable[[Any, Any], Any],
        on_retry: Callable[[Any], Any] | None = None,
    ) -> None:
        """Call ``actor.method(item)`` once per item (retried on another actor when its actor died, after
        ``on_retry(item)``: the dead actor may have done part or all of it), calling ``on_result(item, result)`` as
        each finishes; the stage's own errors are raised."""
        ray = self.ray
        todo: deque[Any] = deque(items)
        inflight: dict[Any, tuple[int, int, Any]] = {}

        def submit(i: int) -> None:
            item = todo.popleft()
            inflight[getattr(self.actors[i], method).remote(item)] = (i, self.generation[i], item)

        for _ in range(IN_FLIGHT):
            for i in range(len(self.actors)):
                if todo:
                    submit(i)
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            i, gen, item = inflight.pop(ref)
            try:
                out = ray.get(ref)
            # the actor's process died: a fresh actor, the item again
            except ray.exceptions.RayActorError:
                self._replace(i, gen)
                todo.appendleft(item)
                if on_retry is not None:
                    on_retry(item)
            except ray.exceptions.RayTaskError as exc:
                raise _cause(exc) from None
            else:
                on_result(item, out)
            # refill every actor (this one, and one just replaced)
            for j in range(len(self.actors)):
                while todo and sum(1 for k, *_ in inflight.values() if k == j) < IN_FLIGHT:
                    submit(j)

    def call_all(self, method: str) -> list[Any]:
        """``actor.method()`` on every actor; an actor that died is replaced and reported as None."""
        refs = [
            (i, self.generation[i], getattr(a, method).remote()) for i, a in enumerate(self.actors)
        ]
        out = []
        for i, gen, ref in refs:
            try:
                out.append(self.ray.get(ref))
            except self.ray.exceptions.RayActorError:
                self._replace(i, gen)
                out.append(None)
            except self.ray.exceptions.RayTaskError as exc:
                raise _cause(exc) from None
        return out
