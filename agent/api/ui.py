"""The dashboard's static files from the sidecar_ui package, with a strict CSP.

The files are small and few, so they are served from memory (read once, re-read when
their mtime changes) with an ETag: no executor thread or sendfile per request, and a
repeat visit costs a 304. This is on the path to the first painted chart.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
from importlib import resources
from pathlib import Path

from aiohttp import web

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss: http: https:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".txt": "text/plain",
    ".md": "text/plain",
}


def ui_root() -> Path:
    """Where the dashboard's files are installed."""
    return Path(str(resources.files("sidecar_ui")))


def is_licence(path: Path) -> bool:
    """The vendored libraries' licence texts, which have no suffix."""
    return path.name in ("LICENSE", "LICENCE") or path.parent.name == "licenses"


class StaticFiles:
    """Serves files under `root` from an in-memory cache keyed by path and mtime."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.cache: dict[Path, tuple[int, bytes, str]] = {}

    def load(self, rel: str) -> tuple[bytes, str] | None:
        """The file's bytes and ETag, or None when `rel` is not a file under the root."""
        try:
            path = (self.root / rel).resolve()
        except (ValueError, OSError):  # e.g. an embedded NUL byte
            return None
        if not path.is_relative_to(self.root) or any(p.startswith(".") for p in path.relative_to(self.root).parts):
            return None
        if path.suffix.lower() not in TYPES and not is_licence(path):
            return None  # only the page's own kinds of file: never __init__.py or caches
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return None
        hit = self.cache.get(path)
        if hit is None or hit[0] != mtime:
            if not path.is_file():
                return None
            body = path.read_bytes()
            hit = (mtime, body, '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"')
            self.cache[path] = hit
        return hit[1], hit[2]

    def response(self, request: web.Request, rel: str, headers: dict[str, str] | None = None) -> web.Response:
        found = self.load(rel)
        if found is None:
            raise web.HTTPNotFound()
        body, etag = found
        # no-cache: the browser revalidates each visit (a 304 here), so an upgrade shows at once.
        hdrs = {"ETag": etag, "Cache-Control": "no-cache", **(headers or {})}
        suffix = Path(rel).suffix.lower()
        ctype = TYPES.get(suffix) or mimetypes.guess_type(rel)[0] or "application/octet-stream"
        if ctype == "text/html":  # every page, however it is reached, gets the CSP
            hdrs["Content-Security-Policy"] = CSP
        wanted = request.headers.get("If-None-Match", "")
        if etag in wanted or wanted.strip() == "*":
            return web.Response(status=304, headers=hdrs)
        if is_licence(Path(rel)):
            ctype = "text/plain"
        charset = "utf-8" if ctype.startswith("text/") or ctype.endswith(("json", "javascript", "svg+xml")) else None
        return web.Response(body=body, content_type=ctype, charset=charset, headers=hdrs)


def add_routes(app: web.Application) -> None:
    files = StaticFiles(ui_root())

    async def index(request: web.Request) -> web.Response:
        return files.response(request, "index.html")

    async def static(request: web.Request) -> web.Response:
        return files.response(request, request.match_info["path"])

    app.router.add_get("/", index)
    app.router.add_get("/ui/{path:.+}", static)
