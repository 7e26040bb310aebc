"""The HTTP side: /metrics (Prometheus text or OpenMetrics, gzip when asked) and a landing page at /."""

from __future__ import annotations

import html
import logging
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from migexport import __version__

log = logging.getLogger(__name__)

LANDING_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>migexport</title></head>
<body>
<h1>migexport {version}</h1>
<p>PostgreSQL migration exporter watching: {targets}.</p>
<p><a href="/metrics">Metrics</a></p>
</body></html>
"""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _ThreadingWSGIServerV6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        log.debug("http: " + format, *args)


def make_app(registry: CollectorRegistry, target_names: list[str]):
    metrics_app = make_wsgi_app(registry)
    page = LANDING_PAGE.format(
        version=__version__, targets=", ".join(html.escape(n) for n in target_names) or "no targets"
    ).encode()

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [page]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found; metrics are at /metrics\n"]

    return app


class MetricsServer:
    """A threaded HTTP server in a background thread; `port` is the one actually bound."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, target_names: list[str]) -> None:
        self._server = make_server(
            host,
            port,
            make_app(registry, target_names),
            server_class=_ThreadingWSGIServerV6 if ":" in host else _ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        self.host = host
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="migexport-http", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
