"""The history store's schema (`store.db`) and its numbered migrations.

Version 2 keys everything by a series id: `series` holds each (name, tag set) once, and
raw events (`raw`) and roll-ups (`rollup_minute`, `rollup_hour`) refer to it by an
integer. Rows and index keys are a fraction of version 1's (which repeated the name and
the tag JSON in every row and every key), a tag filter is evaluated once per series
instead of once per row, and roll-ups are keyed (bucket, sid), so a batch's writes land
at the end of the tree and the oldest buckets are one range to delete. The view
`events` shows raw events with their name and tags, as version 1's table did.
"""

from __future__ import annotations

import msgspec

from agent.storage.migrations import Migration

LEVELS = (("minute", 60), ("hour", 3600))

# Release 0.1.0's schema, exactly: its files have these tables and no version table.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY, ts REAL NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    value REAL, source TEXT NOT NULL, agent_id TEXT NOT NULL, session_id TEXT,
    tags TEXT NOT NULL, data TEXT
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_name_ts ON events (name, ts);
CREATE INDEX IF NOT EXISTS events_session_ts ON events (session_id, ts) WHERE session_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, tag_keys TEXT NOT NULL,
    last_value REAL, last_ts REAL NOT NULL, count INTEGER NOT NULL
);
"""
ROLLUP_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS rollup_{level} (
    name TEXT NOT NULL, tagset TEXT NOT NULL, bucket INTEGER NOT NULL,
    n INTEGER NOT NULL, vn INTEGER NOT NULL, sum REAL NOT NULL, mn REAL, mx REAL, sketch BLOB,
    PRIMARY KEY (name, tagset, bucket)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollup_{level}_bucket ON rollup_{level} (bucket);
"""

# Version 2: series ids. Existing rows are carried over (the view keeps `events` readable).
SERIES_V2 = """
CREATE TABLE series (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, tags TEXT NOT NULL, UNIQUE (name, tags)
);
INSERT OR IGNORE INTO series (name, tags) SELECT name, tags FROM events ORDER BY ts;
CREATE TABLE raw (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL, ts REAL NOT NULL, sid INTEGER NOT NULL, kind TEXT NOT NULL,
    value REAL, source TEXT NOT NULL, agent_id TEXT NOT NULL, session_id TEXT, data TEXT
);
INSERT INTO raw (id, ts, sid, kind, value, source, agent_id, session_id, data)
    SELECT e.id, e.ts, s.id, e.kind, e.value, e.source, e.agent_id, e.session_id, e.data
    FROM events e JOIN series s ON s.name = e.name AND s.tags = e.tags ORDER BY e.ts;
DROP TABLE events;
CREATE UNIQUE INDEX raw_id ON raw (id);
CREATE INDEX raw_ts ON raw (ts);
CREATE INDEX raw_sid_ts ON raw (sid, ts);
CREATE INDEX raw_session_ts ON raw (session_id, ts) WHERE session_id IS NOT NULL;
CREATE VIEW events AS
    SELECT r.id, r.ts, s.name, r.kind, r.value, r.source, r.agent_id, r.session_id, s.tags, r.data
    FROM raw r JOIN series s ON s.id = r.sid;
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""
ROLLUP_V2 = """
INSERT OR IGNORE INTO series (name, tags) SELECT name, tagset FROM rollup_{level};
CREATE TABLE rollup_{level}_v2 (
    bucket INTEGER NOT NULL, sid INTEGER NOT NULL,
    n INTEGER NOT NULL, vn INTEGER NOT NULL, sum REAL NOT NULL, mn REAL, mx REAL, sketch BLOB,
    PRIMARY KEY (bucket, sid)
) WITHOUT ROWID;
INSERT INTO rollup_{level}_v2 SELECT r.bucket, s.id, r.n, r.vn, r.sum, r.mn, r.mx, r.sketch
    FROM rollup_{level} r JOIN series s ON s.name = r.name AND s.tags = r.tagset;
DROP TABLE rollup_{level};
ALTER TABLE rollup_{level}_v2 RENAME TO rollup_{level};
CREATE INDEX rollup_{level}_sid ON rollup_{level} (sid, bucket);
"""

# Append new steps; never edit one that has shipped.
MIGRATIONS = [
    Migration(
        1,
        "initial schema (release 0.1.0)",
        SCHEMA_V1 + "".join(ROLLUP_SCHEMA_V1.format(level=lv) for lv, _ in LEVELS),
    ),
    Migration(
        2,
        "series ids: raw, rollup_minute and rollup_hour keyed by series; events becomes a view",
        SERIES_V2 + "".join(ROLLUP_V2.format(level=lv) for lv, _ in LEVELS),
    ),
]

_tags_enc = msgspec.json.Encoder(order="sorted")


def tagset_key(tags: dict[str, str]) -> str:
    """The canonical JSON of a tag set (sorted keys, compact), as `series.tags` holds it."""
    return _tags_enc.encode(tags).decode()
