"""Bearer tokens from a file, re-read when the file changes (rotation without a restart).

The file holds one token per line (blank lines and `# comments` ignored); every listed token is
accepted, so a rotation can overlap: add the new token, move the agents over, remove the old one.
Write the file atomically (write a temporary file, then rename it over the old one). Tokens are
compared in constant time against every accepted token. A file that becomes unreadable or empty
fails closed: nobody is let in until it is fixed.
"""

from __future__ import annotations

import hmac
import os
import stat
import threading
from enum import StrEnum
from pathlib import Path

import structlog

from agent.core.errors import BadInputError

log = structlog.get_logger("ooda.node.auth")

MIN_TOKEN_CHARS = 16


class AuthResult(StrEnum):
    OK = "ok"
    MISSING = "missing"  # no bearer token: 401
    INVALID = "invalid"  # a token, not an accepted one: 403
    UNAVAILABLE = "unavailable"  # the token file cannot be used: 503, fail closed


def read_tokens(path: Path) -> list[bytes]:
    """The tokens in `path`; BadInputError naming the file when unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise BadInputError(f"token file {path}: cannot read ({reason})") from None
    tokens: list[bytes] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) < MIN_TOKEN_CHARS or any(c.isspace() for c in line):
            raise BadInputError(
                f"token file {path}, line {number}: a token is one word of at least "
                f"{MIN_TOKEN_CHARS} characters"
            )
        tokens.append(line.encode())
    if not tokens:
        raise BadInputError(f"token file {path}: no token in it")
    return tokens


def first_token(path: Path) -> str:
    """The token a client sends: the file's first."""
    return read_tokens(path)[0].decode()


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


class TokenStore:
    """The accepted tokens, reloaded when the file's inode, size or mtime changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._tokens: list[bytes] = []
        self._sig: tuple[int, int, int, int] | None = None
        self._reloads = 0
        st = self._stat()
        if st is None:
            raise BadInputError(f"token file {path}: cannot read (no such file)")
        self._tokens = read_tokens(path)
        self._sig = _signature(st)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) & ~stat.S_IRGRP:
            # World- or group-writable/readable-by-others token files leak or let others mint.
            log.warning("token_file_permissions", path=str(path), mode=oct(st.st_mode & 0o777))

    def _stat(self) -> os.stat_result | None:
        try:
            return self.path.stat()
        except OSError:
            return None

    @property
    def reloads(self) -> int:
        return self._reloads

    def _current(self) -> list[bytes]:
        st = self._stat()
        with self._lock:
            if st is None:
                if self._sig is not None:
                    log.error("token_file_unreadable", path=str(self.path))
                self._tokens, self._sig = [], None
                return []
            sig = _signature(st)
            if sig != self._sig:
                try:
                    self._tokens = read_tokens(self.path)
                    self._reloads += 1
                    log.info("token_file_reloaded", path=str(self.path), tokens=len(self._tokens))
                except BadInputError as exc:
                    log.error("token_file_invalid", error=str(exc))
                    self._tokens = []
                self._sig = sig
            return self._tokens

    def check(self, authorization: str | None) -> AuthResult:
        """Judge an `Authorization` header value."""
        tokens = self._current()
        if not tokens:
            return AuthResult.UNAVAILABLE
        if authorization is None:
            return AuthResult.MISSING
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return AuthResult.MISSING
        candidate = presented.strip().encode()
        # Compare against every token (no early exit) so timing says nothing about which matched.
        matched = False
        for token in tokens:
            matched |= hmac.compare_digest(candidate, token)
        return AuthResult.OK if matched else AuthResult.INVALID
