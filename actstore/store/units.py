"""Units that complete in any order (store format 3): per-unit markers, claims, and the completed prefix.

A layer array is written in *units* of ``unit_rows`` rows (whole shards). In a format-3 array (attribute
``progress: "units"``) each finished unit has a marker object ``units/<array>/<first row>.done``, written after
the unit's chunks by an exclusive create (``O_EXCL`` locally, ``If-None-Match: *`` on S3), so of two workers that
both computed a unit exactly one records it. Before computing a unit a worker *claims* it: a leased lock
``locks/models/<m>/unit-<first row>.lock`` (one forward pass writes that unit of every layer being extracted),
renewed while it works; a claim whose holder died (its pid gone on this host, or its lease lapsed on any host) is
taken over. Units are deterministic, so a unit recomputed after a crash writes the same bytes.

The markers are the truth. ``committed_rows`` (the attribute every reader of formats 1-2 knows) is kept equal to
the contiguous completed prefix: readers stream that prefix, as before; :func:`completed_ranges` gives every
completed unit to a reader that wants them all. Format-1/2 arrays keep one writer and their prefix counter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from actstore.clock import now
from actstore.format import layout
from actstore.format.metadata import LayerAttrs
from actstore.storage.location import Location

UNIT_LEASE_S = 300.0
"""Seconds a unit's claim lasts unless renewed (its holder renews every quarter of that while it works)."""


def completed_units(loc: Location, array: str) -> set[int]:
    """First rows of the units of ``array`` that have a completion marker (one listing of its marker folder)."""
    folder = layout.units_dir(array)
    out = set()
    for key in loc.walk(folder):
        first = layout.parse_unit_marker(key.rsplit("/", 1)[-1])
        if first is not None:
            out.add(first)
    return out


def mark_done(loc: Location, array: str, first_row: int, stop: int) -> bool:
    """Record the unit ``[first_row, stop)`` of ``array`` as complete; False if another worker recorded it first."""
    body = f'{{"rows": [{first_row}, {stop}], "finished": "{now()}"}}'.encode()
    return loc.create_exclusive(layout.unit_marker(array, first_row), body)


def completed_prefix(done: Iterable[int], unit_rows: int, n_rows: int) -> int:
    """Rows of the contiguous completed prefix: units ``0, unit_rows, 2 * unit_rows, ...`` while they are done."""
    have, rows = set(done), 0
    while rows < n_rows and rows in have:
        rows = min(rows + unit_rows, n_rows)
    return rows


def completed_ranges(done: Iterable[int], unit_rows: int, n_rows: int) -> list[tuple[int, int]]:
    """The completed units as sorted, merged row ranges ``[(start, stop), ...]``."""
    out: list[tuple[int, int]] = []
    for u0 in sorted(d for d in set(done) if 0 <= d < n_rows and d % unit_rows == 0):
        u1 = min(u0 + unit_rows, n_rows)
        if out and out[-1][1] == u0:
            out[-1] = (out[-1][0], u1)
        else:
            out.append((u0, u1))
    return out


def committed_from_markers(loc: Location, array: str, attrs: LayerAttrs) -> int:
    """The completed prefix of a format-3 array, from its markers (its ``committed_rows`` may lag behind them)."""
    if attrs.complete:
        return attrs.n_rows
    done = completed_prefix(completed_units(loc, array), int(attrs.unit_rows or 1), attrs.n_rows)
    return max(attrs.committed_rows, done)


def commit_prefix(array: str, loc: Location, channel_scale: list[float] | None = None) -> int:
    """Set a format-3 array's ``committed_rows`` (and ``complete``) from its markers; returns the prefix.

    Writers update the attributes concurrently: each reads them afresh, adds what it carries (every writer of an
    int8 array carries the same ``channel_scale``) and a prefix recomputed from the markers, so a lost update only
    delays the prefix, which the next commit (or the end of every run) sets again.
    """
    import zarr

    arr = zarr.open_array(loc.zarr_store, path=array, mode="r+")
    a = LayerAttrs.read(arr, f"array {array} of store {loc.url}")
    rows = completed_prefix(completed_units(loc, arr.path), int(a.unit_rows or 1), a.n_rows)
    set_committed(arr, rows, channel_scale, where=f"array {array} of store {loc.url}")
    return rows


def set_committed(
    arr: Any, rows: int, channel_scale: list[float] | None = None, where: str = "array"
) -> None:
    """Write a layer array's ``committed_rows`` (with ``complete`` and ``updated``) and its ``channel_scale`` into its
    attributes, read afresh: the one place the prefix attribute is written, for every store format."""
    a = LayerAttrs.read(arr, where)
    if channel_scale is not None:
        a.channel_scale = channel_scale
    a.committed(rows, now()).write(arr)
