"""History queries, run in the store's reader threads (each with its own sqlite3
connection), never on the event loop: the SQL and the aggregation in Python both happen
there, and rows are streamed, not fetched all at once, so a query over a million rows
costs the loop nothing but the await. (The GIL is shared, but a thread running Python
gives it up every few milliseconds, so the loop keeps its turn.)
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

from agent.history.sketch import Sketch
from agent.history.writer import Cell

CHECK_EVERY = 10_000  # rows between checks whether the store is closing
FEW_SERIES = 500  # up to this many series (or 1/20 of all), a query reads each one's rows by index


class Closing(Exception):
    """The store is closing: a long query stops early."""


def _rows(conn: sqlite3.Connection, sql: str, args: Iterable[Any], closing: Callable[[], bool]) -> Iterable[Any]:
    for i, row in enumerate(conn.execute(sql, tuple(args))):
        if i % CHECK_EVERY == CHECK_EVERY - 1 and closing():
            raise Closing("the history store is closing")
        yield row


def _many_series(conn: sqlite3.Connection, chosen: str, args: list[Any]) -> bool:
    """Whether the series `chosen` selects are better read by time range than one by one.
    A seek per series costs about as much as scanning 20 rows: seek while the filter keeps
    under 1/20 of all series (at least FEW_SERIES; the highest id stands in for their number)."""
    limit = max(FEW_SERIES, (conn.execute("SELECT max(id) FROM series").fetchone()[0] or 0) // 20)
    return bool(conn.execute(f"SELECT count(*) FROM ({chosen} LIMIT {limit + 1})", args).fetchone()[0] > limit)


def events(
    conn: sqlite3.Connection,
    where: list[str],
    args: list[Any],
    limit: int,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Raw events matching `where` (over the `events` view's columns) and `name`, newest first."""
    if name is not None:
        # A name with many series: walk the time index from the newest and stop at `limit`
        # (`+` keeps SQLite from collecting and sorting all of the name's rows instead).
        many = _many_series(conn, "SELECT id FROM series WHERE name = ?", [name])
        where = [f"{'+' if many else ''}name = ?", *where]
        args = [name, *args]
    sql = "SELECT id, ts, name, kind, value, source, agent_id, session_id, tags, data FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY ts DESC, id DESC LIMIT ?"
    return [
        {
            "id": r[0],
            "ts": r[1],
            "name": r[2],
            "kind": r[3],
            "value": r[4],
            "source": r[5],
            "agent_id": r[6],
            "session_id": r[7],
            "tags": json.loads(r[8]),
            "data": json.loads(r[9]) if r[9] else None,
        }
        for r in conn.execute(sql, (*args, limit))
    ]


def _source(
    conn: sqlite3.Connection, level: str, name: str | None, tags: dict[str, str]
) -> tuple[str, list[str], list[Any]]:
    """FROM and WHERE parts (rows as `r`) for `name` and `tags` at `level`.
    A name and tag filter is evaluated per series, not per row. For a few series, each
    one's rows are read by the (sid, time) index; for many (a name with 50k of 200k
    tag sets), one pass over the time range with the series as a set is far quicker."""
    table = "raw" if level == "raw" else f"rollup_{level}"
    conds: list[str] = []
    args: list[Any] = []
    if name is not None:
        conds.append("{s}name = ?")
        args.append(name)
    for k, v in tags.items():
        conds.append("json_extract({s}tags, ?) = ?")
        args += [f'$."{k}"', v]
    if not conds:
        return f"{table} r", [], args
    chosen = "SELECT id FROM series WHERE " + " AND ".join(c.format(s="") for c in conds)
    if not _many_series(conn, chosen, args):
        return f"series s CROSS JOIN {table} r ON r.sid = s.id", [c.format(s="s.") for c in conds], args
    return f"{table} r", [f"+r.sid IN ({chosen})"], args  # `+`: not by the sid index, by the time range


