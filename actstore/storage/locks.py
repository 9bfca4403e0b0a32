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

A lock taken with a *lease* (``lease_s``; the claims of units, which workers on
many hosts take) also records ``expires``; its holder renews it while it works
(:class:`Renewer`, which also records ``renewed``), and any writer on any host may
take it over once it has expired, so a claim of a worker that died on another
machine frees itself. Whatever a lock object says, its lease ends at most one
lease after it was last written (the earlier of its ``renewed``/``created`` and
the object's modification time, which the filesystem or bucket keeps): a claim
that says ``expires: 9999-...`` lapses like any other.

Lock objects are written whole or not at all (``Location.create_exclusive``). One
that cannot be read (empty, cut short, foreign: left by an older version or
another tool) counts as abandoned :data:`UNREADABLE_LAPSE_S` seconds after it was
last written, or at once with ``--break-lock``. A writer that waits for a lock
says once per holder whom it waits for and until when.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from actstore.clock import deadline, from_epoch, iso, now, parse, utcnow
from actstore.errors import ConcurrencyError, StoreError
from actstore.format import layout
from actstore.storage.location import Location, open_location

LOCK_DIR = layout.LOCKS
POLL_S = 0.25
MAX_LEASE_S = 300.0
"""The longest lease a lock object is believed (a unit's claim: ``units.UNIT_LEASE_S``) when the reader has none."""
UNREADABLE_LAPSE_S = 60.0
"""Seconds after its last write that a lock object nobody can read counts as abandoned (writing one takes ms)."""


def to_stderr(message: str) -> None:
    """The default way a waiting writer speaks: one line on standard error."""
    print(f"actstore: {message}", file=sys.stderr, flush=True)


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
    expires: str = ""
    """When a leased lock lapses unless renewed (UTC, ISO 8601); empty for a lock held until released."""
    renewed: str = ""
    """When a leased lock was last renewed (UTC, ISO 8601); empty until its first renewal."""
    mtime: float | None = field(default=None, compare=False)
    """When the lock object was last written, by the filesystem's or bucket's clock (not stored in it)."""

    def to_json(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "mtime"}).encode()

    @property
    def readable(self) -> bool:
        return self.owner != "?"

    def lapses(self, lease_s: float | None = None) -> datetime | None:
        """When any writer on any host may take this lock over, or None for a lock held until it is released (or
        its process dies): a lease ends at its ``expires``, but at most ``lease_s`` (default :data:`MAX_LEASE_S`)
        after the lock was last written; an unreadable lock :data:`UNREADABLE_LAPSE_S` after it was last written."""
        written = from_epoch(self.mtime) if self.mtime is not None else None
        if not self.readable:
            return (written or from_epoch(0)) + timedelta(seconds=UNREADABLE_LAPSE_S)
        if not self.expires:
            return None
        expires = parse(self.expires) or from_epoch(0)
        base = parse(self.renewed or self.created) or from_epoch(0)
        if written is not None:
            base = min(base, written)
        return min(expires, base + timedelta(seconds=lease_s or MAX_LEASE_S))

    def describe(self, lease_s: float | None = None) -> str:
        until = self.lapses(lease_s)
        if not self.readable:
            return f"an unreadable lock object, abandoned at {iso(until) if until else '?'} unless rewritten"
        lease = f"; lease until {iso(until)}" if until is not None else ""
        return f"pid {self.pid} on {self.host} ({self.purpose}, since {self.created}{lease})"

    def expired(self, lease_s: float | None = None) -> bool:
        """Whether this lock's lease (or an unreadable lock's grace) has lapsed."""
        until = self.lapses(lease_s)
        return until is not None and until <= utcnow()


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


REQUIRED = ("name", "owner", "pid", "host", "created", "purpose")


def read_lock(loc: Location, name: str) -> LockInfo | None:
    """The current holder of ``name``, or None if it is free; an unreadable lock object is a holder with owner "?"."""
    key = lock_key(name)
    try:
        data = loc.read_bytes(key)
        mtime = loc.modified(key)
    except FileNotFoundError:
        return None
    try:
        raw = json.loads(data)
        info = LockInfo(
            **{k: raw[k] for k in REQUIRED},
            expires=str(raw.get("expires", "")),
            renewed=str(raw.get("renewed", "")),
            mtime=mtime,
        )
        if not (
            isinstance(info.owner, str) and isinstance(info.pid, int) and isinstance(info.host, str)
        ):
            raise TypeError("fields of the wrong type")
        return info
    except (
        ValueError,
        KeyError,
        TypeError,
        RecursionError,
    ):  # half-written or foreign: an unknown holder
        return LockInfo(name, "?", -1, "?", "?", "unreadable lock object", mtime=mtime)


