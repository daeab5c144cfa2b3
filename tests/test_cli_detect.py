"""`ooda detect` and `ooda forecast` on anyone's CSV: output format, causality (a prefix of the
file gives the prefix of the output), irregular sampling, and bad input named by line."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def write(path: Path, rows: list[tuple[str, str]], header: str = "timestamp,value") -> Path:
    path.write_text(header + "\n" + "".join(f"{t},{v}\n" for t, v in rows), encoding="utf-8")
    return path


def series_rows(n: int, seed: int = 0, spike_at: int | None = None) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    t = 1_700_000_000.0
    for i in range(n):
        t += float(rng.choice([10.0, 15.0, 15.0, 30.0]))  # irregular sampling
        v = 500 + 20 * math.sin(i / 15) + rng.normal(0, 2)
        if i == spike_at:
            v += 150
        rows.append((f"{t:.0f}", f"{v:.3f}"))
    return rows


def parse(out: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(out)))


def test_detect_flags_the_spike_and_echoes_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = series_rows(300, spike_at=200)
    code, out, err = run_cli(capsys, "detect", str(write(tmp_path / "s.csv", rows)))
    assert code == 0 and err == ""
    table = parse(out)
    assert table[0] == ["timestamp", "value", "score", "anomaly", "event"]
    assert [tuple(r[:2]) for r in table[1:]] == rows  # echoed exactly as read
    flagged = [i for i, r in enumerate(table[1:]) if r[3] == "1"]
    assert flagged == [200]  # one alarm, on the spike's row
    scores = [float(r[2]) for r in table[1:]]
    assert scores[200] > 1 - 3e-4 and all(0.0 <= s <= 1.0 for s in scores)
    assert max(scores[:200] + scores[201:]) < 1 - 3e-4  # nothing else reaches the threshold
    events = {i: r[4] for i, r in enumerate(table[1:]) if r[4]}
    assert events[200] == "open" and list(events.values()) == ["open", "close"]
    assert all(r[3] in ("0", "1") for r in table[1:])


def test_detect_threshold_is_a_tail_probability(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "s.csv", series_rows(300, spike_at=200))
    code, out, _ = run_cli(capsys, "detect", str(path), "--threshold", "1e-12")
    assert code == 0 and all(r[3] == "0" for r in parse(out)[1:])  # stricter: the spike passes
    for bad in ("0", "1", "6"):  # the old robust-z threshold (6) is refused, not misread
        code, out, err = run_cli(capsys, "detect", str(path), "--threshold", bad)
        assert code == 2 and out == "" and "--threshold" in err and "between 0 and 1" in err


def test_forecast_rows_and_horizon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = series_rows(400, seed=1)
    code, out, _ = run_cli(
        capsys, "forecast", str(write(tmp_path / "s.csv", rows)), "--horizon-steps", "3"
    )
    table = parse(out)
    assert code == 0 and table[0] == ["timestamp", "value", "forecast"]
    assert [tuple(r[:2]) for r in table[1:]] == rows
    f = np.array([float(r[2]) for r in table[1:]])
    v = np.array([float(r[1]) for r in table[1:]])
    assert f[0] == pytest.approx(v[0], rel=1e-5)  # no history: persistence


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(n=st.integers(2, 150), cut=st.integers(1, 150), seed=st.integers(0, 5))
def test_a_prefix_of_the_file_gives_the_prefix_of_the_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], n: int, cut: int, seed: int
) -> None:
    rows = series_rows(n, seed=seed, spike_at=n // 2)
    cut = min(cut, n)
    full, part = tmp_path / "full.csv", tmp_path / "part.csv"
    write(full, rows)
    write(part, rows[:cut])
    for args in (("detect",), ("forecast", "--horizon-steps", "2")):
        _, out_full, _ = run_cli(capsys, args[0], str(full), *args[1:])
        _, out_part, _ = run_cli(capsys, args[0], str(part), *args[1:])
        assert parse(out_part) == parse(out_full)[: cut + 1]


def test_iso_timestamps_and_named_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "iso.csv"
    lines = ["time,gpu,power"] + [
        f"2024-03-10T0{h}:{m:02d}:00Z,0,{400 + m}" for h in range(1, 3) for m in range(0, 60, 5)
    ]
    path.write_text("\n".join(lines) + "\n")
    code, out, _ = run_cli(
        capsys, "detect", str(path), "--time-column", "time", "--value-column", "power"
    )
    assert code == 0 and parse(out)[1][:2] == ["2024-03-10T01:00:00Z", "400"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "line 1: empty file"),
        ("timestamp,value\n", "line 2: no data rows"),
        ("time,value\n1,2\n", "line 1: no column 'timestamp'"),
        ("timestamp,value\n1,2\n2,abc\n", "line 3: value 'abc' is not a number"),
        ("timestamp,value\n1,2\nyesterday,3\n", "line 3: timestamp 'yesterday'"),
        ("timestamp,value\n1,2\n2\n", "line 3: 1 fields"),
        ("timestamp,value\n1,2\n2,nan\n", "line 3: value 'nan' is not a finite number"),
        ("timestamp,value\n1,2\n2024-01-01T00:00:00,3\n", "line 3: timestamp"),
    ],
)
@pytest.mark.parametrize("command", ["detect", "forecast"])
def test_bad_input_is_refused_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str, command: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    extra = ["--horizon-steps", "2"] if command == "forecast" else []
    code, out, err = run_cli(capsys, command, str(path), *extra)
    assert code == 2 and out == ""
    assert err.startswith("ooda: error: ") and message in err and str(path) in err
    assert len(err.strip().splitlines()) == 1


def test_out_of_order_timestamps_are_warned_or_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [("10", "1"), ("20", "2"), ("20", "3"), ("15", "4"), ("30", "5")]
    path = write(tmp_path / "o.csv", rows)
    code, out, err = run_cli(capsys, "detect", str(path))
    assert code == 0 and len(parse(out)) == 6  # processed in file order
    assert "line 4: timestamp '20' repeats line 3" in err
    assert "line 5: timestamp '15' steps back from line 4" in err
    code, out, err = run_cli(capsys, "forecast", str(path), "--horizon-steps", "1", "--strict")
    assert code == 2 and out == "" and "line 4" in err and "--strict" in err


def test_missing_file_and_bad_horizon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "detect", str(tmp_path / "nope.csv"))
    assert code == 2 and "nope.csv: cannot read" in err
    path = write(tmp_path / "s.csv", series_rows(5))
    code, _, err = run_cli(capsys, "forecast", str(path), "--horizon-steps", "0")
    assert code == 2 and "--horizon-steps" in err


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize(("bad_line", "bom"), [(2, False), (102, False), (5000, True)])
def test_a_byte_that_is_not_utf8_is_named_by_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], newline: bytes, bad_line: int, bom: bool
) -> None:
    """The whole file is decoded before it is read: a text stream decodes ahead in 8 KiB
    chunks, and named a line before the bad byte (line 1 for anything in the first chunk)."""
    lines = [b"timestamp,value"] + [f"{i},{i}.5".encode() for i in range(bad_line - 2)]
    lines += [b"9999,caf\xe9", b"10000,1"]
    path = tmp_path / "latin1.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines) + newline)
    code, out, err = run_cli(capsys, "detect", str(path))
    assert code == 2 and out == ""
    assert f"line {bad_line}: not UTF-8 text" in err and str(path) in err


def test_a_byte_order_mark_is_not_part_of_the_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbftimestamp,value\r\n1,2\r\n2,3\r\n")
    code, out, err = run_cli(capsys, "detect", str(path))
    assert code == 0 and err == ""
    assert [row[:2] for row in parse(out)] == [["timestamp", "value"], ["1", "2"], ["2", "3"]]


def test_the_command_default_is_the_detector_default() -> None:
    from agent.cli.detect import DEFAULT_ALARM_P
    from agent.orient.stream import StreamParams

    assert StreamParams().alarm_p == DEFAULT_ALARM_P
