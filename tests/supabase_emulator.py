"""A small, protocol-faithful Supabase emulator for tests: PostgREST + Realtime over a real PostgreSQL.

No PostgREST or Realtime server can be installed here, so this aiohttp app speaks the
subset of their wire protocols that supabase-py 2.x (postgrest-py, realtime-py) uses,
and executes everything against the real database with asyncpg:

* ``POST /rest/v1/{table}``: ``Prefer: return=minimal|representation,
  resolution=ignore-duplicates|merge-duplicates``, ``on_conflict`` and ``columns``
  query params, ``Content-Profile`` schema; rows decoded by PostgreSQL itself with
  ``json_populate_recordset`` as PostgREST does, so bad values fail with the real
  SQLSTATE. Errors are PostgREST-shaped JSON ``{code, message, details, hint}`` with
  PostgREST's SQLSTATE -> HTTP status mapping.
* ``GET /rest/v1/{table}``: ``select``, filters ``eq neq gt gte lt lte in is``,
  ``order``, ``limit``, ``offset``, ``Accept-Profile`` schema.
* ``apikey`` header (or ``Authorization: Bearer``) must be the service key or the anon
  key (401 otherwise); the anon key may read but not write (42501, as RLS would).
* Realtime: Phoenix v1.0.0 JSON WebSocket at ``/realtime/v1/websocket``: ``phx_join``
  with ``config.postgres_changes``, ``phx_reply``, ``system``, heartbeats, ``phx_leave``,
  and ``postgres_changes`` INSERT messages for tables in the ``supabase_realtime``
  publication, fed by an AFTER INSERT trigger doing ``pg_notify`` + asyncpg LISTEN.

Fault switches: ``fail_next(n, status=503, retry_after=None)``, ``delay_s``,
``drop_next(n, after_commit=False)`` (close the connection without a response).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

CHANNEL = "sidecar_realtime"
NOTIFY_LIMIT = 7900  # pg_notify payloads must stay under 8000 bytes

TRIGGER_SQL = """
CREATE OR REPLACE FUNCTION public.sidecar_emulator_notify() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    head jsonb := jsonb_build_object(
        'schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'type', TG_OP,
        'commit_timestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'));
    payload text := (head || jsonb_build_object('record', row_to_json(NEW)))::text;
BEGIN
    IF octet_length(payload) > {limit} THEN
        -- Too big for NOTIFY: send the key only; the emulator re-selects the row.
        payload := (head || jsonb_build_object('id', NEW.id))::text;
    END IF;
    PERFORM pg_notify('{channel}', payload);
    RETURN NULL;
END
$fn$;
CREATE OR REPLACE TRIGGER sidecar_emulator_realtime AFTER INSERT ON {qname}
    FOR EACH ROW EXECUTE FUNCTION public.sidecar_emulator_notify();
"""

_CONN_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
)
_RESERVED = {"select", "order", "limit", "offset", "on_conflict", "columns", "apikey"}
_OPS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def _qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _split_list(value: str) -> list[str]:
    """Split `a,"b,c",d` on commas outside double quotes and unquote the parts."""
    out, cur, quoted, esc = [], [], False, False
    for ch in value:
        if esc:
            cur.append(ch)
            esc = False
        elif quoted and ch == "\\":
            esc = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return [p for p in out if p]


def http_status_for_sqlstate(code: str, anonymous: bool = False) -> int:
    """PostgREST's mapping of SQLSTATE to HTTP status (docs: Errors / HTTP status codes)."""
    if code in ("23503", "23505"):
        return 409
    if code == "42501":
        return 401 if anonymous else 403
    if code in ("42883", "42P01"):
        return 404
    if code == "25006":
        return 405
    if code == "42P17":
        return 500
    if code == "P0001":
        return 400
    cls = code[:2]
    if cls in ("08", "53"):
        return 503
    if cls in ("0L", "0P", "28"):
        return 403
    if cls in ("09", "0L", "25", "2D", "38", "39", "3B", "40", "54", "55", "57", "58", "F0", "HV", "P0", "XX"):
        return 500
    return 400


