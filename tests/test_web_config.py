"""TLS and basic auth on /metrics (`--web.config.file`), and the HTTP server's limits.

Certificates come from trustme; a real Prometheus scrapes `migexport serve` over TLS with basic auth.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import socket
import ssl
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
import trustme
import yaml

from conftest import monitor_dsn, prometheus_server, wait_for
from migexport.http import HEADER_TIMEOUT_SECONDS, MAX_CONNECTIONS, MetricsServer
from migexport.localpg import free_port
from migexport.web_config import load_web_config
from test_cli import migexport_argv, run_cli

PASSWORD = "Scr4pe-Pa55"
USER = "prometheus"


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert: Path  # client certificate and key in one PEM, issued by the same CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(d / "server.crt")
    server.private_key_pem.write_to_path(d / "server.key")
    ca.cert_pem.write_to_path(d / "ca.crt")
    ca.issue_cert("scraper@example.com").private_key_and_cert_chain_pem.write_to_path(d / "client.pem")
    return Pki(ca, d / "ca.crt", d / "server.crt", d / "server.key", d / "client.pem")


def web_yml(tmp: Path, pki: Pki, rounds: int = 4, **tls: str) -> Path:
    """A web config with TLS (plus the `tls` keys) and one user; cost 4: bcrypt is fast where time does not matter."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=rounds)).decode()
    doc = {
        "tls_server_config": {"cert_file": str(pki.cert_file), "key_file": str(pki.key_file), **tls},
        "basic_auth_users": {USER: hashed},
        "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
    }
    path = tmp / "web.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class Served:
    port: int
    proc: subprocess.Popen

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        _, err = self.proc.communicate(timeout=20)
        return err