def series_cells(
    conn: sqlite3.Connection,
    *,
    level: str,
    name: str | None,
    tags: dict[str, str],
    first: float,
    end: float,
    step: float,
    nb: int,
    agg: str,
    closing: Callable[[], bool],
) -> list[Cell | None]:
    """One aggregate cell per bucket of [first, first + nb * step) from `level`."""
    cells: list[Cell | None] = [None] * nb
    want_sketch = agg.startswith("p")
    source, where, args = _source(conn, level, name, tags)
    col = "r.ts" if level == "raw" else "r.bucket"
    where += [f"{col} >= ?", f"{col} < ?"]
    args += [first, end]
    cond = " WHERE " + " AND ".join(where)
    if level == "raw" and agg == "count":
        # Counted in SQL: a count over busy minutes is many rows to bring into Python.
        sql = f"SELECT CAST((r.ts - ?) / ? AS INTEGER) AS i, COUNT(*) FROM {source}{cond} GROUP BY i"
        for i, n in _rows(conn, sql, [first, step, *args], closing):
            if 0 <= i < nb:
                cell = cells[i] = Cell(False)
                cell.n = n
    elif level == "raw":
        for ts, value in _rows(conn, f"SELECT r.ts, r.value FROM {source}{cond}", args, closing):
            i = int((ts - first) // step)
            if 0 <= i < nb:
                cell = cells[i] or Cell(want_sketch)
                cells[i] = cell
                cell.add(value)
    else:
        sk = "r.sketch" if want_sketch else "NULL"
        sql = f"SELECT r.bucket, r.n, r.vn, r.sum, r.mn, r.mx, {sk} FROM {source}{cond}"
        for bucket, n, vn, total, mn, mx, blob in _rows(conn, sql, args, closing):
            i = int((bucket - first) // step)
            if not 0 <= i < nb:
                continue
            cell = cells[i] or Cell(want_sketch)
            cells[i] = cell
            cell.n += n
            cell.vn += vn
            cell.sum += total
            if mn is not None:
                cell.mn = mn if cell.mn is None else min(cell.mn, mn)
            if mx is not None:
                cell.mx = mx if cell.mx is None else max(cell.mx, mx)
            if want_sketch and cell.sketch is not None and blob:
                cell.sketch.merge(Sketch.from_bytes(blob))
    return cells


def value_of(c: Cell | None, agg: str) -> float | None:
    """The figure `agg` asks for from a cell (None where there is no data)."""
    if c is None:
        return None
    if agg == "count":
        return c.n
    if c.vn == 0:
        return None
    if agg == "sum":
        return c.sum
    if agg == "avg":
        return c.sum / c.vn
    if agg == "min":
        return c.mn
    if agg == "max":
        return c.mx
    q = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}[agg]
    est = c.sketch.quantile(q) if c.sketch is not None else None
    if est is None or c.mn is None or c.mx is None:
        return None
    return min(c.mx, max(c.mn, est))  # the sketch's error never leaves the observed range


def increases(
    conn: sqlite3.Connection,
    *,
    level: str,
    name: str,
    tags: dict[str, str],
    first: float,
    end: float,
    step: float,
    nb: int,
    running: bool,
    key: Callable[[str], str | None] = lambda _tags: None,
    closing: Callable[[], bool],
) -> dict[str | None, list[float | None]]:
    """How much `name` grew in each step, summed over its series grouped by `key(tags)`
    (one group by default; the `le` bound for histogram buckets).

    Deltas (counters: what the Prometheus and OTLP sources emit, record() increments) grow
    by the sum of their values. Running totals (`running`: a gauge whose values only climb,
    e.g. a total ingested over HTTP) grow by the sum of the positive differences between
    consecutive values of each series; a fall is a reset, after which the new value itself
    is growth (Prometheus' increase()). A difference counts in the step of its later value;
    each series' first value in the range is its baseline. From roll-ups (past the raw
    window) a running total's growth per step is max - min: a reset inside a step is lost.
    """
    source, where, args = _source(conn, level, name, tags)
    col = "r.ts" if level == "raw" else "r.bucket"
    where += [f"{col} >= ?", f"{col} < ?"]
    args += [first, end]
    cond = " WHERE " + " AND ".join(where)
    groups: dict[int, str | None] = {
        sid: key(tags_json) for sid, tags_json in conn.execute("SELECT id, tags FROM series WHERE name = ?", (name,))
    }
    out: dict[str | None, list[float | None]] = {}

    def add(sid: int, i: int, amount: float) -> None:
        if not 0 <= i < nb or sid not in groups:
            return
        row = out.get(groups[sid])
        if row is None:
            row = out[groups[sid]] = [None] * nb
        row[i] = (row[i] or 0.0) + amount

    if level == "raw":
        order = " ORDER BY r.ts" if running else ""
        prev: dict[int, float] = {}
        for sid, ts, value in _rows(conn, f"SELECT r.sid, r.ts, r.value FROM {source}{cond}{order}", args, closing):
            if value is None or not math.isfinite(value):
                continue
            i = int((ts - first) // step)
            if not running:
                add(sid, i, value)
                continue
            before = prev.get(sid)
            prev[sid] = value
            # the baseline still marks its step as one with data (growth 0)
            add(sid, i, 0.0 if before is None else (value - before if value >= before else value))
    else:
        sql = f"SELECT r.sid, r.bucket, r.sum, r.mn, r.mx FROM {source}{cond}"
        for sid, bucket, total, mn, mx in _rows(conn, sql, args, closing):
            if mn is None or mx is None:
                continue
            add(sid, int((bucket - first) // step), (mx - mn) if running else total)
    return out


def le_of(tags_json: str) -> str | None:
    """The `le` tag (a bucket's upper bound) of a series, from its tags JSON."""
    le = json.loads(tags_json).get("le")
    return None if le is None else str(le)


def bucket_quantile(q: float, counts: dict[float, float]) -> float | None:
    """The q-quantile from cumulative bucket counts {upper bound: count}, interpolating
    linearly inside the bucket it falls in, as Prometheus' histogram_quantile does. None
    without observations or without a +Inf bucket; the +Inf bucket answers with the
    highest finite bound."""
    bounds = sorted(counts)
    if len(bounds) < 2 or not math.isinf(bounds[-1]):
        return None
    cum: list[float] = []
    for b in bounds:  # counts from separately scraped buckets may disagree: keep them monotonic
        cum.append(max(counts[b], cum[-1] if cum else 0.0))
    total = cum[-1]
    if total <= 0:
        return None
    rank = q * total
    i = next(i for i, c in enumerate(cum) if c >= rank)
    if i == len(bounds) - 1:
        return bounds[-2]
    if i == 0 and bounds[0] <= 0:
        return bounds[0]
    lo = 0.0 if i == 0 else bounds[i - 1]
    below = 0.0 if i == 0 else cum[i - 1]
    inside = cum[i] - below
    if inside <= 0:
        return bounds[i]
    return lo + (bounds[i] - lo) * (rank - below) / inside


def parse_le(le: str | None) -> float | None:
    """A bucket bound as a number ("+Inf" is infinity); None when it is not one."""
    if le is None:
        return None
    try:
        v = float(le)
    except ValueError:
        return None
    return None if math.isnan(v) else v