class StoreLock:
    """An exclusive lock on one named unit of a store; use as a context manager or acquire/release."""

    def __init__(
        self,
        loc: Location,
        name: str,
        purpose: str = "actstore",
        break_lock: bool = False,
        lease_s: float | None = None,
        say: Callable[[str], None] | None = to_stderr,
    ) -> None:
        self.loc, self.name, self.purpose, self.break_lock = loc, name, purpose, break_lock
        self.info = LockInfo(name, uuid.uuid4().hex, os.getpid(), socket.gethostname(), "", purpose)
        self.lease_s = lease_s
        self.say = say
        self.held = False

    def _stale(self, holder: LockInfo) -> bool:
        if holder.expired(self.lease_s):
            return True
        return holder.readable and holder.host == self.info.host and not pid_alive(holder.pid)

    def _stamp(self, renewal: bool = False) -> bytes:
        if self.lease_s is not None:
            self.info.expires = deadline(self.lease_s)
            self.info.renewed = now() if renewal else ""
        return self.info.to_json()

    def renew(self) -> bool:
        """Push a leased lock's expiry forward; False (and no longer held) if another writer has taken it over."""
        if not self.held:
            return False
        holder = read_lock(self.loc, self.name)
        if holder is None or holder.owner != self.info.owner:
            self.held = False
            return False
        self.loc.write_bytes(lock_key(self.name), self._stamp(renewal=True))
        return True

    def waiting_message(self, holder: LockInfo) -> str:
        """What a writer waiting for this lock says: whom it waits for, until when, and what to do."""
        until = holder.lapses(self.lease_s)
        when = f"until {iso(until)} at the latest" if until is not None else "until it finishes"
        return (
            f"waiting for {self.name} in {self.loc.url}, held by {holder.describe(self.lease_s)}, {when}; "
            "if that writer is dead, stop and rerun with --break-lock"
        )

    def _try(self) -> LockInfo | None:
        """Take the lock if free (or stale); return None on success, else the holder."""
        self.info.created = now()
        data = self._stamp()
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

    def try_acquire(self) -> LockInfo | None:
        """Take the lock if it is free or stale: None when taken, else the live holder (nothing raised)."""
        if self.loc.read_only:
            raise StoreError(
                f"store {self.loc.url} is opened read-only: cannot lock {self.name} for writing"
            )
        return self._try()

    def acquire(self, wait_s: float = 0.0) -> StoreLock:
        """Take the lock, waiting up to ``wait_s`` seconds for a live holder; else raise ConcurrencyError."""
        if self.loc.read_only:
            raise StoreError(
                f"store {self.loc.url} is opened read-only: cannot lock {self.name} for writing"
            )
        deadline = time.monotonic() + wait_s
        told: set[tuple[str, str]] = set()
        while True:
            holder = self._try()
            if holder is None:
                return self
            if wait_s > 0 and self.say is not None and (holder.owner, holder.created) not in told:
                told.add((holder.owner, holder.created))
                self.say(self.waiting_message(holder))
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


class Renewer(threading.Thread):
    """Renews leased locks every ``lease_s / 4`` seconds while their holder works (a daemon thread).

    ``add`` a lock when it is taken and ``discard`` it before it is released; ``stop`` ends the thread.
    """

    def __init__(self, lease_s: float) -> None:
        super().__init__(daemon=True, name="actstore-lease")
        self.every = max(0.05, lease_s / 4)
        self.locks: dict[str, StoreLock] = {}
        self.guard = threading.Lock()
        self.halt = threading.Event()

    def add(self, lock: StoreLock) -> None:
        with self.guard:
            self.locks[lock.name] = lock

    def discard(self, lock: StoreLock) -> None:
        with self.guard:
            self.locks.pop(lock.name, None)

    def run(self) -> None:
        while not self.halt.wait(self.every):
            with self.guard:
                held = list(self.locks.values())
            for lock in held:
                try:
                    lock.renew()
                except Exception:  # a missed renewal only shortens the lease; the next one retries
                    pass

    def stop(self) -> None:
        self.halt.set()


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
            # best effort: a lock we cannot delete goes stale and is taken over later
            except Exception:
                pass
