"""`--web.config.file`: TLS and basic auth on /metrics, in the Prometheus exporter-toolkit format.

The same file an official exporter (node_exporter, postgres_exporter) takes, so one file and one
Prometheus scrape config serve them all::

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional, with client_ca_file
      client_ca_file: ca.crt
      min_version: TLS12
    basic_auth_users:
      prometheus: $2b$12$...                         # bcrypt hash
    http_server_config:
      headers: {Strict-Transport-Security: max-age=31536000}

Every problem is one line naming its key; unknown keys are errors (a misspelt `client_auth_type` silently
falling back to "no client certificate" is how a server ends up open). Paths are relative to the file.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from migexport.config import _Reader

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 1 << 20
TOP_KEYS = {"tls_server_config", "basic_auth_users", "http_server_config"}
TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
# exporter-toolkit keys migexport does not implement: named as such rather than as unknown.
TLS_UNSUPPORTED = {"cert", "key", "client_ca", "cipher_suites", "curve_preferences", "prefer_server_cipher_suites"}
TLS_UNSUPPORTED |= {"client_allowed_sans"}
HTTP_KEYS = {"headers", "http2"}
# The headers exporter-toolkit lets a web config set (it refuses any other, and so do we).
ALLOWED_HEADERS = {
    "content-security-policy": "Content-Security-Policy",
    "strict-transport-security": "Strict-Transport-Security",
    "x-content-type-options": "X-Content-Type-Options",
    "x-frame-options": "X-Frame-Options",
    "x-xss-protection": "X-XSS-Protection",
}
# Go's crypto/tls names; Python cannot verify a client certificate without also checking it against a
# CA, so the two "any certificate" modes are refused instead of being quietly weakened or strengthened.
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
BCRYPT_HASH = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
# Successful checks remembered, so that a scrape every 15 s does not pay ~0.1-0.3 s of bcrypt each time.
AUTH_CACHE_SIZE = 128


class WebConfigError(ValueError):
    """A web config file that cannot be used; `problems` holds one printable line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TlsSettings:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str | None = None

    def files(self) -> tuple[Path, ...]:
        return (self.cert_file, self.key_file) + ((self.client_ca_file,) if self.client_ca_file else ())

    def context(self) -> ssl.SSLContext:
        """The server context; raises WebConfigError naming the file that cannot be used."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[self.min_version]
        if self.max_version:
            ctx.maximum_version = TLS_VERSIONS[self.max_version]
        try:
            # The callback stops OpenSSL from prompting on the terminal for an encrypted key's passphrase.
            ctx.load_cert_chain(self.cert_file, self.key_file, password=_no_passphrase)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise WebConfigError([f"tls_server_config.cert_file/key_file: cannot load: {_reason(exc)}"]) from None
        ctx.verify_mode = CLIENT_AUTH[self.client_auth_type]
        if self.client_ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=self.client_ca_file)
            except (ssl.SSLError, OSError) as exc:
                raise WebConfigError([f"tls_server_config.client_ca_file: cannot load: {_reason(exc)}"]) from None
        return ctx


def _no_passphrase() -> bytes:
    raise ValueError("the key is encrypted; give an unencrypted key_file")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        name = f"{exc.filename}: " if exc.filename else ""
        return f"{name}{exc.strerror or exc}"
    return str(exc)


class BasicAuth:
    """bcrypt-checked users. A wrong user costs the same bcrypt check as a wrong password."""

    def __init__(self, users: dict[str, bytes]) -> None:
        # Only with basic_auth_users: an exporter without them carries neither bcrypt nor hashlib's
        # OpenSSL binding (0.5 MiB) in memory.
        import hashlib

        import bcrypt

        self._bcrypt = bcrypt
        self._sha256 = hashlib.sha256
        self._users = users
        cost = max(int(BCRYPT_HASH.match(h.decode()).group(1)) for h in users.values())  # type: ignore[union-attr]
        # An unknown user is checked against this hash of the highest configured cost, so a wrong user and a
        # wrong password take the same time and user names cannot be probed.
        self._dummy = bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(rounds=cost))
        self._cache: set[bytes] = set()
        # One bcrypt at a time, as exporter-toolkit: a flood of bad passwords takes one core, not all of them.
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        """True when an `Authorization: Basic ...` header names a user with the right password."""
        user, password = _credentials(header)
        hashed = self._users.get(user, self._dummy) if user is not None else self._dummy
        key = self._sha256(b"\0".join([(user or "").encode(), hashed, password])).digest()
        if user is not None and user in self._users and key in self._cache:
            return True
        with self._lock:
            try:
                ok = self._bcrypt.checkpw(password, hashed)
            except ValueError:  # longer than bcrypt's 72 bytes: never a configured password
                ok = False
        ok = ok and user is not None and user in self._users
        if ok:
            if len(self._cache) >= AUTH_CACHE_SIZE:
                self._cache.clear()
            self._cache.add(key)
        return ok


def _credentials(header: str | None) -> tuple[str | None, bytes]:
    """(user, password) from a Basic header; (None, b"") when absent or malformed."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None, b""
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        return (user.decode("utf-8"), password) if sep else (None, b"")
    except (binascii.Error, UnicodeDecodeError):
        return None, b""


