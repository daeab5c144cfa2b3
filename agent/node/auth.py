"""Bearer tokens from a file, re-read when the file changes (rotation without a restart).

The file holds one token per line (blank lines and `# comments` ignored; a UTF-8 byte order mark
is not part of the first token); every listed token is accepted, so a rotation can overlap: add
the new token, move the agents over, remove the old one. Write the file atomically (write a
temporary file, then rename it over the old one). Tokens are compared in constant time against
every accepted token.

What is refused, at start (exit 2) and at every reload (fail closed: 503 for everyone until it is
fixed): a file that is not a regular file (a FIFO would stall the reader), larger than
MAX_TOKEN_FILE_BYTES, writable by its group or others or readable by others (any local user
could add or read a token), owned by someone other than root or the daemon's own user, in a
directory others may write to (without the sticky bit: they could replace the file); a token
shorter than MIN_TOKEN_CHARS or longer than MAX_TOKEN_CHARS, with characters other than
printable ASCII, or too predictable (`token_bits` below MIN_TOKEN_BITS: "aaaaaaaaaaaaaaaa").

The file is stat-ed on every request, off the event loop, by one thread at a time: a file
system that hangs makes requests answer 503 after `check_timeout_s`, never the daemon hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import os
import stat
import threading
from collections import Counter
from enum import StrEnum
from pathlib import Path

import structlog

from agent.core.errors import BadInputError

log = structlog.get_logger("ooda.node.auth")

MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 512
MAX_TOKEN_FILE_BYTES = 64 * 1024
# By the token's own character counts (an estimate that catches repetition and tiny alphabets,
# not a measure of how it was made): secrets.token_urlsafe(24), 32 characters, gives about 150.
MIN_TOKEN_BITS = 64.0
CHECK_TIMEOUT_S = 2.0

Signature = tuple[int, ...]


class AuthResult(StrEnum):
    OK = "ok"
    MISSING = "missing"  # no bearer token: 401
    INVALID = "invalid"  # a token, not an accepted one: 403
    UNAVAILABLE = "unavailable"  # the token file cannot be used: 503, fail closed


def token_bits(token: str) -> float:
    """Bits of entropy by the token's own character frequencies (Shannon), times its length."""
    counts = Counter(token)
    n = len(token)
    return -n * sum(c / n * math.log2(c / n) for c in counts.values()) if n else 0.0


def _check_owner_and_mode(what: str, st: os.stat_result, directory: bool) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()):
        raise BadInputError(
            f"{what} is owned by uid {st.st_uid}, not by root or the daemon's user: its owner "
            "could change the tokens"
        )
    if directory:
        if mode & 0o022 and not mode & stat.S_ISVTX:
            raise BadInputError(
                f"{what} is writable by its group or others (mode {mode:04o}): they could "
                "replace the token file; chmod go-w"
            )
        return
    if mode & 0o022:
        raise BadInputError(
            f"is writable by its group or others (mode {mode:04o}): any of them could add a "
            "token; chmod 600"
        )
    if mode & 0o004:
        raise BadInputError(
            f"is readable by others (mode {mode:04o}): any local user could take a token; chmod 600"
        )


def check_file(path: Path, st: os.stat_result, parent: os.stat_result) -> None:
    """BadInputError (without the path: the caller adds it) unless the token file is safe."""
    if not stat.S_ISREG(st.st_mode):
        raise BadInputError("is not a regular file")
    if st.st_size > MAX_TOKEN_FILE_BYTES:
        raise BadInputError(f"is larger than {MAX_TOKEN_FILE_BYTES} bytes ({st.st_size})")
    _check_owner_and_mode(f"its directory {path.resolve().parent}", parent, directory=True)
    _check_owner_and_mode("it", st, directory=False)


def parse_tokens(data: bytes) -> list[bytes]:
    """The tokens in a token file's bytes; BadInputError (without the path) when unusable."""
    try:
        text = data.decode("utf-8-sig")  # a byte order mark is not part of the first token
    except UnicodeDecodeError:
        raise BadInputError("is not UTF-8 text") from None
    tokens: list[bytes] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"line {number}"
        if not MIN_TOKEN_CHARS <= len(line) <= MAX_TOKEN_CHARS or not all(
            "!" <= c <= "~" for c in line
        ):
            raise BadInputError(
                f"{where}: a token is one word of {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} "
                "printable ASCII characters"
            )
        bits = token_bits(line)
        if bits < MIN_TOKEN_BITS:
            raise BadInputError(
                f"{where}: the token is too predictable (about {bits:.0f} bits by its character "
                f"counts, at least {MIN_TOKEN_BITS:.0f}); make one with: python3 -c 'import "
                "secrets; print(secrets.token_urlsafe(24))'"
            )
        tokens.append(line.encode())
    if not tokens:
        raise BadInputError("has no token in it")
    return tokens


def _stat_both(path: Path) -> tuple[os.stat_result, os.stat_result]:
    return path.stat(), path.resolve().parent.stat()


