"""Where a target's DSN comes from, and how it is kept out of logs.

A target is given as NAME=SOURCE where SOURCE is one of
  env:VARIABLE   the DSN is read from an environment variable (keeps passwords off the command line)
  file:PATH      the DSN is the content of a file (Docker/Kubernetes secrets)
  anything else  the DSN itself (libpq keyword string or postgresql:// URI)
libpq's own PGPASSWORD / PGPASSFILE also work, since psycopg passes the DSN to libpq.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

TARGET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
REDACTED = "***"

# Every form a password has leaked in elsewhere: keyword DSNs (quoted or not), URI user:password@,
# and ?password= / &password= query parameters.
_PASSWORD_PATTERNS = [
    re.compile(r"(password\s*=\s*)'(?:[^'\\]|\\.)*'", re.IGNORECASE),
    re.compile(r"(password\s*=\s*)[^\s&'\"]+", re.IGNORECASE),
    re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*(@)", re.IGNORECASE),
]


class TargetError(ValueError):
    """A target specification is unusable; the message is safe to print (no password)."""


@dataclass(frozen=True)
class Target:
    name: str
    dsn: str

    def __repr__(self) -> str:  # never let a DSN reach a log through repr()
        return f"Target(name={self.name!r}, dsn={redact(self.dsn)!r})"


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Hide passwords in a DSN or in an error message that may quote one."""
    for pattern in _PASSWORD_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED + (m.group(2) if m.lastindex == 2 else ""), text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def password_of(dsn: str) -> str | None:
    try:
        return conninfo_to_dict(dsn).get("password")
    except psycopg.ProgrammingError:
        return None


def resolve_source(name: str, source: str, environ: os._Environ[str] | dict[str, str] = os.environ) -> str:
    if source.startswith("env:"):
        var = source[4:]
        value = environ.get(var)
        if not value:
            raise TargetError(f"target {name!r}: environment variable {var} is not set or empty")
        return value.strip()
    if source.startswith("file:"):
        path = Path(source[5:])
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise TargetError(f"target {name!r}: cannot read DSN file {path}: {exc.strerror}") from None
        if not value:
            raise TargetError(f"target {name!r}: DSN file {path} is empty")
        return value
    return source


def validate_dsn(name: str, dsn: str) -> None:
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        # libpq's message can quote part of the DSN, password included: redact what it says.
        detail = redact(str(exc).strip().splitlines()[0], secrets=(password_of(dsn) or "",))
        raise TargetError(f"target {name!r}: invalid DSN: {detail}") from None


def parse_target(spec: str, environ: os._Environ[str] | dict[str, str] = os.environ) -> Target:
    """Parse one NAME=SOURCE command-line value into a Target."""
    name, sep, source = spec.partition("=")
    name = name.strip()
    if not sep or not source.strip():
        raise TargetError(f"target {redact(spec)!r}: expected NAME=DSN, NAME=env:VAR or NAME=file:PATH")
    if not TARGET_NAME.match(name):
        raise TargetError(
            f"target name {name!r}: use letters, digits, '_', '.', '-' (up to 64, starting with a letter)"
        )
    dsn = resolve_source(name, source.strip(), environ)
    validate_dsn(name, dsn)
    return Target(name=name, dsn=dsn)


def parse_targets(
    specs: list[str], environ: os._Environ[str] | dict[str, str] = os.environ, existing: list[Target] | None = None
) -> list[Target]:
    """Parse NAME=SOURCE values and add them to `existing` (targets from a config file); names are unique."""
    targets = [*(existing or []), *(parse_target(spec, environ) for spec in specs)]
    seen: set[str] = set()
    for target in targets:
        if target.name in seen:
            raise TargetError(f"target {target.name!r} is given twice")
        seen.add(target.name)
    return targets