@dataclass(frozen=True)
class WebConfig:
    path: Path | None = None
    tls: TlsSettings | None = None
    ssl_context: ssl.SSLContext | None = None
    auth: BasicAuth | None = None
    headers: tuple[tuple[str, str], ...] = ()
    # What the file and the files it names looked like when read: a change means re-read.
    stamp: tuple = field(default=(), compare=False)

    def describe(self) -> str:
        parts = ["TLS" if self.tls else "no TLS"]
        if self.tls and self.tls.client_auth_type != "NoClientCert":
            parts.append(f"client certificates {self.tls.client_auth_type}")
        parts.append("basic auth" if self.auth else "no authentication")
        return ", ".join(parts)


def load_web_config(path: str | Path) -> WebConfig:
    """Read and check the file, load its certificates; raise WebConfigError with one line per problem."""
    path = Path(path)
    stamp = _stamp([path])
    data = _read_yaml(path)
    try:
        config = _parse(data, path.parent)
    except WebConfigError as exc:
        raise WebConfigError([f"{path}: {p}" for p in exc.problems]) from None
    return WebConfig(
        path=path,
        tls=config.tls,
        ssl_context=config.ssl_context,
        auth=config.auth,
        headers=config.headers,
        stamp=stamp + _stamp(config.tls.files() if config.tls else ()),
    )