def _signature(st: os.stat_result, parent: os.stat_result) -> Signature:
    # ctime and mode: a chmod or chown in place is a change too (it is checked again).
    return (
        st.st_ino,
        st.st_dev,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_mode,
        st.st_uid,
        parent.st_mode,
        parent.st_uid,
    )


def read_tokens(path: Path) -> list[bytes]:
    """The tokens in `path`, checked as the module docstring says; BadInputError naming the
    file when it is unusable. Never blocks on a FIFO or reads more than the size bound."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise BadInputError(f"token file {path}: cannot read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        check_file(path, st, path.resolve().parent.stat())
        data = os.read(fd, MAX_TOKEN_FILE_BYTES + 1)
        if len(data) > MAX_TOKEN_FILE_BYTES:
            raise BadInputError(f"is larger than {MAX_TOKEN_FILE_BYTES} bytes")
        return parse_tokens(data)
    except BadInputError as exc:
        raise BadInputError(f"token file {path}: {exc}") from None
    except OSError as exc:
        raise BadInputError(f"token file {path}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


class TokenStore:
    """The accepted tokens, reloaded (and checked again) when the file or its directory
    changes. `check_async` is what the daemon's event loop calls: the file is looked at in a
    thread of its own, one look at a time, within `check_timeout_s`."""

    def __init__(self, path: Path, *, check_timeout_s: float = CHECK_TIMEOUT_S) -> None:
        self.path = path
        self.check_timeout_s = check_timeout_s
        self._lock = threading.Lock()
        self._tokens: list[bytes] = []
        self._sig: Signature | None = None
        self._reloads = 0
        self._inflight: asyncio.Future[list[bytes]] | None = None
        try:
            st, parent = _stat_both(path)
        except OSError as exc:
            raise BadInputError(f"token file {path}: cannot read ({exc.strerror or exc})") from None
        self._tokens = read_tokens(path)
        self._sig = _signature(st, parent)
        if stat.S_IMODE(st.st_mode) & stat.S_IRGRP:
            log.warning(
                "token_file_group_readable", path=str(path), mode=oct(stat.S_IMODE(st.st_mode))
            )

    @property
    def reloads(self) -> int:
        return self._reloads

    def current(self) -> list[bytes]:
        """The accepted tokens now (blocking: it stats, and reads when changed)."""
        try:
            sig: Signature | None = _signature(*_stat_both(self.path))
        except OSError:
            sig = None
        with self._lock:
            if sig is None:
                if self._sig is not None:
                    log.error("token_file_unreadable", path=str(self.path))
                self._tokens, self._sig = [], None
                return []
            if sig != self._sig:
                try:
                    self._tokens = read_tokens(self.path)
                    self._reloads += 1
                    log.info("token_file_reloaded", path=str(self.path), tokens=len(self._tokens))
                except BadInputError as exc:
                    log.error("token_file_refused", error=str(exc))
                    self._tokens = []
                self._sig = sig
            return self._tokens

    def check(self, authorization: str | None) -> AuthResult:
        """Judge an `Authorization` header value (blocking)."""
        return judge(self.current(), authorization)

    async def check_async(self, authorization: str | None) -> AuthResult:
        """Judge it from the event loop: the file is looked at by one thread at a time, and a
        look that takes longer than `check_timeout_s` fails closed (UNAVAILABLE)."""
        inflight = self._inflight
        if inflight is None or inflight.done():
            inflight = self._inflight = self._look()
        try:
            async with asyncio.timeout(self.check_timeout_s):
                tokens = await asyncio.shield(inflight)
        except TimeoutError:
            log.error("token_file_check_slow", path=str(self.path), timeout_s=self.check_timeout_s)
            return AuthResult.UNAVAILABLE
        except Exception as exc:  # fail closed, whatever went wrong looking at the file
            log.error("token_file_check_failed", path=str(self.path), error=repr(exc))
            return AuthResult.UNAVAILABLE
        return judge(tokens, authorization)

    def _look(self) -> asyncio.Future[list[bytes]]:
        """`current()` in a daemon thread (a hung one never holds up the process's exit)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[bytes]] = loop.create_future()

        def settle(tokens: list[bytes] | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(tokens or [])

        def work() -> None:
            try:
                outcome: tuple[list[bytes] | None, BaseException | None] = (self.current(), None)
            except Exception as exc:  # reported to the awaiting requests
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(settle, *outcome)

        threading.Thread(target=work, name="ooda-node token check", daemon=True).start()
        return future


def judge(tokens: list[bytes], authorization: str | None) -> AuthResult:
    """An `Authorization` header value against the accepted tokens (none: UNAVAILABLE)."""
    if not tokens:
        return AuthResult.UNAVAILABLE
    if authorization is None:
        return AuthResult.MISSING
    scheme, _, presented = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return AuthResult.MISSING
    candidate = presented.strip().encode("latin-1")  # the header was decoded as latin-1
    # Compare against every token (no early exit) so timing says nothing about which matched.
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, token)
    return AuthResult.OK if matched else AuthResult.INVALID


def first_token(path: Path) -> str:
    """The token a client sends: the file's first."""
    return read_tokens(path)[0].decode()
