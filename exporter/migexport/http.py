"""The HTTP side: /metrics (the Prometheus text format, gzip when asked) and a landing page at /.

Hardened to sit on a network next to production: optional TLS and basic auth (`web_config.py`), a
deadline for the request line and headers, a cap on concurrent connections where an idle connection
makes room for a new one (so a few idle or half-sent connections can never lock Prometheus out), and
HEAD answered like GET without the body.
"""

from __future__ import annotations

import contextlib
import gzip
import heapq
import html
import io
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from migexport import __version__
from migexport.metrics import CONTENT_TYPE
from migexport.web_config import WebConfig, WebConfigSource

log = logging.getLogger(__name__)

# A client has this long for the TLS handshake, the request line and the headers together, and this long
# for each later read or write: a scrape sends its request at once, so only idle or stalled clients wait.
HEADER_TIMEOUT_SECONDS = 10.0
# Concurrent connections (one thread each). Prometheus uses one per scrape; more is a curl or a misuse.
MAX_CONNECTIONS = 32
# How long a new connection may wait for a slot (after an idle one was closed to make room) before a 503.
SLOT_WAIT_SECONDS = 1.0

LANDING_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>migexport</title></head>
<body>
<h1>migexport {version}</h1>
<p>PostgreSQL migration exporter watching: {targets}.</p>
<p><a href="/metrics">Metrics</a></p>
</body></html>
"""

TEXT = ("Content-Type", "text/plain; charset=utf-8")
REFUSED = b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\ntoo many connections\n"


class _Waiting:
    """Connections still in their handshake or headers: the ones that may be closed to make room."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: dict[int, tuple[float, socket.socket]] = {}

    # Keyed by the connection's thread: the socket object changes when TLS wraps it.
    def add(self, sock: socket.socket) -> None:
        with self._lock:
            since = self._socks.get(threading.get_ident(), (time.monotonic(), sock))[0]
            self._socks[threading.get_ident()] = (since, sock)

    def remove(self) -> None:
        with self._lock:
            self._socks.pop(threading.get_ident(), None)

    def close_oldest(self) -> bool:
        with self._lock:
            if not self._socks:
                return False
            key = heapq.nsmallest(1, self._socks, key=lambda k: self._socks[k][0])[0]
            _, sock = self._socks.pop(key)
        # Wakes its thread's blocked read with end-of-file; the thread then closes the socket.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return True


