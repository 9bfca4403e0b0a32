"""Writer locks: one lock object per array (or other unit) being written into a store.

A lock is a small JSON object at ``STORE/locks/<name>.lock`` created with an
exclusive create (``O_EXCL`` locally, a conditional ``If-None-Match: *`` PUT on
S3), so of two writers racing for the same array exactly one wins; the other
gets a :class:`~actstore.errors.ConcurrencyError` naming the holder. Writers of
different arrays take different locks and never block each other.

The lock records ``pid``, ``host`` and ``created``. A lock left behind by a
process killed with ``kill -9`` is *stale*: a writer on the same host takes it
over when that pid is no longer alive; from another host pass ``--break-lock``
(``break_lock=True``) once you are sure the old writer is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from actstore.clock import now
from actstore.errors import ConcurrencyError, StoreError
from actstore.format import layout
from actstore.storage.location import Location, open_location

LOCK_DIR = layout.LOCKS
POLL_S = 0.25


lock_key = layout.lock_key


@dataclass
class LockInfo:
    """What a lock object says about its holder."""

    name: str
    """What is locked (an array path, or 'setup')."""
    owner: str
    """Random token of the holding writer."""
    pid: int
    """Process id of the holder."""
    host: str
    """Host name of the holder."""
    created: str
    """When the lock was taken (UTC, ISO 8601)."""
    purpose: str
    """What the holder is doing (e.g. 'extract minilm')."""

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} ({self.purpose}, since {self.created})"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(loc: Location, name: str) -> LockInfo | None:
    """The current holder of ``name``, or None if it is free (or the lock object is unreadable)."""
    try:
        raw = json.loads(loc.read_bytes(lock_key(name)))
        return LockInfo(**{k: raw[k] for k in LockInfo.__dataclass_fields__})
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):  # half-written or foreign: treat as stale from an unknown holder
        return LockInfo(name, "?", -1, "?", "?", "unreadable lock object")


class StoreLock:
    """An exclusive lock on one named unit of a store; use as a context manager or acquire/release."""

    def __init__(self, loc: Location, name: str, purpose: str = "actstore", break_lock: bool = False) -> None:
        self.loc, self.name, self.purpose, self.break_lock = loc, name, purpose, break_lock
        self.info = LockInfo(name, uuid.uuid4().hex, os.getpid(), socket.gethostname(), "", purpose)
        self.held = False

    def _stale(self, holder: LockInfo) -> bool:
        if holder.owner == "?":
            return holder.host == self.info.host or self.break_lock
        return holder.host == self.info.host and not pid_alive(holder.pid)

    def _try(self) -> LockInfo | None:
        """Take the lock if free (or stale); return None on success, else the holder."""
        self.info.created = now()
        data = json.dumps(asdict(self.info)).encode()
        for _ in range(3):
            if self.loc.create_exclusive(lock_key(self.name), data):
                self.held = True
                return None
            holder = read_lock(self.loc, self.name)
            if holder is None:  # released between our create and read: try again
                continue
            if holder.owner == self.info.owner:
                self.held = True
                return None
            if not (self.break_lock or self._stale(holder)):
                return holder
            again = read_lock(self.loc, self.name)  # remove it only if nobody replaced it meanwhile
            if again is not None and again.owner == holder.owner:
                self.loc.delete(lock_key(self.name))
        return read_lock(self.loc, self.name)

    def acquire(self, wait_s: float = 0.0) -> StoreLock:
        """Take the lock, waiting up to ``wait_s`` seconds for a live holder; else raise ConcurrencyError."""
        if self.loc.read_only:
            raise StoreError(f"store {self.loc.url} is opened read-only: cannot lock {self.name} for writing")
        deadline = time.monotonic() + wait_s
        while True:
            holder = self._try()
            if holder is None:
                return self
            if time.monotonic() >= deadline:
                raise ConcurrencyError(
                    f"{self.name} in store {self.loc.url} is being written by another writer: {holder.describe()}; "
                    f"wait for it to finish, or if that writer is dead pass --break-lock "
                    f"(lock object {self.loc.join(lock_key(self.name))})"
                )
            time.sleep(POLL_S)

    def release(self) -> None:
        """Give the lock back (only if this writer still holds it)."""
        if not self.held:
            return
        self.held = False
        holder = read_lock(self.loc, self.name)
        if holder is not None and holder.owner == self.info.owner:
            self.loc.delete(lock_key(self.name))
        if self.loc.local:  # leave no empty folders behind (object stores have none)
            d = Path(self.loc.fs_path(lock_key(self.name))).parent
            while d != Path(self.loc.root) and d.name:
                try:
                    d.rmdir()
                except OSError:
                    break
                d = d.parent

    def __enter__(self) -> StoreLock:
        return self.acquire() if not self.held else self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def output_lock(folder: str | Path, purpose: str) -> Iterator[StoreLock]:
    """Hold the writer lock of a local output folder (a fine-tuned model, a report) while writing into it.

    The lock is ``FOLDER/locks/writer.lock``, with the same exclusive create and dead-writer takeover as a
    store's locks; a second writer of the same folder gets a ConcurrencyError naming the first.
    """
    loc = open_location(str(folder), create=True)
    lock = StoreLock(loc, "writer", purpose).acquire()
    try:
        yield lock
    finally:
        lock.release()


class LockSet:
    """The locks one run holds; :meth:`release_all` in a ``finally`` gives them all back."""

    def __init__(self, loc: Location, purpose: str, break_lock: bool = False) -> None:
        self.loc, self.purpose, self.break_lock = loc, purpose, break_lock
        self.locks: dict[str, StoreLock] = {}

    def acquire(self, name: str, wait_s: float = 0.0) -> StoreLock:
        if name in self.locks and self.locks[name].held:
            return self.locks[name]
        lock = StoreLock(self.loc, name, self.purpose, self.break_lock).acquire(wait_s)
        self.locks[name] = lock
        return lock

    def acquire_all(self, names: list[str]) -> None:
        """Take every lock in ``names`` or none: on a conflict the ones taken are released and the error raised."""
        taken = []
        try:
            for name in names:
                if name not in self.locks or not self.locks[name].held:
                    self.acquire(name)
                    taken.append(name)
        except BaseException:
            for name in taken:
                self.release(name)
            raise

    def release(self, name: str) -> None:
        lock = self.locks.pop(name, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for name in list(self.locks):
            try:
                self.release(name)
            except Exception:  # best effort: a lock we cannot delete goes stale and is taken over later
                pass
