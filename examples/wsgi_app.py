"""A threaded WSGI app (stdlib wsgiref) with the embedded agent.

    .venv/bin/python examples/wsgi_app.py     # after make run; serves http://127.0.0.1:8000 briefly, then exits

`agent.start()` runs the agent on a daemon thread; `agent.timer` times each request and
`agent.counter` is safe from every request thread. At exit the agent stops by itself.
"""

from __future__ import annotations

import socketserver
import sys
import threading
import urllib.request
from wsgiref.simple_server import WSGIServer, make_server

import agent


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


@agent.timer("http.request.seconds", tags={"app": "wsgi"})
def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    agent.counter("http.requests", tags={"route": path, "method": environ["REQUEST_METHOD"]})
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello\n"]


def main(port: int = 8000, seconds: float = 0.5) -> None:
    agent.start({
        "agent": {"data_dir": ".sidecar-agent-example"},
        "server": {"enabled": False},
        "sinks": {"stdout": {"type": "jsonl", "path": "-", "policies": []}},
    })
    with make_server("127.0.0.1", port, app, server_class=ThreadingWSGIServer) as httpd:
        t = threading.Thread(target=httpd.serve_forever, daemon=True)
        t.start()
        for route in ("/", "/a", "/b"):  # a few requests so there is something to see
            urllib.request.urlopen(f"http://127.0.0.1:{httpd.server_address[1]}{route}").read()
        threading.Event().wait(seconds)
        httpd.shutdown()
    agent.flush()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
