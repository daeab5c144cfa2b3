"""The README's front door runs as written (issue 22): every fenced block of README.md, extracted
from the README itself, in a fresh directory, in the README's order.

What each block is, and what the test does with it:

- a shell block (no language): each command line (a `\\` continues it; `# ...` is a comment):
  - `ooda ...` runs as written and must exit 0 with no error, traceback or Python repr in what
    it prints; `ooda sim serve` (no `--print-scrape-config`) and `ooda run` run until stopped:
    started, used, then stopped with Ctrl-C (SIGINT), which must exit 0;
  - a line with `[` optional parts is a synopsis: its command's `--help` must work;
  - `make TARGET` is checked with `make -n TARGET`; `python bench/X.py ...` with `--help`
    (benchmarks take minutes; `make bench` runs them);
- a `toml` block: `ooda config check` must accept it; a block with no `[source]` is a section of
  a file, checked under the twin's source (`[source] kind = "twin"` appended);
- a `yaml` block: `promtool check config` must accept it;
- a `python` block: run in the same directory.

What the test provides, and nothing else: a real Prometheus (Debian's) for the README's
Prometheus URLs (`http://prometheus:9090`, `http://prom:9090`), scraping the twin the README
itself serves and configured by the README's own `--print-scrape-config`; a temporary
directory for `/tmp/ooda-state`; and the files a `given` mark names.

Marks (an HTML comment on the line before a block, `<!-- readme-test: ... -->`):
- `the output of "CMD"`: the block is CMD's output; CMD runs and prints the same lines (its
  wall time aside);
- `saved as NAME`: the block is also written to NAME (later blocks use it);
- `given FILE (how)`: the test makes FILE first (a twin trace);
- `synopsis` / `listing`: not commands: each `ooda` command named must `--help`, each
  repository path named must exist;
- `not run: WHY`: cannot run here (a real cluster's host, a GPU); its TOML must parse, its `ooda`
  commands `--help`, its `sh FILE` pass `sh -n`. NOT_RUN lists them: the set stays small.

Run time: about 2-4 minutes (`ooda demo` is most of it); the durations are the README's own.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer.main
import yaml

from agent.cli import app
from tests.conftest import free_port
from tests.integration.conftest import Prometheus, _binary

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the venv's `ooda`
MARK = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
# The blocks that cannot run here, by the first words of their reason: keep this set small.
NOT_RUN = {
    "on a GPU node, as root",
    "on the cluster's agent host, as root",
    "names the host's /etc/slurm/slurm.conf",
    # etcd on 2379/2380 and three processes left running: the site's integration tests run the
    # same flow on a real etcd at free ports.
    "a site on etcd's fixed ports",
}
REPR = re.compile(r"\{'|\['|=None\b|<agent\.|object at 0x")
REPO_PATH = re.compile(r"(?<![\w/.])((?:agent|policies|bench|deploy|docs)(?:/[\w.\-]+)*)")
SIM_PORTS = range(19400, 19404)  # the README's `ooda sim serve` (its default --port-base)


@dataclass
class Block:
    line: int  # the fence's line in README.md
    lang: str
    text: str
    mark: str = ""


def readme_blocks() -> list[Block]:
    lines = README.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        mark = MARK.fullmatch(lines[i - 1].strip()) if i else None
        text = "\n".join(lines[i + 1 : end]) + "\n"
        out.append(Block(i + 1, fence.group(1), text, mark.group(1) if mark else ""))
        i = end + 1
    return out


def command_lines(text: str) -> list[str]:
    """A shell block's commands: continuations joined, comments and blank lines left out."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for raw in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if line:
            out.append(line)
    return out


def _paths() -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()

    def walk(command: object, path: tuple[str, ...]) -> None:
        found.add(path)
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


COMMANDS = _paths()


def command_of(line: str) -> tuple[str, ...]:
    """The `ooda` command a line names (`ooda trace info TRACE` -> ("trace", "info"))."""
    words = shlex.split(line.replace("[", " ").replace("]", " "))[1:]
    path: tuple[str, ...] = ()
    for word in words:
        if (*path, word) not in COMMANDS:
            break
        path = (*path, word)
    return path


