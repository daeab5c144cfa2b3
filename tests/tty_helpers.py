"""Running a command as a person would see it: stdout and stderr on a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import subprocess


def on_a_terminal(args: list[str]) -> tuple[int, bytes]:
    """Run `args` with stdout and stderr on a pseudo-terminal: its exit code and what it showed."""
    leader, follower = pty.openpty()
    seen = b""
    try:
        proc = subprocess.Popen(args, stdout=follower, stderr=follower)
        os.close(follower)
        while True:  # read while it runs: a full terminal buffer would block it
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: everything was read
                break
            if not chunk:
                break
            seen += chunk
        code = proc.wait(timeout=120)
    finally:
        os.close(leader)
    return code, seen