def _error(status: int, code: str | None, message: str, details: Any = None, hint: Any = None, **headers: str) -> web.Response:
    body = {"code": code, "details": details, "hint": hint, "message": message}
    return web.json_response(body, status=status, headers=headers or None)


class SupabaseEmulator:
    """PostgREST + Realtime emulator backed by the PostgreSQL database at `dsn`."""

    def __init__(self, dsn: str, *, key: str = "service-role-test-key", anon_key: str = "anon-test-key", realtime: bool = True) -> None:
        self.dsn = dsn
        self.key = key
        self.anon_key = anon_key
        self.realtime = realtime
        self.url = ""
        # fault switches
        self.delay_s = 0.0
        self._fail: list[tuple[int, float | None, Any]] = []
        self._drop: list[bool] = []  # each entry: drop after commit?
        # observability for tests
        self.requests: list[tuple[str, str, int]] = []
        self.realtime_sent = 0
        self._pool: asyncpg.Pool | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subs: dict[web.WebSocketResponse, dict[str, list[dict[str, Any]]]] = {}
        self._types: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self._listening = asyncio.Event()

    # -- fault switches ---------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 503, retry_after: float | None = None, body: Any = None) -> None:
        """Answer the next `n` REST requests with `status` (non-JSON body unless `body`)."""
        self._fail.extend([(status, retry_after, body)] * n)

    def drop_next(self, n: int = 1, after_commit: bool = False) -> None:
        """Close the next `n` REST connections without a response (optionally after the write commits)."""
        self._drop.extend([after_commit] * n)

    # -- lifecycle --------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_cors])
        app.router.add_route("*", "/rest/v1/{table}", self._rest)
        app.router.add_get("/realtime/v1/websocket", self._websocket)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=8)
        self._runner = web.AppRunner(self.app(), handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = site._server.sockets  # type: ignore[union-attr]
        self.url = f"http://{host}:{sockets[0].getsockname()[1]}"
        if self.realtime:
            self._listener = asyncio.create_task(self._listen_loop())
            await asyncio.wait_for(self._listening.wait(), 10)
        return self.url

    async def stop(self) -> None:
        for ws in list(self._subs):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)
        if self._listener:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner:
            await self._runner.cleanup()
        if self._pool:
            self._pool.terminate()

    async def __aenter__(self) -> SupabaseEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- REST -------------------------------------------------------------------------

    def _auth(self, request: web.Request) -> str | None:
        key = request.headers.get("apikey") or request.query.get("apikey")
        bearer = request.headers.get("Authorization", "")
        token = bearer[7:] if bearer.lower().startswith("bearer ") else None
        for candidate in (key, token):
            if candidate in (self.key, self.anon_key):
                return "anon" if candidate == self.anon_key else "service_role"
        return None

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        resp = await self._rest_inner(request)
        self.requests.append((request.method, request.path, resp.status))
        return resp

    def _abort(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.abort()
        return web.Response(status=499)  # never reaches the client

    async def _rest_inner(self, request: web.Request) -> web.StreamResponse:
        role = self._auth(request)
        if role is None:
            return web.json_response(
                {"message": "Invalid API key", "hint": "Double check your Supabase `anon` or `service_role` API key."},
                status=401,
            )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self._fail:
            status, retry_after, body = self._fail.pop(0)
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            if body is not None:
                return web.json_response(body, status=status, headers=headers)
            return web.Response(status=status, text="upstream unavailable", headers=headers)
        drop_after = None
        if self._drop:
            drop_after = self._drop.pop(0)
            if not drop_after:
                return self._abort(request)
        table = request.match_info["table"]
        try:
            if request.method == "POST":
                profile = request.headers.get("Content-Profile", "public")
                resp = await self._insert(request, profile, table, role)
            elif request.method in ("GET", "HEAD"):
                profile = request.headers.get("Accept-Profile", "public")
                resp = await self._select(request, profile, table)
            else:
                return _error(405, "PGRST117", f"Unsupported HTTP method: {request.method}")
        except asyncpg.PostgresError as exc:
            code = exc.sqlstate or "XX000"
            if code[:2] in ("08", "57") and code != "57014":
                resp = _error(503, "PGRST001", "Database client error. Retrying the connection.", str(exc))
            else:
                resp = _error(
                    http_status_for_sqlstate(code, role == "anon"),
                    code,
                    getattr(exc, "message", str(exc)),
                    getattr(exc, "detail", None),
                    getattr(exc, "hint", None),
                )
        except _CONN_ERRORS as exc:
            resp = _error(503, "PGRST001", "Database client error. Retrying the connection.", f"{type(exc).__name__}: {exc}")
        if drop_after:
            return self._abort(request)
        return resp

    async def _columns(self, schema: str, table: str) -> list[tuple[str, str]] | None:
        key = (schema, table)
        if key not in self._types:
            assert self._pool is not None
            rows = await self._pool.fetch(
                """SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, t.typname
                   FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                   WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                   ORDER BY a.attnum""",
                f"{_qi(schema)}.{_qi(table)}",
            )
            if not rows:
                return None
            self._types[key] = [(r["attname"], r["type"]) for r in rows]
            self._types[("typname",) + key] = [(r["attname"], r["typname"]) for r in rows]  # type: ignore[index]
        return self._types[key]

    @staticmethod
    def _prefer(request: web.Request) -> dict[str, str]:
        out: dict[str, str] = {}
        for header in request.headers.getall("Prefer", []):
            for part in header.split(","):
                k, _, v = part.strip().partition("=")
                out[k] = v
        return out

    def _missing_table(self, schema: str, table: str) -> web.Response:
        return _error(
            404, "PGRST205", f"Could not find the table '{schema}.{table}' in the schema cache", None, None
        )

    async def _insert(self, request: web.Request, schema: str, table: str, role: str) -> web.Response:
        cols_types = await self._columns(schema, table)
        if cols_types is None:
            return self._missing_table(schema, table)
        raw = await request.read()
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            return _error(400, "PGRST102", "Empty or invalid json", str(exc))
        if isinstance(payload, dict):
            payload = [payload]
        if not isinstance(payload, list) or not all(isinstance(r, dict) for r in payload):
            return _error(400, "PGRST102", "All object keys must match")
        if role == "anon":
            return _error(401, "42501", f'new row violates row-level security policy for table "{table}"')
        if not payload:
            return web.Response(status=201)
        known = {c for c, _ in cols_types}
        if "columns" in request.query:
            cols = _split_list(request.query["columns"])
        else:
            cols = list(payload[0].keys())
        for c in cols:
            if c not in known:
                return _error(400, "PGRST204", f"Could not find the '{c}' column of '{table}' in the schema cache")
        prefer = self._prefer(request)
        qname = f"{_qi(schema)}.{_qi(table)}"
        collist = ", ".join(_qi(c) for c in cols)
        sql = f"INSERT INTO {qname} ({collist}) SELECT {collist} FROM json_populate_recordset(NULL::{qname}, $1::json) _"
        resolution = prefer.get("resolution")
        if resolution in ("ignore-duplicates", "merge-duplicates"):
            conflict = _split_list(request.query.get("on_conflict", "id"))
            target = ", ".join(_qi(c) for c in conflict)
            if resolution == "ignore-duplicates":
                sql += f" ON CONFLICT ({target}) DO NOTHING"
            else:
                sets = ", ".join(f"{_qi(c)} = EXCLUDED.{_qi(c)}" for c in cols if c not in conflict)
                sql += f" ON CONFLICT ({target}) DO " + (f"UPDATE SET {sets}" if sets else "NOTHING")
        assert self._pool is not None
        body = raw.decode("utf-8")
        if prefer.get("return") == "representation":
            text = await self._pool.fetchval(
                f"WITH ins AS ({sql} RETURNING *) SELECT coalesce(json_agg(ins), '[]')::text FROM ins", body
            )
            return web.Response(status=201, text=text, content_type="application/json", headers={"Content-Range": "*/*"})
        await self._pool.execute(sql, body)
        return web.Response(status=201, headers={"Content-Range": "*/*"})

    async def _select(self, request: web.Request, schema: str, table: str) -> web.Response:
        cols_types = await self._columns(schema, table)
        if cols_types is None:
            return self._missing_table(schema, table)
        types = dict(cols_types)
        q = request.query
        sel = q.get("select", "*")
        if sel.strip() in ("", "*"):
            sel_sql = "*"
        else:
            names = _split_list(sel)
            for n in names:
                if n not in types:
                    return _error(400, "42703", f"column {table}.{n} does not exist")
            sel_sql = ", ".join(_qi(n) for n in names)
        where, args = [], []
        for col, expr in q.items():
            if col in _RESERVED:
                continue
            if col not in types:
                return _error(400, "42703", f"column {table}.{col} does not exist")
            op, _, val = expr.partition(".")
            typ = types[col]
            if op in _OPS:
                args.append(val)
                where.append(f"{_qi(col)} {_OPS[op]} CAST(${len(args)}::text AS {typ})")
            elif op == "in":
                args.append(_split_list(val.strip("()")))
                where.append(f"{_qi(col)} = ANY(CAST(${len(args)}::text[] AS {typ}[]))")
            elif op == "is" and val.lower() in ("null", "true", "false", "unknown"):
                where.append(f"{_qi(col)} IS {val.upper()}")
            else:
                return _error(400, "PGRST100", f'"failed to parse filter ({expr})" (line 1, column 1)')
        sql = f"SELECT {sel_sql} FROM {_qi(schema)}.{_qi(table)}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        if "order" in q:
            terms = []
            for term in _split_list(q["order"]):
                parts = term.split(".")
                if parts[0] not in types:
                    return _error(400, "42703", f"column {table}.{parts[0]} does not exist")
                t = _qi(parts[0])
                for mod in parts[1:]:
                    t += {"asc": " ASC", "desc": " DESC", "nullsfirst": " NULLS FIRST", "nullslast": " NULLS LAST"}.get(mod, "")
                terms.append(t)
            sql += " ORDER BY " + ", ".join(terms)
        for word in ("limit", "offset"):
            if word in q:
                if not q[word].isdigit():
                    return _error(400, "PGRST100", f"invalid {word}")
                sql += f" {word.upper()} {int(q[word])}"
        assert self._pool is not None
        text = await self._pool.fetchval(f"SELECT coalesce(json_agg(t), '[]')::text FROM ({sql}) t", *args)
        return web.Response(status=200, text=text, content_type="application/json")

    # -- Realtime ---------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("apikey") not in (self.key, self.anon_key):
            return web.json_response({"message": "Invalid API key"}, status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._subs[ws] = {}
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    m = json.loads(msg.data)
                    await self._on_message(ws, m)
                except (ValueError, KeyError, TypeError) as exc:
                    await ws.send_json({"topic": "phoenix", "event": "phx_error", "payload": {"reason": str(exc)}, "ref": None})
        finally:
            self._subs.pop(ws, None)
        return ws

    async def _on_message(self, ws: web.WebSocketResponse, m: dict[str, Any]) -> None:
        topic, event, ref, payload = m["topic"], m["event"], m.get("ref"), m.get("payload") or {}

        async def reply(response: dict[str, Any], status: str = "ok") -> None:
            await ws.send_json({"topic": topic, "event": "phx_reply", "payload": {"status": status, "response": response}, "ref": ref, "join_ref": m.get("join_ref")})

        if topic == "phoenix" and event == "heartbeat":
            await reply({})
        elif event == "phx_join":
            bindings = []
            for b in (payload.get("config") or {}).get("postgres_changes") or []:
                binding = {"id": random.randint(10_000_000, 99_999_999), "event": b.get("event", "*"), "schema": b.get("schema", "public"), "table": b.get("table"), "filter": b.get("filter")}
                bindings.append(binding)
                if binding["table"] and binding["table"] != "*":
                    await self._install_trigger(binding["schema"], binding["table"])
            self._subs[ws][topic] = bindings
            await reply({"postgres_changes": bindings})
            if bindings:
                await ws.send_json({"topic": topic, "event": "system", "ref": None, "payload": {"channel": topic.removeprefix("realtime:"), "extension": "postgres_changes", "message": "Subscribed to PostgreSQL", "status": "ok"}})
        elif event == "phx_leave":
            self._subs[ws].pop(topic, None)
            await reply({})
        elif event == "access_token":
            pass
        else:
            await reply({})

    async def _install_trigger(self, schema: str, table: str) -> None:
        """Feed a published table to Realtime (tables outside supabase_realtime are silent, as on Supabase)."""
        assert self._pool is not None
        published = await self._pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = 'supabase_realtime' AND schemaname = $1 AND tablename = $2)",
            schema, table,
        )
        if published:
            await self._pool.execute(TRIGGER_SQL.format(limit=NOTIFY_LIMIT, channel=CHANNEL, qname=f"{_qi(schema)}.{_qi(table)}"))

    async def _listen_loop(self) -> None:
        while True:
            con = None
            try:
                con = await asyncpg.connect(self.dsn)
                lost = asyncio.get_running_loop().create_future()
                con.add_termination_listener(lambda c: lost.done() or lost.set_result(None))
                await con.add_listener(CHANNEL, self._on_notify)
                self._listening.set()
                await lost
            except _CONN_ERRORS:
                await asyncio.sleep(0.2)
            finally:
                if con is not None and not con.is_closed():
                    con.terminate()

    def _on_notify(self, con: Any, pid: int, channel: str, payload: str) -> None:
        self._spawn(self._deliver(json.loads(payload)))

    async def _deliver(self, note: dict[str, Any]) -> None:
        schema, table = note["schema"], note["table"]
        await self._columns(schema, table)
        record = note.get("record")
        if record is None and self._pool is not None:  # payload was too big for NOTIFY
            text = await self._pool.fetchval(f"SELECT row_to_json(t)::text FROM {_qi(schema)}.{_qi(table)} t WHERE id = $1::text::uuid", str(note["id"]))
            record = json.loads(text) if text else None
        columns = [{"name": n, "type": t} for n, t in self._types.get(("typname", schema, table), [])]  # type: ignore[arg-type]
        data = {"schema": schema, "table": table, "commit_timestamp": note["commit_timestamp"], "type": note["type"], "columns": columns, "record": record, "errors": None}
        for ws, topics in list(self._subs.items()):
            for topic, bindings in list(topics.items()):
                ids = [b["id"] for b in bindings if b["event"] in ("*", note["type"]) and b["schema"] == schema and b["table"] in (None, "*", table) and _filter_ok(b["filter"], record)]
                if ids and not ws.closed:
                    await ws.send_json({"topic": topic, "event": "postgres_changes", "ref": None, "payload": {"ids": ids, "data": data}})
                    self.realtime_sent += 1


@web.middleware
async def _cors(request: web.Request, handler: Any) -> web.StreamResponse:
    """CORS as Supabase answers it, so a browser page on another origin can use PostgREST."""
    headers = {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "*"),
        "Access-Control-Expose-Headers": "Content-Range",
        "Access-Control-Max-Age": "600",
    }
    if request.method == "OPTIONS":
        return web.Response(status=204, headers=headers)
    resp = await handler(request)
    if not resp.prepared:
        resp.headers.update({k: v for k, v in headers.items() if k != "Access-Control-Max-Age"})
    return resp


def _filter_ok(flt: str | None, record: dict[str, Any] | None) -> bool:
    """Realtime filters `col=op.value` (eq, neq, in) compared as text; others pass."""
    if not flt or record is None:
        return True
    m = re.match(r"^([^=]+)=(eq|neq|in)\.(.*)$", flt)
    if not m:
        return True
    col, op, val = m.groups()
    actual = None if record.get(col) is None else str(record.get(col))
    if op == "eq":
        return actual == val
    if op == "neq":
        return actual != val
    return actual in _split_list(val.strip("()"))