class _HardenedWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def setup_limits(self, web: WebConfigSource, header_timeout: float, max_connections: int, slot_wait: float) -> None:
        self.web = web
        self.header_timeout = header_timeout
        self.slot_wait = slot_wait
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self.waiting = _Waiting()

    def process_request(self, request: Any, client_address: Any) -> None:
        """In the accept thread: take a slot (closing the oldest idle connection if none is free) or refuse."""
        if not self._slots.acquire(blocking=False):
            self.waiting.close_oldest()
            if not self._slots.acquire(timeout=self.slot_wait):
                log.warning("http: %d connections busy; refused one from %s", self.max_connections, client_address[0])
                self._refuse(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def _refuse(self, request: socket.socket) -> None:
        if self.web.current().tls is None:
            with contextlib.suppress(OSError):
                request.settimeout(0.2)
                request.sendall(REFUSED)
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: TLS handshake under the header deadline, then the request."""
        request.settimeout(self.header_timeout)
        self.waiting.add(request)
        conn = request
        try:
            context = self.web.current().ssl_context
            if context is not None:
                conn = context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
                self.waiting.add(conn)
                _with_deadline(conn, time.monotonic() + self.header_timeout, conn.do_handshake)
            self.RequestHandlerClass(conn, client_address, self)
        except (OSError, ValueError) as exc:  # timeouts, resets, failed handshakes, sockets closed to make room
            log.debug("http: connection from %s ended: %s", client_address[0], exc)
        finally:
            self.waiting.remove()
            if conn is not request:
                _close(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback on stderr; a client's misbehaviour is worth a debug line at most.
        log.debug("http: error serving %s", client_address[0], exc_info=True)


def _with_deadline(sock: socket.socket, deadline: float, call: Callable[[], Any]) -> Any:
    """Run a blocking socket call with the socket's timeout cut to what is left until the deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    previous = sock.gettimeout()
    sock.settimeout(left)
    try:
        return call()
    finally:
        sock.settimeout(previous)


def _close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.close()


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, each bounded by one deadline while the request line and headers arrive
    (a client trickling a byte every few seconds cannot hold a thread for longer than the deadline)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self.deadline: float | None = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is None:
            return self._sock.recv_into(buffer)
        return _with_deadline(self._sock, self.deadline, lambda: self._sock.recv_into(buffer))


class _Handler(WSGIRequestHandler):
    server: _HardenedWSGIServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's own reader: left open, it would keep the socket from closing
        self.connection.settimeout(self.server.header_timeout)
        self._reader = _DeadlineReader(self.connection, time.monotonic() + self.server.header_timeout)
        self.rfile = io.BufferedReader(self._reader)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        # Headers are in: from here the connection is a request being served, never closed to make room.
        self._reader.deadline = None
        self.server.waiting.remove()
        return ok

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # One line of plain text instead of http.server's HTML page.
        try:
            self.send_response(code, message)
            self.send_header(*TEXT)
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(f"{code} {message or self.responses.get(code, ('',))[0]}\n".encode())
        except OSError:
            pass
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http: " + format, *args)


def _metrics_app(exposition: Callable[[], str]):
    """/metrics: the page of one scrape, gzipped when the client accepts it (Prometheus does)."""

    def app(environ, start_response) -> Iterable[bytes]:
        body = exposition().encode()
        headers = [("Content-Type", CONTENT_TYPE)]
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            body = gzip.compress(body, compresslevel=1)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", [*headers, ("Content-Length", str(len(body)))])
        return [body]

    return app


def make_app(exposition: Callable[[], str], target_names: list[str], web: WebConfigSource | None = None):
    metrics_app = _metrics_app(exposition)
    page = LANDING_PAGE.format(
        version=__version__, targets=", ".join(html.escape(n) for n in target_names) or "no targets"
    ).encode()
    web = web or WebConfigSource(WebConfig())

    def route(environ, start_response) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [page]
        start_response("404 Not Found", [TEXT])
        return [b"not found; metrics are at /metrics\n"]

    def app(environ, start_response) -> Iterable[bytes]:
        config = web.current()
        method = environ.get("REQUEST_METHOD", "GET")

        def respond(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, headers + list(config.headers), exc_info)

        if config.auth is not None and not config.auth.check(environ.get("HTTP_AUTHORIZATION")):
            respond("401 Unauthorized", [TEXT, ("WWW-Authenticate", 'Basic realm="migexport", charset="UTF-8"')])
            return [] if method == "HEAD" else [b"unauthorized: give the user and password of basic_auth_users\n"]
        if method == "OPTIONS":
            respond("200 OK", [("Allow", "GET, HEAD, OPTIONS"), ("Content-Length", "0")])
            return []
        if method not in ("GET", "HEAD"):
            respond("405 Method Not Allowed", [TEXT, ("Allow", "GET, HEAD, OPTIONS")])
            return [f"method {method} not allowed; use GET or HEAD\n".encode()]
        if method == "GET":
            return route(environ, respond)
        return _head(route, environ, respond)

    return app


def _head(route, environ: dict, respond) -> Iterable[bytes]:
    """HEAD: the GET response's status and headers (Content-Length included), no body."""
    captured: list[Any] = []
    body = b"".join(route({**environ, "REQUEST_METHOD": "GET"}, lambda *a: captured.append(a)))
    status, headers = captured[0][0], list(captured[0][1])
    if not any(name.lower() == "content-length" for name, _ in headers):
        headers.append(("Content-Length", str(len(body))))
    respond(status, headers)
    return []


class MetricsServer:
    """A threaded HTTP(S) server in a background thread; `port` is the one actually bound."""

    def __init__(
        self,
        host: str,
        port: int,
        exposition: Callable[[], str],
        target_names: list[str],
        web_config: WebConfig | None = None,
        header_timeout: float = HEADER_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.web = WebConfigSource(web_config or WebConfig())
        server_class = type("_Server", (_HardenedWSGIServer,), {"address_family": _family(host)})
        self._server = make_server(
            host, port, make_app(exposition, target_names, self.web), server_class=server_class, handler_class=_Handler
        )
        self._server.setup_limits(self.web, header_timeout, max_connections, SLOT_WAIT_SECONDS)
        self.host = host
        self.port = self._server.server_port
        self.scheme = "https" if self.web.current().tls else "http"
        self._thread = threading.Thread(target=self._server.serve_forever, name="migexport-http", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