@dataclass
class Trial:
    """The README run in one directory, with what it started."""

    work: Path
    env: dict[str, str]
    subs: dict[str, str] = field(default_factory=dict)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    took_s: dict[str, float] = field(default_factory=dict)  # what each command cost, to report

    def as_run(self, line: str) -> str:
        for old, new in self.subs.items():
            line = line.replace(old, new)
        return line

    def run(self, line: str, timeout_s: float = 300.0) -> str:
        line = self.as_run(line)
        t0 = time.monotonic()
        done = subprocess.run(
            ["bash", "-c", line],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        self.took_s[line] = round(time.monotonic() - t0, 1)
        said = done.stdout + done.stderr
        assert done.returncode == 0, f"{line}\nexit {done.returncode}\n{said[-3000:]}"
        assert "Traceback" not in said and "ooda: error" not in said, f"{line}\n{said[-3000:]}"
        assert not REPR.search(_not_json(done.stdout) + done.stderr), f"{line}\n{said[-3000:]}"
        self.ran.append(line)
        return done.stdout

    def start(self, line: str) -> subprocess.Popen[bytes]:
        line = self.as_run(line)
        proc = subprocess.Popen(
            shlex.split(line),
            cwd=self.work,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=(self.work / f"server-{len(self.servers)}.log").open("wb"),
        )
        self.servers.append(proc)
        self.ran.append(line)
        return proc

    def help(self, line: str) -> None:
        path = command_of(line)
        assert path, f"no ooda command in {line!r}"
        done = subprocess.run(
            [str(BIN / "ooda"), *path, "--help"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0 and "Usage:" in done.stdout, (line, done.stderr)

    def stop_all(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


def _ok(args: list[str], cwd: Path = ROOT) -> None:
    """`args` exits 0 (what it said, if not)."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])


def _not_json(stdout: str) -> str:
    """What a person reads: a --json command's last line is JSON (its lists are not reprs)."""
    lines = stdout.splitlines()
    if lines and lines[-1].startswith("{"):
        lines = lines[:-1]
    return "\n".join(lines)


@pytest.fixture
def trial(tmp_path: Path) -> Iterator[Trial]:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "COLUMNS": "100",
        "OODA_LOG_LEVEL": "warning",
    }
    work = tmp_path / "work"
    work.mkdir()
    # A new user runs the README in their checkout: what it names there is here too.
    for name in ("deploy", "examples", "docs"):
        (work / name).symlink_to(ROOT / name)
    t = Trial(work, env, subs={"/tmp/ooda-state": str(tmp_path / "ooda-state")})
    try:
        yield t
    finally:
        t.stop_all()


def _port_answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _serve_the_twin_and_prometheus(trial: Trial, block: Block) -> Prometheus:
    """The README's `ooda sim serve` block, then a Prometheus on the config it printed."""
    taken = [p for p in SIM_PORTS if _port_answers(p)]
    assert not taken, f"ports {taken} are taken: the README's ooda sim serve needs 19400-19403"
    for line in command_lines(block.text):
        if "--print-scrape-config" in line:
            trial.run(line, timeout_s=60)
        else:
            trial.start(line)
    deadline = time.monotonic() + 60
    while not all(_port_answers(p) for p in SIM_PORTS):
        assert time.monotonic() < deadline, "ooda sim serve did not answer in 60 s"
        time.sleep(0.2)
    port = free_port()
    prom = Prometheus(
        url=f"http://127.0.0.1:{port}",
        port=port,
        data=trial.work.parent / "prometheus-data",
        config=trial.work / "prometheus.yml",
        log=trial.work.parent / "prometheus.log",
    )
    prom.start()
    assert prom.proc is not None
    trial.servers.append(prom.proc)  # stopped with the rest (it outlived the test before)
    prom.wait_for_gpus(16, timeout_s=60, scrape_interval_s=5.0)
    trial.subs.update({"http://prometheus:9090": prom.url, "http://prom:9090": prom.url})
    return prom


def _run_until_stopped(trial: Trial, line: str) -> None:
    """`ooda run`: until it has cycled (its audit log grew), then Ctrl-C: exit 0."""
    audit = Path(trial.as_run("/tmp/ooda-state")) / "twin-audit.jsonl"
    before = audit.stat().st_size if audit.exists() else 0
    proc = trial.start(line)
    log = trial.work / f"server-{len(trial.servers) - 1}.log"
    started = time.monotonic()
    while not (audit.exists() and audit.stat().st_size > before):
        assert proc.poll() is None, f"{line}: exited {proc.returncode}: {log.read_text()[-2000:]}"
        assert time.monotonic() - started < 120, f"{line}: no cycle audited in 120 s"
        time.sleep(0.5)
    time.sleep(3.0)  # a few cycles more
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{line}: still running 60 s after Ctrl-C: {log.read_text()[-2000:]}")
    assert code == 0, log.read_text()[-2000:]


def _shell(trial: Trial, block: Block) -> None:
    for line in command_lines(block.text):
        if line.startswith("make "):
            _ok(["make", "-n", line.split()[1]])
        elif line.startswith("python bench/"):
            _ok([sys.executable, str(ROOT / line.split()[1]), "--help"])
        elif " [" in line:
            trial.help(line)
        elif line.startswith("ooda run "):
            _run_until_stopped(trial, line)
        else:
            assert line.startswith("ooda "), f"README.md:{block.line}: not an ooda command: {line}"
            trial.run(line)


def _toml(trial: Trial, block: Block) -> None:
    tomllib.loads(block.text)  # TOML first: a parse error names the README's block
    name = block.mark.removeprefix("saved as ").strip() if block.mark.startswith("saved as") else ""
    path = trial.work / (name or f"readme-{block.line}.toml")
    text = block.text
    if not re.search(r"^\[source\]", text, re.M):
        text += '\n[source]\nkind = "twin"\n'
    path.write_text(text, encoding="utf-8")
    trial.run(f"ooda config check {path.name}")


def _yaml(trial: Trial, block: Block) -> None:
    assert isinstance(yaml.safe_load(block.text), dict)
    path = trial.work / f"readme-{block.line}.yml"
    path.write_text(block.text, encoding="utf-8")
    _ok([_binary("promtool"), "check", "config", str(path)])


def _python(trial: Trial, block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trial.work)
    exec(compile(block.text, f"README.md:{block.line}", "exec"), {})


def _given(trial: Trial, mark: str) -> None:
    name = mark.removeprefix("given ").split()[0]
    target = trial.work / name
    target.parent.mkdir(parents=True, exist_ok=True)
    trial.run(
        f"ooda sim record --nodes 2 --gpus-per-node 8 --duration 1h --policy power_budget "
        f"-o {target} --json"
    )


def _the_output_of(trial: Trial, block: Block) -> None:
    command = re.fullmatch(r'the output of "(.*)"', block.mark)
    assert command is not None, block.mark
    said = trial.run(command.group(1)).splitlines()
    shown = block.text.splitlines()
    wall = re.compile(r"\(\d+ cycles in [\d.]+ s of wall time\)")
    assert [wall.sub("(wall)", x) for x in said] == [wall.sub("(wall)", x) for x in shown], said


def _listing(trial: Trial, block: Block) -> None:
    for line in command_lines(block.text):
        for part in re.split(r"\s/\s(?=ooda )", line):
            if part.startswith("ooda "):
                trial.help(part)
    for found in REPO_PATH.finditer(block.text):
        path = found.group(1).rstrip(".,")
        assert (ROOT / path).exists(), f"README.md:{block.line}: {path} does not exist"


def _not_run(trial: Trial, block: Block) -> None:
    reason = block.mark.removeprefix("not run:").strip()
    assert any(reason.startswith(r) for r in NOT_RUN), f"README.md:{block.line}: add to NOT_RUN"
    if block.lang == "toml":
        tomllib.loads(block.text)
        return
    for line in command_lines(block.text):
        words = line.removeprefix("sudo ").split()
        if words[0] == "ooda":
            trial.help(line)
        elif words[0] == "sh":
            _ok(["sh", "-n", str(ROOT / words[1])])


def test_the_readme_runs_as_written(trial: Trial, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = readme_blocks()
    serve = [b for b in blocks if not b.mark and "ooda sim serve" in b.text]
    assert len(serve) == 1, "one block serves the twin for the README's Prometheus"
    _serve_the_twin_and_prometheus(trial, serve[0])
    for block in blocks:
        if block is serve[0]:
            continue
        if block.mark.startswith("given "):
            _given(trial, block.mark)
        if block.mark.startswith("not run:"):
            _not_run(trial, block)
        elif block.mark in ("synopsis", "listing"):
            _listing(trial, block)
        elif block.mark.startswith("the output of"):
            _the_output_of(trial, block)
        elif block.lang == "toml":
            _toml(trial, block)
        elif block.lang == "yaml":
            _yaml(trial, block)
        elif block.lang == "python":
            _python(trial, block, monkeypatch)
        else:
            assert block.lang == "", f"README.md:{block.line}: a ```{block.lang} block"
            _shell(trial, block)
    # The README's replay wrote its report; what cost the most time, for whoever shortens it.
    assert (trial.work / "whatif.html").exists()
    assert any(line.startswith("ooda replay twin.parquet --compare") for line in trial.ran)
    slowest = sorted(trial.took_s.items(), key=lambda kv: -kv[1])[:5]
    print("slowest README commands:", slowest)


def test_the_marks_are_few_and_known() -> None:
    marks = [b.mark for b in readme_blocks() if b.mark]
    not_run = [m for m in marks if m.startswith("not run:")]
    assert len(not_run) == len(NOT_RUN), not_run
    for mark in marks:
        assert re.match(
            r"(not run: |the output of \"|saved as |given |synopsis$|listing$)", mark
        ), mark
