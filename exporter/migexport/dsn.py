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
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

TARGET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
REDACTED = "***"

# Every form a password has leaked in elsewhere: keyword DSNs (quoted or not), URI user:password@,
# and ?password= / &password= query parameters.
_PASSWORD_PATTERNS = [
    re.compile(r"(password\s*=\s*)'(?:[^'\\]|\\.)*'", re.IGNORECASE),
    re.compile(r"(password\s*=\s*)[^\s&'\"]+", re.IGNORECASE),
    re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*(@)", re.IGNORECASE),
    # libpq's messages about a DSN it cannot parse quote a piece of it, to the end of the line: a bad
    # percent escape in a URI password, a query parameter, the whole URI.
    re.compile(
        r"((?:percent-encoded token|percent-encoded value|URI query parameter|in URI(?: \(expected \":\" or \"/\"\))?"
        r"|internal parser routine|IPv6 host address in URI|may not be empty in URI): )\"[^\n]*\"",
        re.IGNORECASE,
    ),
    re.compile(r"(missing \"=\" after )\"[^\n]*?\"(?= in connection info string)", re.IGNORECASE),
]
# A whole command-line argument that sets a password: PGPASSWORD=..., --password=..., MY_DB_PASSWORD=...
_PASSWORD_ARG = re.compile(r"^(-{0,2}[A-Za-z_]*pass(?:word|wd)?[A-Za-z_]*=)(.+)$", re.IGNORECASE | re.DOTALL)
_PASSWORD_FLAG = re.compile(r"^--?(?:[a-z]+-)*pass(?:word|wd)?$", re.IGNORECASE)


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
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    for pattern in _PASSWORD_PATTERNS:
        text = pattern.sub(
            lambda m: (
                m.group(1)
                + (f'"{REDACTED}"' if m.group(0)[len(m.group(1)) :].startswith('"') else REDACTED)
                + (m.group(2) if m.lastindex == 2 else "")
            ),
            text,
        )
    return text


def redact_command(argv: list[str]) -> str:
    """A command line as the log shows it: DSN passwords, PGPASSWORD=..., --password X hidden."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        match = _PASSWORD_ARG.match(arg)
        if match:
            out.append(match.group(1) + REDACTED)
            continue
        hide_next = bool(_PASSWORD_FLAG.match(arg))
        out.append(redact(arg, password_candidates(arg)))
    return shlex.join(out)


def password_candidates(dsn: str) -> tuple[str, ...]:
    """Every string that may be the password in `dsn`, whether or not libpq can parse it: the URI's
    user:PASSWORD@, ?password= and password=... (raw and percent-decoded)."""
    found: list[str] = []
    uri = re.match(r"^\s*postgres(?:ql)?://([^/?#]*)", dsn, re.IGNORECASE)
    if uri and "@" in uri.group(1):
        userinfo = uri.group(1).rpartition("@")[0]
        if ":" in userinfo:
            found.append(userinfo.partition(":")[2])
    found += re.findall(r"[?&]password=([^&#]*)", dsn, re.IGNORECASE)
    for quoted, bare in re.findall(r"password\s*=\s*(?:'((?:[^'\\]|\\.)*)'?|(\S+))", dsn, re.IGNORECASE):
        found.append(quoted or bare)
        if quoted:
            found.append(re.sub(r"\\(.)", r"\1", quoted))
    found += [unquote(f) for f in found]
    return tuple(dict.fromkeys(f for f in found if f))


def password_of(dsn: str) -> str | None:
    try:
        return conninfo_to_dict(dsn).get("password")
    except psycopg.ProgrammingError:
        candidates = password_candidates(dsn)
        return candidates[0] if candidates else None


@cache
def _conninfo_keywords() -> frozenset[str]:
    return frozenset(o.keyword.decode() for o in pq.Conninfo.get_defaults())


def dsn_error(exc: BaseException, dsn: str) -> str:
    """libpq's complaint about `dsn`, first line, with every piece of the DSN it quotes hidden except
    the option names and punctuation ("=", "]"): a quoted token may be (part of) the password."""
    lines = str(exc).strip().splitlines()
    text = redact(lines[0] if lines else type(exc).__name__)
    if '"' in dsn:  # quotes in the DSN make libpq's quoting ambiguous: keep only what comes before
        return text.partition('"')[0].rstrip(": ") + " (details hidden: they quote the DSN)"
    parts = text.split('"')
    for i in range(1, len(parts), 2):
        if parts[i] not in _conninfo_keywords() and not re.fullmatch(r"[=:/\]\[]?|\*\*\*", parts[i]):
            parts[i] = REDACTED
    return '"'.join(parts)


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
        raise TargetError(f"target {name!r}: invalid DSN: {dsn_error(exc, dsn)}") from None


def parse_target(spec: str, environ: os._Environ[str] | dict[str, str] = os.environ) -> Target:
    """Parse one NAME=SOURCE command-line value into a Target."""
    name, sep, source = spec.partition("=")
    name = name.strip()
    # Neither the value nor a name that is not one is echoed: a DSN split apart may put a password there.
    if not sep or not source.strip():
        shown = f" {name!r}" if sep and TARGET_NAME.match(name) else ""
        raise TargetError(f"target{shown}: expected NAME=DSN, NAME=env:VAR or NAME=file:PATH")
    if not TARGET_NAME.match(name):
        shown = f" {name!r}" if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) else " (before the first '=')"
        raise TargetError(f"target name{shown}: use letters, digits, '_', '.', '-' (up to 64, starting with a letter)")
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


def _words(text: str) -> list[str]:
    """Split on whitespace outside single and double quotes, keeping the quotes (libpq needs them)."""
    words: list[str] = []
    word: list[str] = []
    quote = ""
    chars = iter(text)
    for ch in chars:
        if quote:
            word.append(ch)
            if ch == "\\":
                word.append(next(chars, ""))
            elif ch == quote:
                quote = ""
        elif ch.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(ch)
            if ch in "'\"":
                quote = ch
    if quote:
        raise TargetError("MIGEXPORT_TARGETS: a quote is not closed (entries are NAME=SOURCE separated by spaces)")
    if word:
        words.append("".join(word))
    return words


def _unquote(source: str) -> str:
    for q in ('"', "'"):
        if len(source) >= 2 and source[0] == q and source[-1] == q and q not in source[1:-1]:
            return source[1:-1]
    return source


def _is_keyword_dsn(source: str) -> bool:
    return not re.match(r"^(env:|file:|postgres(?:ql)?://)", source, re.IGNORECASE)


def split_targets(text: str) -> list[str]:
    """MIGEXPORT_TARGETS: NAME=SOURCE entries separated by spaces. A keyword DSN's own spaces are kept,
    whether it is quoted (p="host=db password=x") or not (p=host=db password=x: a word that starts with
    a libpq keyword continues the keyword DSN before it). Errors never quote the value."""
    entries: list[str] = []
    for i, word in enumerate(_words(text), start=1):
        key, sep, _ = word.partition("=")
        if sep and key.lower() in _conninfo_keywords():
            if entries and _is_keyword_dsn(entries[-1].partition("=")[2]):
                entries[-1] += " " + word
                continue
            raise TargetError(
                f"MIGEXPORT_TARGETS: word {i} starts with the libpq keyword {key.lower()!r} where a target name "
                "is expected: write NAME=host=... password=..., quote the DSN, or use a postgresql:// URI"
            )
        entries.append(word)
    return [name + "=" + _unquote(source) if sep else name for name, sep, source in (e.partition("=") for e in entries)]