@contextlib.contextmanager
def serve(*args: str) -> Iterator[Served]:
    """`migexport serve` on a free loopback port, listening (its port accepts) for the body."""
    port = free_port()
    proc = subprocess.Popen(
        [*migexport_argv(), "serve", "--listen", f"127.0.0.1:{port}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    served = Served(port, proc)

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {served.stop()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
        return False

    try:
        wait_for(listening, timeout=20, what="serve to listen")
        yield served
    finally:
        served.stop()


def request(
    port: int,
    pki: Pki | None,
    auth: tuple[str, str] | None = None,
    method: str = "GET",
    path: str = "/metrics",
    client_cert: Path | None = None,
) -> tuple[int, dict[str, str], bytes]:
    if pki is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        ctx = ssl.create_default_context(cafile=str(pki.ca_file))
        if client_cert is not None:
            ctx.load_cert_chain(client_cert)
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


PROMETHEUS_CONFIG = """
global: {{scrape_interval: 1s, scrape_timeout: 900ms}}
scrape_configs:
  - job_name: migexport
    scheme: https
    tls_config: {{ca_file: {ca}}}
    basic_auth: {{username: {user}, password: {password}}}
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
  - job_name: wrong-password
    scheme: https
    tls_config: {{ca_file: {ca}}}
    basic_auth: {{username: {user}, password: not-it}}
    static_configs: [{{targets: ["127.0.0.1:{port}"]}}]
"""


def open_idle(port: int, n: int) -> list[socket.socket]:
    """n connections that never send a byte (nor a TLS hello)."""
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]


def test_prometheus_scrapes_over_tls_with_basic_auth_despite_idle_connections(pg, pki: Pki, tmp_path: Path):
    """The acceptance: a real Prometheus scrapes over TLS with basic auth (up 1, migexport metrics in);
    wrong credentials read up 0; and MAX_CONNECTIONS+1 idle connections do not stop the next scrapes."""
    web = web_yml(tmp_path, pki)
    with serve("--target", f"primary={monitor_dsn(pg.primary)}", "--web.config.file", str(web)) as served:
        config = PROMETHEUS_CONFIG.format(ca=pki.ca_file, user=USER, password=PASSWORD, port=served.port)
        with prometheus_server(tmp_path, config) as prom:

            def up(job: str) -> list[float]:
                return [float(r["value"][1]) for r in prom.query(f'up{{job="{job}"}}')]

            wait_for(lambda: up("migexport") == [1.0] and up("wrong-password") == [0.0], what="the first scrapes")
            assert [r["value"][1] for r in prom.query('migexport_up{job="migexport", target="primary"}')] == ["1"]
            families = prom.query('count(count by (__name__) ({job="migexport", __name__=~"migexport_.+"}))')
            assert int(families[0]["value"][1]) > 20, families

            idle = open_idle(served.port, MAX_CONNECTIONS + 1)
            try:
                # Scrapes every second while the idle connections would hold every slot for their 10 s.
                time.sleep(5)
                ups = prom.query('min_over_time(up{job="migexport"}[4s])')
                scrapes = prom.query('count_over_time(up{job="migexport"}[4s])')
                slowest = prom.query('max_over_time(scrape_duration_seconds{job="migexport"}[4s])')
                assert float(ups[0]["value"][1]) == 1 and float(scrapes[0]["value"][1]) >= 3, (ups, scrapes)
                print(
                    f"{scrapes[0]['value'][1]} scrapes with {len(idle)} idle connections open: all up, "
                    f"slowest {float(slowest[0]['value'][1]) * 1000:.0f} ms"
                )
            finally:
                for sock in idle:
                    sock.close()
    stderr = served.stop()
    assert PASSWORD not in stderr and "Traceback" not in stderr, stderr


def test_missing_or_wrong_credentials_get_401_and_head_answers_without_body(pki: Pki, tmp_path: Path):
    web = web_yml(tmp_path, pki)
    with serve("--target", "a=host=127.0.0.1 port=1", "--web.config.file", str(web)) as served:
        for auth in (None, (USER, "wrong"), ("nobody", PASSWORD), (USER, "")):
            status, headers, body = request(served.port, pki, auth)
            assert status == 401, (auth, status)
            assert headers["www-authenticate"].startswith("Basic"), headers
            assert body.count(b"\n") == 1, body  # one line
        status, headers, body = request(served.port, pki, (USER, PASSWORD), path="/")
        assert status == 200 and b"migexport" in body
        assert headers["x-content-type-options"] == "nosniff"
        _, get_headers, _ = request(served.port, pki, (USER, PASSWORD))
        status, headers, body = request(served.port, pki, (USER, PASSWORD), method="HEAD")
        assert status == 200 and body == b""
        assert headers["content-type"] == get_headers["content-type"]
        assert int(headers["content-length"]) > 0
        assert request(served.port, pki, (USER, PASSWORD), method="POST")[0] == 405


def test_head_without_web_config(pg):
    with serve("--target", f"primary={monitor_dsn(pg.primary)}") as served:
        status, headers, body = request(served.port, None, method="HEAD")
        assert status == 200 and body == b""
        assert headers["content-type"].startswith("text/plain") and int(headers["content-length"]) > 100
        status, _, body = request(served.port, None, method="HEAD", path="/nope")
        assert status == 404 and body == b""


def _timed(port: int, pki: Pki, auth: tuple[str, str]) -> float:
    start = time.perf_counter()
    status, _, _ = request(port, pki, auth)
    assert status == 401
    return time.perf_counter() - start


def test_wrong_user_and_wrong_password_take_the_same_time(pki: Pki, tmp_path: Path):
    """An unknown user still pays a bcrypt check (against a dummy hash of the same cost), so user names
    cannot be told apart by timing. Cost 10, as a real hash would have; 20 requests each, interleaved."""
    web = web_yml(tmp_path, pki, rounds=10)
    with serve("--target", "a=host=127.0.0.1 port=1", "--web.config.file", str(web)) as served:
        _timed(served.port, pki, (USER, "warm-up"))
        wrong_user, wrong_password = [], []
        for i in range(20):
            wrong_user.append(_timed(served.port, pki, (f"nobody{i}", PASSWORD)))
            wrong_password.append(_timed(served.port, pki, (USER, f"wrong{i}")))
        started = time.perf_counter()
        assert request(served.port, pki, (USER, PASSWORD))[0] == 200
        first = time.perf_counter() - started
        started = time.perf_counter()
        assert request(served.port, pki, (USER, PASSWORD))[0] == 200
        cached = time.perf_counter() - started
    user_ms, password_ms = statistics.median(wrong_user) * 1000, statistics.median(wrong_password) * 1000
    print(
        f"median of 20: wrong user {user_ms:.1f} ms, wrong password {password_ms:.1f} ms; "
        f"right password {first * 1000:.1f} ms, then cached {cached * 1000:.1f} ms"
    )
    # Without the dummy check a wrong user answers ~100x faster; only a gross difference can fail this.
    assert 0.5 < user_ms / password_ms < 2, (user_ms, password_ms)
    assert cached < first


def test_client_certificate_required(pki: Pki, tmp_path: Path):
    web = web_yml(tmp_path, pki, client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(pki.ca_file))
    with serve("--target", "a=host=127.0.0.1 port=1", "--web.config.file", str(web)) as served:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            request(served.port, pki, (USER, PASSWORD))
        assert request(served.port, pki, (USER, PASSWORD), client_cert=pki.client_cert)[0] == 200
        # A certificate from another CA is no better than none.
        other = trustme.CA().issue_cert("intruder@example.com")
        other.private_key_and_cert_chain_pem.write_to_path(tmp_path / "other.pem")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            request(served.port, pki, (USER, PASSWORD), client_cert=tmp_path / "other.pem")


def _bad_configs(pki: Pki, tmp: Path) -> list[tuple[str, str]]:
    good = {"cert_file": str(pki.cert_file), "key_file": str(pki.key_file)}
    hashed = bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=4)).decode()
    unreadable = tmp / "unreadable.key"
    unreadable.write_text("not a key\n")
    need_ca = {"tls_server_config": {**good, "client_auth_type": "RequireAndVerifyClientCert"}}
    return [
        (yaml.safe_dump({"tls_server_config": {**good, "cert_fiel": "x"}}), "tls_server_config.cert_fiel: unknown key"),
        (yaml.safe_dump({"basic_auth_user": {"u": hashed}}), "basic_auth_user: unknown key"),
        (yaml.safe_dump({"tls_server_config": {**good, "cert_file": str(tmp / "missing.crt")}}), "cannot load"),
        (yaml.safe_dump({"tls_server_config": {**good, "key_file": str(unreadable)}}), "cannot load"),
        (yaml.safe_dump({"basic_auth_users": {"u": "hunter2-plain"}}), "basic_auth_users.u: not a bcrypt hash"),
        (yaml.safe_dump(need_ca), "client_ca_file: is required"),
        (yaml.safe_dump({"tls_server_config": {**good, "client_auth_type": "Sometimes"}}), "client_auth_type"),
        (yaml.safe_dump({"tls_server_config": {**good, "min_version": "SSL3"}}), "min_version"),
        (yaml.safe_dump({"tls_server_config": {**good, "cipher_suites": ["x"]}}), "cipher_suites: not supported"),
        (yaml.safe_dump({"http_server_config": {"headers": {"Server": "x"}}}), "headers.Server: unknown key"),
        ("tls_server_config: [\n", "not valid YAML"),
        ("\xff\xfe", "not UTF-8"),
    ]


