"""Supabase sink: upserts events into a table through PostgREST with supabase-py (async).

Writes are idempotent: `upsert(..., on_conflict="id", ignore_duplicates=True)` becomes
`INSERT ... ON CONFLICT (id) DO NOTHING`, so re-sending a batch never duplicates rows.
Failures are mapped to RetryableError (5xx, 429, timeouts, connection loss) or
PermanentError (bad data, constraints, auth, missing table, an event that cannot be
converted to a row); the core retries the former and bisects a batch that raised the latter.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from agent.plugin import (
    BaseSink,
    Event,
    PermanentError,
    PluginContext,
    PluginError,
    RegisterComponent,
    RetryableError,
    check_identifier,
    hookimpl,
    parse_retry_after,
    sqlstate_retryable,
    to_rest_row,
)

if TYPE_CHECKING:  # httpx and supabase-py are imported on first use: they take ~0.3 s to import
    import httpx
    from postgrest.exceptions import APIError


class SupabaseOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`[sinks.supabase]` options."""

    url: str
    key: str  # the service role key: it bypasses row-level security
    schema: str = "public"
    table: str = "monitoring_events"
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    # At least the worker's batches in flight (SupabaseSink.max_in_flight), so none waits for a connection.
    max_connections: Annotated[int, msgspec.Meta(gt=0)] = 16


# (status, Retry-After seconds) of the last response seen in this task; set by an
# httpx response hook because postgrest's APIError carries neither.
_last_response: contextvars.ContextVar[tuple[int, float | None] | None] = contextvars.ContextVar(
    "sidecar_supabase_last_response", default=None
)


async def _record_response(response: httpx.Response) -> None:
    _last_response.set((response.status_code, parse_retry_after(response.headers.get("Retry-After"))))


def _status_retryable(status: int) -> bool:
    return status >= 500 or status in (408, 425, 429)


def map_api_error(exc: APIError, status: int | None = None, retry_after: float | None = None) -> Exception:
    """Map a PostgREST error to RetryableError or PermanentError.

    `exc.code` is a SQLSTATE, a PGRSTxxx code, or the HTTP status as a string when the
    body was not PostgREST JSON; `status` is the HTTP status when known.
    """
    code = (exc.code or "").strip()
    msg = f"supabase: {code or status or '?'} {exc.message or ''}".rstrip()
    if exc.details:
        msg += f" ({exc.details})"[:500]
    retryable: bool | None
    if code.isdigit() and len(code) == 3:
        retryable = _status_retryable(int(code))
    elif code.upper().startswith("PGRST"):
        # PGRST0xx: PostgREST could not reach or use the database (connection, pool
        # timeout, schema cache load). Everything else is about the request itself.
        retryable = code[5:6] == "0"
    else:
        retryable = sqlstate_retryable(code)
    if retryable is None:
        # Unknown code: fall back to the HTTP status; no status either: assume transient
        # (the retry budget still ends in the DLQ).
        retryable = True if status is None else _status_retryable(status)
    if retryable:
        return RetryableError(msg, retry_after=retry_after)
    return PermanentError(msg)


class SupabaseSink(BaseSink):
    """Idempotent batched upserts into a Supabase table."""

    # send() may run concurrently (each call is its own HTTP request; the status contextvar
    # is per task): the delivery worker keeps this many batches in flight by default.
    max_in_flight = 16

    def __init__(self, name: str, options: SupabaseOptions, ctx: PluginContext) -> None:
        self.name = name
        self.options = options
        self.ctx = ctx
        check_identifier(options.schema, "schema")
        check_identifier(options.table, "table")
        self._http: httpx.AsyncClient | None = None
        self._client: Any = None
        ctx.stats.setdefault("nonfinite_values", 0)
        ctx.stats.setdefault("rows_sent", 0)

    async def start(self) -> None:
        if self._client is not None:
            return
        import httpx
        from supabase import AsyncClientOptions, acreate_client

        o = self.options
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(o.timeout_s, connect=min(o.connect_timeout_s, o.timeout_s)),
            limits=httpx.Limits(max_connections=o.max_connections, max_keepalive_connections=o.max_connections),
            event_hooks={"response": [_record_response]},
        )
        try:
            self._client = await acreate_client(
                o.url,
                o.key,
                options=AsyncClientOptions(schema=o.schema, httpx_client=self._http, auto_refresh_token=False),
            )
        except Exception as exc:
            await self._http.aclose()
            self._http = None
            raise PluginError(f"supabase sink {self.name}: cannot create client: {exc}") from exc

    async def send(self, events: list[Event]) -> None:
        if not events:
            return
        import httpx
        from postgrest.exceptions import APIError

        if self._client is None:
            await self.start()
        rows = [to_rest_row(e, self.ctx.stats) for e in events]  # PermanentError for an unconvertible event
        _last_response.set(None)
        try:
            await (
                self._client.table(self.options.table)
                .upsert(rows, on_conflict="id", ignore_duplicates=True, returning="minimal")
                .execute()
            )
        except APIError as exc:
            last = _last_response.get()
            status, retry_after = last if last else (None, None)
            raise map_api_error(exc, status, retry_after) from exc
        except httpx.TimeoutException as exc:
            raise RetryableError(f"supabase: timeout ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise RetryableError(f"supabase: transport error ({type(exc).__name__}: {exc})") from exc
        except (ValueError, TypeError) as exc:  # a row the JSON encoder refuses
            raise PermanentError(f"supabase: cannot encode batch: {exc}") from exc
        self.ctx.stats["rows_sent"] += len(rows)

    async def close(self) -> None:
        http, self._http, self._client = self._http, None, None
        if http is not None:
            await http.aclose()


@hookimpl
def register_sinks(register: RegisterComponent) -> None:
    register("supabase", SupabaseSink, options=SupabaseOptions)
