"""The node daemon over real sockets: a Unix socket and TCP with TLS (client certificates).

The security cases of issue 6: no token -> 401, a wrong token -> 403, an out-of-range cap -> 400
with nothing changed, an expired lease -> the fallback cap, TLS with a client certificate
required -> a client without one is refused. Plus token rotation and malformed requests.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.core.errors import BadInputError
from agent.node.leases import OnExit
from agent.node.server import NodeDaemon, NodeSettings
from tests.node_helpers import (
    FakeBackend,
    FakeGpu,
    Pki,
    make_pki,
    node_serve,
    unix_client,
    unix_node_daemon,
    write_token,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    path = Path(tempfile.mkdtemp(prefix="ooda-pki-"))
    try:
        yield make_pki(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Running:
    def __init__(self, daemon: NodeDaemon, gpus: list[FakeGpu], token: str, dir_: Path) -> None:
        self.daemon, self.gpus, self.token, self.dir = daemon, gpus, token, dir_

    def client(self, token: str | None = "default") -> httpx.Client:
        return unix_client(self.daemon.address, self.token if token == "default" else token)


@pytest.fixture
def unix_daemon(short_dir: Path) -> Iterator[Running]:
    token = write_token(short_dir / "token")
    gpus = [FakeGpu(0), FakeGpu(1)]
    daemon = unix_node_daemon(short_dir, gpus)
    with daemon:
        yield Running(daemon, gpus, token, short_dir)


def test_no_token_401_wrong_token_403_right_token_200(unix_daemon: Running) -> None:
    with unix_daemon.client(token=None) as c:
        r = c.get("/v1/gpus")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert c.put("/v1/gpus/0/cap", json={"watts": 300, "lease_s": 60}).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/healthz").status_code == 200
        basic = c.get("/v1/gpus", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert basic.status_code == 401
    with unix_daemon.client(token="not-the-token-at-all-1234") as c:
        assert c.get("/v1/gpus").status_code == 403
        assert c.put("/v1/gpus/0/cap", json={"watts": 300, "lease_s": 60}).status_code == 403
        assert c.delete("/v1/gpus/0/cap").status_code == 403
    assert [g.sets for g in unix_daemon.gpus] == [[], []]
    with unix_daemon.client() as c:
        r = c.get("/v1/gpus")
        assert r.status_code == 200
        gpus = r.json()
        assert [g["index"] for g in gpus] == [0, 1]
        keys = {
            "index",
            "uuid",
            "min_w",
            "max_w",
            "default_w",
            "power_limit_w",
            "enforced_limit_w",
            "lease_remaining_s",
        }
        assert keys <= set(gpus[0])
        assert (gpus[0]["min_w"], gpus[0]["max_w"], gpus[0]["default_w"]) == (200, 700, 700)
        metrics = c.get("/metrics").text
        assert 'ooda_node_auth_failures_total{reason="missing"}' in metrics
        assert 'ooda_node_auth_failures_total{reason="invalid"}' in metrics


def test_socket_permissions(unix_daemon: Running) -> None:
    mode = stat.S_IMODE(os.stat(unix_daemon.daemon.address.removeprefix("unix://")).st_mode)
    assert mode == 0o660


def test_set_renew_release_over_the_socket(unix_daemon: Running) -> None:
    with unix_daemon.client() as c:
        r = c.put("/v1/gpus/1/cap", json={"watts": 450, "lease_s": 60})
        assert r.status_code == 200
        body = r.json()
        assert body["ok"] and body["before_w"] == 700.0
        assert body["gpu"]["power_limit_w"] == 450.0 and body["gpu"]["state"] == "leased"
        assert 59 < body["gpu"]["lease_remaining_s"] <= 60
        assert unix_daemon.gpus[1].limit_w == 450.0
        r = c.delete("/v1/gpus/1/cap")
        assert r.status_code == 200 and r.json()["gpu"]["state"] == "default"
        assert unix_daemon.gpus[1].limit_w == 700.0


def test_out_of_range_cap_is_400_with_nothing_changed(unix_daemon: Running) -> None:
    with unix_daemon.client() as c:
        assert c.put("/v1/gpus/0/cap", json={"watts": 300, "lease_s": 60}).status_code == 200
        before = c.get("/v1/gpus").json()
        for watts in (199.9, 701, 10_000, -5, 0):
            r = c.put("/v1/gpus/0/cap", json={"watts": watts, "lease_s": 60})
            assert r.status_code == 400, watts
            assert "[200, 700] W" in r.json()["error"]
        r = c.put("/v1/gpus/0/cap", json={"watts": 300, "lease_s": 601})
        assert r.status_code == 400 and "lease_s" in r.json()["error"]
        after = c.get("/v1/gpus").json()
    assert [g["power_limit_w"] for g in after] == [g["power_limit_w"] for g in before]
    assert [g["state"] for g in after] == ["leased", "unmanaged"]
    assert unix_daemon.gpus[0].sets == [300.0]


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (b'{"watts": 300', "malformed JSON"),
        (b"", "a JSON body is required"),
        (b"[300, 60]", "body: Input should be an object"),
        (b'{"watts": "300", "lease_s": 60}', "watts"),
        (b'{"watts": true, "lease_s": 60}', "watts"),
        (b'{"watts": 300}', "lease_s: Field required"),
        (b'{"watts": 300, "lease_s": 60, "force": 1}', "force: unknown key"),
        (b'{"watts": NaN, "lease_s": 60}', "watts: Input should be a finite number"),
        (b'{"watts": 1e999, "lease_s": 60}', "watts"),
    ],
)
def test_malformed_requests_are_400(unix_daemon: Running, body: bytes, text: str) -> None:
    with unix_daemon.client() as c:
        r = c.put("/v1/gpus/0/cap", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert text in r.json()["error"], r.json()
    assert unix_daemon.gpus[0].sets == []


def test_unknown_gpu_oversized_body_and_bulk(unix_daemon: Running) -> None:
    with unix_daemon.client() as c:
        r = c.put("/v1/gpus/9/cap", json={"watts": 300, "lease_s": 60})
        assert r.status_code == 404 and "no GPU with index 9" in r.json()["error"]
        assert c.put("/v1/gpus/abc/cap", json={"watts": 300, "lease_s": 60}).status_code == 404
        big = b'{"watts": 300, "lease_s": 60, "pad": "' + b"x" * 70_000 + b'"}'
        assert c.put("/v1/gpus/0/cap", content=big).status_code == 413
        assert c.post("/v1/gpus/0/cap", json={}).status_code == 405
        r = c.put(
            "/v1/caps",
            json={
                "caps": [
                    {"index": 0, "watts": 350, "lease_s": 30, "uuid": "GPU-fake-0000"},
                    {"index": 1, "watts": 900, "lease_s": 30},
                    {"index": 5, "watts": 300, "lease_s": 30},
                ]
            },
        )
        assert r.status_code == 200
        results = r.json()["results"]
        assert [x["ok"] for x in results] == [True, False, False]
        assert [x.get("status") for x in results] == [None, 400, 404]
        assert results[0]["before_w"] == 700.0
        dup = c.put("/v1/caps", json={"caps": [{"index": 0, "watts": 300, "lease_s": 9}] * 2})
        assert dup.status_code == 400 and "twice" in dup.json()["error"]
        wrong = c.put(
            "/v1/caps", json={"caps": [{"index": 1, "watts": 300, "lease_s": 9, "uuid": "GPU-x"}]}
        )
        assert wrong.json()["results"][0]["status"] == 409
        r = c.post("/v1/caps/release", json={"gpus": [{"index": 0}, {"index": 1}]})
        assert [x["ok"] for x in r.json()["results"]] == [True, True]
    assert [g.limit_w for g in unix_daemon.gpus] == [700.0, 700.0]


def test_token_rotation_without_restart(unix_daemon: Running) -> None:
    old = unix_daemon.token
    new = "rotated-token-" + "n" * 20
    token_file = unix_daemon.dir / "token"
    write_token(token_file, old, new)  # overlap: both accepted
    with unix_daemon.client(old) as c_old, unix_daemon.client(new) as c_new:
        assert c_old.get("/v1/gpus").status_code == 200
        assert c_new.get("/v1/gpus").status_code == 200
        write_token(token_file, new)  # the old one retired
        assert c_old.get("/v1/gpus").status_code == 403
        assert c_new.get("/v1/gpus").status_code == 200
        token_file.write_text("# nothing here\n")  # broken: fail closed
        assert c_new.get("/v1/gpus").status_code == 503
        token_file.unlink()
        assert c_new.get("/v1/gpus").status_code == 503
        write_token(token_file, new)
        assert c_new.get("/v1/gpus").status_code == 200


def test_expired_lease_goes_to_fallback_by_the_background_check(unix_daemon: Running) -> None:
    with unix_daemon.client() as c:
        # Above the 400 W fallback: a lapsed lease lowers it (a lower cap it would leave alone).
        r = c.put("/v1/gpus/0/cap", json={"watts": 550, "lease_s": 0.3})
        assert r.status_code == 200
        r = c.put("/v1/gpus/1/cap", json={"watts": 650, "lease_s": 30})
        # Watch the GPU itself, not the API (reads also enforce): the background check must act.
        deadline = time.monotonic() + 5.0
        while unix_daemon.gpus[0].limit_w != 400.0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert unix_daemon.gpus[0].limit_w == 400.0
        assert unix_daemon.gpus[1].limit_w == 650.0
        gpu0 = c.get("/v1/gpus/0").json()
        assert gpu0["state"] == "fallback" and gpu0["lease_remaining_s"] is None
        assert 'ooda_node_lease_expirations_total{gpu="0"} 1.0' in c.get("/metrics").text


def test_on_exit_leaves_leased_gpus_at_fallback(short_dir: Path) -> None:
    token = write_token(short_dir / "token")
    gpus = [FakeGpu(0), FakeGpu(1)]
    settings = NodeSettings(
        token_file=short_dir / "token", socket_path=short_dir / "n.sock", fallback_cap_w=420.0
    )
    with NodeDaemon(FakeBackend(gpus), settings) as daemon:
        running = Running(daemon, gpus, token, short_dir)
        with running.client() as c:
            c.put("/v1/gpus/0/cap", json={"watts": 600, "lease_s": 600})
    assert [g.limit_w for g in gpus] == [420.0, 700.0]
    assert not (short_dir / "n.sock").exists()
    assert settings.on_exit is OnExit.FALLBACK


# -- TCP and TLS -------------------------------------------------------------------------------


def _tls_daemon(short_dir: Path, pki: Pki, require_client_cert: bool) -> tuple[NodeDaemon, str]:
    token = write_token(short_dir / "token")
    daemon = NodeDaemon(
        FakeBackend([FakeGpu(0)]),
        NodeSettings(
            token_file=short_dir / "token",
            listen="127.0.0.1:0",
            tls_cert=pki.server_cert,
            tls_key=pki.server_key,
            tls_client_ca=pki.ca if require_client_cert else None,
        ),
    )
    return daemon, token


def _ctx(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def test_tls_with_client_certificate_required(short_dir: Path, pki: Pki) -> None:
    daemon, token = _tls_daemon(short_dir, pki, require_client_cert=True)
    auth = {"Authorization": f"Bearer {token}"}
    with daemon:
        url = daemon.address
        assert url.startswith("https://127.0.0.1:")
        with httpx.Client(verify=_ctx(pki, pki.client_cert, pki.client_key)) as c:
            assert c.get(url + "/v1/gpus", headers=auth).status_code == 200
            assert c.get(url + "/v1/gpus").status_code == 401  # the certificate is not enough
        with httpx.Client(verify=_ctx(pki)) as c, pytest.raises(httpx.TransportError):
            c.get(url + "/v1/gpus", headers=auth)  # no client certificate: refused
        with (
            httpx.Client(verify=_ctx(pki, pki.rogue_cert, pki.rogue_key)) as c,
            pytest.raises(httpx.TransportError),
        ):
            c.get(url + "/v1/gpus", headers=auth)  # a certificate from another CA: refused
        with httpx.Client(verify=False) as c, pytest.raises(httpx.TransportError):
            c.get(url + "/v1/gpus", headers=auth)
        with httpx.Client() as c, pytest.raises(httpx.TransportError):
            c.get(url.replace("https://", "http://") + "/v1/gpus", headers=auth)  # no plain HTTP


def test_tls_without_client_certificates(short_dir: Path, pki: Pki) -> None:
    daemon, token = _tls_daemon(short_dir, pki, require_client_cert=False)
    with daemon, httpx.Client(verify=_ctx(pki)) as c:
        r = c.put(
            daemon.address + "/v1/gpus/0/cap",
            json={"watts": 300, "lease_s": 10},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"listen": "0.0.0.0:9440"}, "plain HTTP on a non-loopback address"),
        ({"listen": "10.1.2.3:9440"}, "--insecure"),
        ({"socket_path": Path("/tmp/x.sock"), "listen": "127.0.0.1:0"}, "exactly one"),
        ({}, "exactly one"),
        ({"socket_path": Path("/tmp/x.sock"), "tls_cert": Path("/etc/hostname")}, "Unix socket"),
        ({"listen": "127.0.0.1:0", "tls_cert": Path("/etc/hostname")}, "go together"),
        ({"listen": "127.0.0.1:0", "tls_client_ca": Path("/etc/hostname")}, "needs --tls-cert"),
        ({"listen": "127.0.0.1"}, "ADDR:PORT"),
        ({"listen": "127.0.0.1:\u00b3"}, "ADDR:PORT"),  # a digit to str.isdigit, not to int
        ({"listen": "127.0.0.1:0", "fallback_cap_w": 0.0}, "--fallback-cap-w"),
    ],
)
def test_unsafe_or_wrong_settings_are_refused(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    settings = NodeSettings(token_file=tmp_path / "token", **changes)  # type: ignore[arg-type]
    with pytest.raises(BadInputError, match=message.replace("-", r"\-")):
        settings.validate()


def test_insecure_plain_tcp_when_insisted(short_dir: Path) -> None:
    token = write_token(short_dir / "token")
    NodeSettings(token_file=short_dir / "token", listen="0.0.0.0:0", insecure=True).validate()
    settings = NodeSettings(token_file=short_dir / "token", listen="127.0.0.1:0")
    with NodeDaemon(FakeBackend([FakeGpu(0)]), settings) as daemon:
        assert daemon.address.startswith("http://127.0.0.1:")
        r = httpx.get(daemon.address + "/v1/gpus", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200


def test_a_second_daemon_on_the_same_socket_is_refused(unix_daemon: Running) -> None:
    settings = NodeSettings(
        token_file=unix_daemon.dir / "token",
        socket_path=Path(unix_daemon.daemon.address.removeprefix("unix://")),
    )
    with pytest.raises(BadInputError, match="another daemon is listening"):
        NodeDaemon(FakeBackend([FakeGpu(0)]), settings).start()


# -- the command -------------------------------------------------------------------------------


def test_ooda_node_serve_sim_backend(short_dir: Path) -> None:
    token = write_token(short_dir / "token")
    sock = short_dir / "node.sock"
    args = ["--backend", "sim", "--sim-gpus", "3", "--sim-model", "A100",
            "--token-file", str(short_dir / "token"), "--fallback-cap-w", "250"]  # fmt: skip
    with node_serve(args, sock, token) as (proc, c):
        gpus = c.get("/v1/gpus").json()
        assert len(gpus) == 3 and gpus[0]["max_w"] == 400.0  # an A100
        r = c.put("/v1/gpus/2/cap", json={"watts": 300, "lease_s": 60})
        assert r.status_code == 200 and r.json()["gpu"]["power_limit_w"] == 300.0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not sock.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "0.0.0.0:9440"], "plain HTTP on a non-loopback address"),
        (["--socket", "/tmp/x.sock", "--tls-cert", "/etc/hostname"], "Unix socket"),
        (["--backend", "sim", "--sim-model", "Z9"], "--sim-model: unknown GPU model 'Z9'"),
        (
            ["--backend", "sim", "--socket", "/nonexistent/x.sock"],
            "--socket /nonexistent/x.sock: directory /nonexistent does not exist",
        ),
        (["--socket-mode", "99x"], "--socket-mode"),
    ],
)
def test_bad_options_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    from agent.cli import main

    write_token(tmp_path / "token")
    code = main(["node", "serve", "--token-file", str(tmp_path / "token"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_missing_token_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    code = main(
        [
            "node",
            "serve",
            "--backend",
            "sim",
            "--token-file",
            str(tmp_path / "none"),
            "--socket",
            str(tmp_path / "s.sock"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "token file" in err and "none" in err