def test_bad_web_config_is_one_line_and_exit_2(pki: Pki, tmp_path: Path):
    for i, (text, expected) in enumerate(_bad_configs(pki, tmp_path)):
        path = tmp_path / f"bad{i}.yml"
        path.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
        proc = run_cli("serve", "--target", "a=host=127.0.0.1 port=1", "--web.config.file", str(path))
        assert proc.returncode == 2, (expected, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0], (expected, proc.stderr)
        assert "hunter2" not in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("serve", "--target", "a=host=127.0.0.1 port=1", "--web.config.file", str(tmp_path / "none.yml"))
    assert proc.returncode == 2 and proc.stderr.strip().endswith("cannot read: No such file or directory")


def test_web_config_file_from_the_config(pki: Pki, tmp_path: Path):
    web_yml(tmp_path, pki)
    config = tmp_path / "migexport.yml"
    config.write_text("targets:\n  a:\n    dsn: host=127.0.0.1 port=1\nweb_config_file: web.yml\n")
    with serve("-c", str(config)) as served:
        # The web config's path is relative to the config file.
        assert request(served.port, pki)[0] == 401
        assert request(served.port, pki, (USER, PASSWORD))[0] == 200


def test_changed_web_config_applies_without_restart(pki: Pki, tmp_path: Path):
    web = web_yml(tmp_path, pki)
    page = "# HELP probe a gauge\n# TYPE probe gauge\nprobe 1.0\n"
    server = MetricsServer("127.0.0.1", 0, lambda: page, ["a"], load_web_config(web)).start()
    try:
        assert request(server.port, pki, (USER, PASSWORD))[0] == 200
        new = bcrypt.hashpw(b"rotated", bcrypt.gensalt(rounds=4)).decode()
        text = web.read_text().replace(yaml.safe_load(web.read_text())["basic_auth_users"][USER], new)
        web.write_text(text)
        os.utime(web, ns=(time.time_ns(), time.time_ns() + 10**9))  # a different mtime even on coarse clocks
        wait_for(lambda: request(server.port, pki, (USER, "rotated"))[0] == 200, timeout=5, what="the new password")
        assert request(server.port, pki, (USER, PASSWORD))[0] == 401
        web.write_text("basic_auth_users: {bad: plain}\n" + text)  # broken: the last good one stays
        time.sleep(1.2)
        assert request(server.port, pki, (USER, "rotated"))[0] == 200
    finally:
        server.stop()


