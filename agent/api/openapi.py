"""GET /api/v1/openapi.json: an OpenAPI 3.1 description of every core route.

Served by the agent rather than kept as a file: the event body's schema comes from the
msgspec type the ingest endpoint decodes with (`msgspec.json.schema_components`), so it
cannot drift from the validator, and a client or fuzzer reads the description of the
very build it talks to. tests/test_openapi.py checks it names exactly the routes served
and fuzzes it with schemathesis.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec
from aiohttp import web

from agent.api.history import STEP_RANGE, TIME_RANGE
from agent.event import EventIn
from agent.history.store import AGGS
from agent.version import __version__

JSON = "application/json"
_ERROR = {"$ref": "#/components/schemas/Error"}
_OBJ: dict[str, Any] = {"type": "object"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "invalid parameters or body",
        401: "the token is missing or wrong (server.token is set)",
        403: "a browser Origin that may not change this agent",
        404: "no such sink, flag or file",
        413: "body larger than server.max_body_bytes",
        415: "a CORS-simple content type (text/plain, a form)",
        421: "a Host header this server does not serve (server.allowed_hosts)",
        503: "not ready (starting, journal full, store not running); see Retry-After",
    }
    return {str(c): _json(_ERROR, text[c]) for c in codes}


def _q(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _op(
    summary: str,
    responses: dict[str, Any],
    *,
    params: list[Any] | None = None,
    body: Any = None,
    public: bool = False,
    write: bool = False,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**responses, **_errors(421)}}
    if not public:
        op["responses"].update(_errors(401))
    else:
        op["security"] = []
    if write:
        op["responses"].update(_errors(403, 415))
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = body
    return op


_NUM = {"type": "number"}
# The ranges the history handlers accept (outside them: a 400 naming the parameter).
_TIME = {"type": "number", "minimum": TIME_RANGE[0], "maximum": TIME_RANGE[1]}
_LIST_OF_OBJ = {"type": "array", "items": _OBJ}
_SINK = _q("sink", "one sink's entries (404 when there is no such sink)")
_STATUS = _q("status", "pending, expired or corrupt", {"type": "string"})
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


@cache
def spec() -> dict[str, Any]:
    """The OpenAPI document (built once per process)."""
    (event_ref,), components = msgspec.json.schema_components([EventIn], ref_template="#/components/schemas/{name}")
    components["Error"] = {
        "type": "object",
        "properties": {"error": {"type": "string"}, "errors": _LIST_OF_OBJ},
        "required": ["error"],
    }
    accepted = {
        "type": "object",
        "properties": {"accepted": {"type": "integer"}, "ids": {"type": "array", "items": {"type": "string"}}},
        "required": ["accepted", "ids"],
    }
    events_body = {
        "required": True,
        "content": {
            JSON: {"schema": {"anyOf": [event_ref, {"type": "array", "items": event_ref}]}},
            # The same events, one JSON object a line / as a msgpack array.
            "application/x-ndjson": {"schema": {"type": "array", "items": event_ref}},
            "application/msgpack": {"schema": {"type": "array", "items": event_ref}},
        },
    }
    ready = {
        "type": "object",
        "properties": {"ready": {"type": "boolean"}, "problems": {"type": "array", "items": {"type": "string"}}},
        "required": ["ready", "problems"],
    }
    history = [
        _q("name", "event name"),
        _q("source", "source name"),
        _q("agent", "agent id"),
        _q("session", "session id"),
        _q("from", "epoch seconds", _TIME),
        _q("to", "epoch seconds", _TIME),
        _q("cursor", "the `next` value of the previous page"),
        _q("limit", "at most 1000", _NUM),
    ]
    series = [
        _q("name", "the event name (or all=1)"),
        _q("all", "1: every name (agg=count only)"),
        _q("agg", ", ".join(AGGS) + " (rate: growth per second; quantile: with q, from `<name>_bucket` series)"),
        _q("q", "the quantile for agg=quantile", {"type": "number", "minimum": 0, "maximum": 1}),
        _q("from", "epoch seconds", _TIME),
        _q("to", "epoch seconds", _TIME),
        _q(
            "step", "seconds per point", {"type": "number", "exclusiveMinimum": STEP_RANGE[0], "maximum": STEP_RANGE[1]}
        ),
    ]
    paths: dict[str, Any] = {
        "/healthz": {"get": _op("liveness", {"200": _json(_OBJ, "the process answers")}, public=True)},
        "/readyz": {
            "get": _op("readiness", {"200": _json(ready, "ready"), "503": _json(ready, "not ready")}, public=True)
        },
        "/metrics": {
            "get": _op(
                "Prometheus text (public with server.metrics_public)",
                {"200": {"description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}},
            )
        },
        "/": {
            "get": _op("the dashboard", {"200": {"description": "the page", "content": {"text/html": {}}}}, public=True)
        },
        "/ui/{path}": {
            "get": _op(
                "the dashboard's files",
                {"200": {"description": "a file", "content": {"*/*": {}}}, "404": {"description": "no such file"}},
                params=[{"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}],
                public=True,
            )
        },
        "/api/v1/openapi.json": {"get": _op("this document", {"200": _json(_OBJ, "OpenAPI 3.1")})},
        "/api/v1/status": {"get": _op("everything about the agent", {"200": _json(_OBJ, "status")})},
        "/api/v1/sinks": {
            "get": _op(
                "sinks: state, lag, breaker, DLQ depth",
                {
                    "200": _json(
                        {"type": "object", "properties": {"sinks": _LIST_OF_OBJ}, "required": ["sinks"]}, "sinks"
                    )
                },
            )
        },
        "/api/v1/losses": {
            "get": _op(
                "the loss ledger",
                {"200": _json({"type": "object", "required": ["total", "by_reason", "entries"]}, "losses")},
            )
        },
        "/api/v1/events": {
            "post": _op(
                "ingest: 202 only after the journal commit; all or none",
                {"202": _json(accepted, "journaled"), **_errors(400, 413, 503)},
                body=events_body,
                write=True,
            ),
            "get": _op(
                "history, newest first",
                {"200": _json({"type": "object", "required": ["events", "next"]}, "a page"), **_errors(400, 503)},
                params=history,
            ),
        },
        "/api/v1/series": {
            "get": _op(
                "one name aggregated per step", {"200": _json(_OBJ, "points"), **_errors(400, 503)}, params=series
            )
        },
        "/api/v1/names": {
            "get": _op(
                "the catalogue of names",
                {"200": _json({"type": "object", "required": ["names"]}, "names"), **_errors(503)},
            )
        },
        "/api/v1/ui-config": {
            "get": _op("the dashboard's data source and public settings", {"200": _json(_OBJ, "config")})
        },
        "/api/v1/stream": {
            "get": _op(
                "WebSocket of committed events (see agent/api/stream.py)",
                {"101": {"description": "switching to WebSocket"}, **_errors(400, 403)},
            )
        },
        "/api/v1/dlq": {
            "get": _op(
                "dead-letter entries, newest first",
                {
                    "200": _json({"type": "object", "required": ["entries", "next", "pending_events"]}, "entries"),
                    **_errors(400, 404),
                },
                params=[_SINK, _STATUS, _q("limit", "at most 1000"), _q("before", "entry id")],
            ),
            "delete": _op(
                "purge entries (counted as lost)",
                {"200": _json({"type": "object", "required": ["purged_events"]}, "purged"), **_errors(400, 404)},
                params=[_SINK, _STATUS],
                write=True,
            ),
        },
        "/api/v1/dlq/replay": {
            "post": _op(
                "replay pending entries now",
                {
                    "202": _json({"type": "object", "required": ["replaying", "pending_events"]}, "replaying"),
                    **_errors(400, 404),
                },
                params=[_SINK],
                write=True,
            )
        },
        "/api/v1/flags": {
            "get": _op(
                "flags and their audit trail",
                {"200": _json({"type": "object", "required": ["flags", "audit"]}, "flags"), **_errors(503)},
            )
        },
        "/api/v1/flags/health": {
            "get": _op(
                "contradictions between flags and config",
                {"200": _json({"type": "object", "required": ["ok", "problems"]}, "health"), **_errors(503)},
            )
        },
        "/api/v1/flags/{name}": {
            "put": _op(
                "set a runtime override (the body is the JSON value)",
                {"200": _json(_OBJ, "the flag"), **_errors(400, 404, 503)},
                params=[_NAME],
                body={"required": True, "content": {JSON: {"schema": {}}}},
                write=True,
            ),
            "delete": _op(
                "clear the runtime override",
                {"200": _json(_OBJ, "the flag"), **_errors(404, 503)},
                params=[_NAME],
                write=True,
            ),
        },
        "/api/v1/session": {
            "post": _op(
                "set the dashboard's session cookie (needs the token)", {"200": _json(_OBJ, "session")}, write=True
            ),
            "delete": _op("clear the session cookie", {"200": _json(_OBJ, "session")}, write=True),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sidecar-agent",
            "version": __version__,
            "description": "See docs/security.md for the token.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"token": []}],
    }


async def openapi_json(request: web.Request) -> web.Response:
    """The core document plus, with a generic entry each, the routes plugins added."""
    doc = spec()
    extra: dict[str, dict[str, Any]] = {}
    for route in request.app.router.routes():
        resource = route.resource
        method = route.method.lower()
        if resource is None or method in ("head", "*"):
            continue
        path = resource.canonical
        if method not in doc["paths"].get(path, {}):
            extra.setdefault(path, {})[method] = {
                "summary": "added by a plugin (see /api/v1/status for plugins)",
                "responses": {"default": {"description": "as the plugin answers"}},
            }
    if extra:
        doc = {**doc, "paths": {**doc["paths"], **extra}}
    return web.json_response(doc)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/openapi.json", openapi_json)
