"""The dashboard's static files from the sidecar_ui package, with a strict CSP."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from aiohttp import web

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss: http: https:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def ui_root() -> Path:
    """Where the dashboard's files are installed."""
    return Path(str(resources.files("sidecar_ui")))


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(ui_root() / "index.html", headers={"Content-Security-Policy": CSP,
                                                               "Cache-Control": "no-cache"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_static("/ui/", ui_root(), show_index=False, append_version=False)