def _closed_after(sock: socket.socket, trickle: bool = False) -> float:
    """Seconds until the server closes a connection that never completes its request."""
    start = time.monotonic()
    sock.settimeout(1)
    if trickle:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
    while time.monotonic() - start < HEADER_TIMEOUT_SECONDS * 3:
        try:
            if sock.recv(1024) == b"":
                return time.monotonic() - start
        except TimeoutError:
            if trickle:
                sock.sendall(b"X-Slow: 1\r\n")  # a header a second: each read alone is quick
        except ConnectionError:
            return time.monotonic() - start
    return float("inf")


def test_idle_and_trickling_connections_are_closed_within_the_header_timeout(pki: Pki, tmp_path: Path):
    web = web_yml(tmp_path, pki)
    with (
        serve("--target", "a=host=127.0.0.1 port=1") as plain,
        serve("--target", "a=host=127.0.0.1 port=1", "--web.config.file", str(web)) as tls,
    ):
        cases = {
            "idle": (plain.port, False),
            "trickling headers": (plain.port, True),
            "idle before the TLS handshake": (tls.port, False),
        }
        results: dict[str, float] = {}

        def run(name: str, port: int, trickle: bool) -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                results[name] = _closed_after(sock, trickle)

        threads = [threading.Thread(target=run, args=(n, *c)) for n, c in cases.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print("closed after: " + ", ".join(f"{n} {s:.1f} s" for n, s in results.items()))
    for name, seconds in results.items():
        assert HEADER_TIMEOUT_SECONDS - 1 < seconds < HEADER_TIMEOUT_SECONDS + 3, (name, seconds)


def test_readme_example_web_config_is_accepted(pki: Pki, tmp_path: Path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = "#" + readme.split("```yaml\n# web.yml:", 1)[1].split("```", 1)[0]
    doc = yaml.safe_load(block)
    doc["tls_server_config"].update(cert_file=str(pki.cert_file), key_file=str(pki.key_file))
    path = tmp_path / "readme-web.yml"
    path.write_text(yaml.safe_dump(doc))
    config = load_web_config(path)
    assert config.tls is not None and config.auth is not None and len(config.headers) == 2


def test_basic_auth_without_tls_works_and_warns(tmp_path: Path):
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  {USER}: '{hashed}'\n")
    with serve("--target", "a=host=127.0.0.1 port=1", "--web.config.file", str(web)) as served:
        assert request(served.port, None)[0] == 401
        assert request(served.port, None, (USER, PASSWORD))[0] == 200
    stderr = served.stop()
    assert "basic auth without TLS: passwords cross the network in clear text" in stderr
    assert PASSWORD not in stderr
