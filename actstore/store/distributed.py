"""``actstore extract --ray``: the units of a format-3 extraction fanned out over Ray actors.

The driver has made the token index, the model group and the arrays (one step, before the fan-out); then each
actor (:class:`ExtractActor`) opens the store by its path or URL, loads the model once (on its GPU when the cluster
has GPUs) and computes the units handed to it through a :class:`~actstore.store.worker.UnitWorker`, which claims
each unit and records it by its marker. The driver only hands out units and moves one progress bar; it lists the
markers after each round, so units lost with a dead actor, or left to another driver's workers, are handed out
(or waited for) again until every unit has its marker.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from actstore.cluster import ActorPool, actor_resources, default_workers, ray_session
from actstore.storage.location import Location
from actstore.storage.locks import POLL_S
from actstore.store.worker import CLAIMED, GIL_SWITCH_S, QUEUED, ExtractJob, UnitWorker


class ExtractActor:
    """One Ray worker of an extraction: a :class:`UnitWorker` living as long as the actor."""

    def __init__(self, job: dict[str, Any]) -> None:
        sys.setswitchinterval(GIL_SWITCH_S)  # a process of its own: see GIL_SWITCH_S
        self.worker = UnitWorker(ExtractJob(**job))

    def run(self, u0: int) -> str:
        return self.worker.run(u0)

    def flush(self) -> int:
        return self.worker.flush()

    def pid(self) -> int:
        return os.getpid()


def extract_on_ray(
    job: ExtractJob, loc: Location, address: str, workers: int | None, progress: bool, desc: str
) -> int:
    """Every pending unit of ``job`` computed by Ray actors; returns the rows they computed."""
    from tqdm.auto import tqdm

    with ray_session(address) as ray:
        opts = actor_resources(ray, job.threads)
        actor = ray.remote(ExtractActor).options(**opts)
        n = workers or default_workers(ray, job.threads)
        pending = job.pending(loc)
        bar = tqdm(
            total=job.n_rows,
            initial=job.n_rows - sum(b - a for a, b in pending),
            desc=desc,
            unit="tok",
            unit_scale=True,
            disable=not progress,
        )
        pool = ActorPool(ray, lambda: actor.remote(job.to_dict()), min(n, max(1, len(pending))))
        computed = 0
        try:
            claimed: list[tuple[int, int]] = []
            # units whose actor died while it had them: it may have written them whole
            retried: set[int] = set()

            def done(u0: int, outcome: str) -> None:
                nonlocal computed
                unit = job.unit(u0)
                if outcome == CLAIMED:
                    claimed.append(unit)
                    return
                # DONE after a retry: the dead actor wrote the unit after it ran, before its reply reached us
                computed += (unit[1] - unit[0]) if outcome == QUEUED or u0 in retried else 0
                bar.update(unit[1] - unit[0])

            while pending:
                claimed.clear()
                pool.map("run", [u0 for u0, _ in pending], done, retried.add)
                # every queued unit written (or lost with its actor: handed out again)
                pool.call_all("flush")
                pending = job.pending(loc)
                bar.n = job.n_rows - sum(b - a for a, b in pending)
                bar.refresh()
                if pending and claimed:
                    # another driver's workers hold these: wait for their markers or lapsed claims
                    time.sleep(POLL_S)
        finally:
            bar.close()
            for a in pool.actors:
                ray.kill(a)
    return computed
