"""deploy/requirements.txt: every package ooda installs, pinned with hashes.

    python deploy/lock.py            regenerate it (`make lock`; needs uv and PyPI)
    python deploy/lock.py --check    is it in step with pyproject.toml? (offline; `make lock-check`)

It is resolved by `uv pip compile` from pyproject.toml's dependencies and the build backend
(deploy/build-requirements.in), for every platform (`--universal`) from Python 3.11 on. Its first
lines record a hash of those inputs: the check fails when pyproject.toml's dependencies changed
since (run `make lock`), or when a pinned version no longer satisfies them. install.sh and the
Dockerfile install exactly these (`pip install --require-hashes`), and `make` builds the
development environment with them as constraints.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "deploy" / "requirements.txt"
BUILD_IN = REPO / "deploy" / "build-requirements.in"
PYTHON = "3.11"
HEADER = """\
# Every package ooda installs, pinned with hashes: install.sh and the Dockerfile install exactly
# these. Do not edit: `make lock` regenerates it (deploy/lock.py: uv pip compile --universal
# --generate-hashes, Python {python}+) from pyproject.toml and deploy/build-requirements.in.
# inputs-sha256: {digest}
"""


def inputs() -> list[str]:
    """The requirements the lock is resolved from, in a canonical order."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    build = [
        line.strip()
        for line in BUILD_IN.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return sorted(
        {str(Requirement(r)) for r in [*project["project"]["dependencies"], *build]}
        | {f"python{project['project']['requires-python']}"}
    )


def digest() -> str:
    return hashlib.sha256(json.dumps(inputs()).encode()).hexdigest()


def pins(text: str) -> dict[str, list[str]]:
    """Package -> the versions pinned for it (one per marker set)."""
    out: dict[str, list[str]] = {}
    for match in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", text, re.MULTILINE):
        out.setdefault(canonicalize_name(match.group(1)), []).append(match.group(2))
    return out


def problems(text: str) -> list[str]:
    """What is out of step between the lock and its inputs (nothing: in step)."""
    said = re.search(r"^# inputs-sha256: ([0-9a-f]{64})$", text, re.MULTILINE)
    found: list[str] = []
    if said is None or said.group(1) != digest():
        found.append("pyproject.toml's dependencies changed since the lock was made")
    pinned = pins(text)
    for line in inputs():
        if line.startswith("python"):
            continue
        req = Requirement(line)
        versions = pinned.get(canonicalize_name(req.name))
        if not versions:
            found.append(f"{req.name}: not in the lock")
        for version in versions or []:
            if not req.specifier.contains(version, prereleases=True):
                found.append(f"{req.name}: {version} does not satisfy {req.specifier}")
    unhashed = [
        block.split("==")[0]
        for block in re.split(r"\n(?=[A-Za-z0-9])", text)
        if "==" in block and "--hash=sha256:" not in block
    ]
    found.extend(f"{name}: no hash" for name in unhashed)
    return found


def regenerate() -> None:
    resolved = subprocess.run(
        [
            "uv", "pip", "compile", "pyproject.toml", "deploy/build-requirements.in",
            "--universal", "--python-version", PYTHON, "--generate-hashes", "--no-header",
            "--quiet",
        ],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    LOCK.write_text(HEADER.format(python=PYTHON, digest=digest()) + resolved.stdout)


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        found = problems(LOCK.read_text())
        for problem in found:
            print(f"deploy/requirements.txt: {problem} (run `make lock`)", file=sys.stderr)
        return 1 if found else 0
    if argv:
        print("usage: python deploy/lock.py [--check]", file=sys.stderr)
        return 2
    regenerate()
    print(f"wrote {LOCK.relative_to(REPO)} ({len(pins(LOCK.read_text()))} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