def _read_yaml(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise WebConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise WebConfigError([f"{path}: larger than {MAX_FILE_BYTES} bytes; not a web config file"])
    try:
        return yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise WebConfigError([f"{path}: not UTF-8 text"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise WebConfigError([f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or 'invalid'}"]) from None
    except RecursionError:
        raise WebConfigError([f"{path}: nested too deeply"]) from None


def _parse(data: Any, base: Path) -> WebConfig:
    r = _Reader()
    top = r.mapping(data, "", TOP_KEYS)
    tls = _tls(r, top.get("tls_server_config"), base)
    users = _users(r, top.get("basic_auth_users"))
    headers = _headers(r, top.get("http_server_config"))
    if r.problems:
        raise WebConfigError(r.problems)
    return WebConfig(
        tls=tls,
        ssl_context=tls.context() if tls else None,
        auth=BasicAuth(users) if users else None,
        headers=headers,
    )


def _tls(r: _Reader, value: Any, base: Path) -> TlsSettings | None:
    if isinstance(value, dict):
        for key in sorted(set(map(str, value)) & TLS_UNSUPPORTED):
            r.problem(
                f"tls_server_config.{key}", "not supported by migexport (use cert_file, key_file, client_ca_file)"
            )
        value = {k: v for k, v in value.items() if str(k) not in TLS_UNSUPPORTED}
    tls = r.mapping(value, "tls_server_config", TLS_KEYS)
    if not tls:
        return None
    cert = r.string(tls.get("cert_file"), "tls_server_config.cert_file", "", required=True)
    key = r.string(tls.get("key_file"), "tls_server_config.key_file", "", required=True)
    ca = r.string(tls.get("client_ca_file"), "tls_server_config.client_ca_file", "")
    auth_type = r.string(tls.get("client_auth_type"), "tls_server_config.client_auth_type", "NoClientCert")
    if auth_type not in CLIENT_AUTH:
        r.problem("tls_server_config.client_auth_type", f"{auth_type!r}: one of {', '.join(CLIENT_AUTH)}")
    elif auth_type != "NoClientCert" and not ca:
        r.problem("tls_server_config.client_ca_file", f"is required with client_auth_type {auth_type}")
    elif auth_type == "NoClientCert" and ca:
        r.problem("tls_server_config.client_auth_type", "client_ca_file is set but no client certificate is asked for")
    versions = {}
    for key_name, default in (("min_version", "TLS12"), ("max_version", "")):
        versions[key_name] = r.string(tls.get(key_name), f"tls_server_config.{key_name}", default)
        if versions[key_name] and versions[key_name] not in TLS_VERSIONS:
            r.problem(f"tls_server_config.{key_name}", f"{versions[key_name]!r}: one of {', '.join(TLS_VERSIONS)}")
    if r.problems:
        return None
    return TlsSettings(
        cert_file=base / cert,
        key_file=base / key,
        client_ca_file=base / ca if ca else None,
        client_auth_type=auth_type,
        min_version=versions["min_version"],
        max_version=versions["max_version"] or None,
    )


def _users(r: _Reader, value: Any) -> dict[str, bytes]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        r.problem("basic_auth_users", f"must be a mapping of user: bcrypt hash, got {type(value).__name__}")
        return {}
    users: dict[str, bytes] = {}
    for user, hashed in value.items():
        if not isinstance(user, str) or not user or ":" in user:
            r.problem(f"basic_auth_users.{user}", "a user name is a non-empty string without ':'")
        elif not isinstance(hashed, str) or not BCRYPT_HASH.match(hashed):
            # The value is never printed: it may be a plain password pasted by mistake.
            r.problem(f"basic_auth_users.{user}", "not a bcrypt hash ($2b$12$ and 53 characters; see the README)")
        else:
            users[user] = hashed.encode()
    return users


def _headers(r: _Reader, value: Any) -> tuple[tuple[str, str], ...]:
    http = r.mapping(value, "http_server_config", HTTP_KEYS)
    if "http2" in http and not isinstance(http["http2"], bool):
        r.problem("http_server_config.http2", "must be true or false (migexport speaks HTTP/1 either way)")
    headers = r.mapping(http.get("headers"), "http_server_config.headers", set(ALLOWED_HEADERS.values()))
    out = []
    for name, text in headers.items():
        if not isinstance(text, str) or "\n" in text or "\r" in text:
            r.problem(f"http_server_config.headers.{name}", "must be a one-line string")
        else:
            out.append((name, text))
    return tuple(out)


def _stamp(paths: tuple[Path, ...] | list[Path]) -> tuple:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append((str(p), None))
    return tuple(out)


class WebConfigSource:
    """The web config in force: re-read when the file or a certificate it names changes (checked at most
    once a second), so rotated certificates and changed users apply without a restart. A changed file that
    is bad is logged and the last good one stays in force; TLS cannot be turned on or off without a restart
    (the clients' scheme would change under them)."""

    CHECK_EVERY = 1.0

    def __init__(self, initial: WebConfig) -> None:
        self._config = initial
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def current(self) -> WebConfig:
        config = self._config
        if config.path is None or time.monotonic() - self._checked < self.CHECK_EVERY:
            return config
        with self._lock:
            self._checked = time.monotonic()
            config = self._config
            files = [config.path, *(config.tls.files() if config.tls else ())]
            if _stamp(files) != config.stamp:
                self._config = self._reload(config)
            return self._config

    @staticmethod
    def _reload(old: WebConfig) -> WebConfig:
        assert old.path is not None
        try:
            new = load_web_config(old.path)
        except WebConfigError as exc:
            log.warning("web config changed but not applied: %s", "; ".join(exc.problems))
            return _with_stamp(old, old.path)
        if (new.tls is None) != (old.tls is None):
            log.warning("web config changed but not applied: %s: restart to turn TLS on or off", old.path)
            return _with_stamp(old, old.path)
        log.info("web config re-read: %s", new.describe())
        return new


def _with_stamp(config: WebConfig, path: Path) -> WebConfig:
    """The same config, remembering the files' current state so a bad file is reported once, not per request."""
    files = [path, *(config.tls.files() if config.tls else ())]
    return WebConfig(config.path, config.tls, config.ssl_context, config.auth, config.headers, _stamp(files))
