"""The request journal on its own: rows, their three ends, pruning, the size cap, damage."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from rkmqtt.errors import ConfigError
from rkmqtt.mqtt.intake import Incoming
from rkmqtt.mqtt.journal import Delivered, Journal, journal_path, legacy_journal_path
from rkmqtt.sched.request import RequestKey

REPO = Path(__file__).resolve().parents[1]


def incoming(client: str = "dev", text: str = "hello", **kw: object) -> Incoming:
    return Incoming(client, text.encode(), **kw)  # type: ignore[arg-type]


def test_rows_end_three_ways_and_the_rest_is_pending_in_arrival_order(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3", dedup_window_s=60, max_bytes=10**6)
    a = j.admit(incoming(text="a", response_topic="p/reply/dev/x", correlation=b"\x00c", expiry_s=9.0),
                RequestKey("dev", "a"), now=100.0)  # fmt: skip
    b = j.admit(incoming(text="b"), RequestKey("dev", "b"), now=101.0)
    c = j.admit(incoming(text="c"), RequestKey("dev", "c"), now=102.0)
    d = j.admit(incoming(text="d"), RequestKey("dev", "d"), now=103.0)
    assert isinstance(a, int) and isinstance(b, int) and isinstance(c, int) and isinstance(d, int)
    j.delivered(b, b'{"final": "b"}', started=True, now=110.0)  # kept for retries
    j.delivered(c, b'{"final": "c"}', started=False, now=110.0)  # never ran: gone
    j.drop(d)  # a duplicate: gone
    pending = j.pending()
    assert [p.seq for p in pending] == [a]
    assert pending[0].incoming == incoming(text="a", response_topic="p/reply/dev/x", correlation=b"\x00c", expiry_s=9.0)
    assert pending[0].arrived == 100.0
    assert j.counts() == (1, 1)
    again = j.admit(incoming(text="b"), RequestKey("dev", "b"), now=150.0)
    assert again == Delivered(b, b'{"final": "b"}')
    assert isinstance(j.admit(incoming(text="c"), RequestKey("dev", "c"), now=150.0), int)  # c may run now
    assert isinstance(j.admit(incoming(text="b"), RequestKey("other", "b"), now=150.0), int)  # ids are per client
    assert isinstance(j.admit(incoming(text="b"), RequestKey("dev", "b"), now=171.0), int)  # past the window
    j.close()


def test_pruning_keeps_requests_in_flight_and_honours_the_size_cap(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3", dedup_window_s=1000, max_bytes=50_000)
    big = "x" * 1000
    live = [j.admit(incoming(text=big), RequestKey("dev", f"live{i}"), now=1.0) for i in range(20)]
    for i in range(100):
        seq = j.admit(incoming(text=big), RequestKey("dev", f"done{i}"), now=2.0)
        assert isinstance(seq, int)
        j.delivered(seq, big.encode(), started=True, now=3.0)
    j.prune(now=4.0)
    pending, kept = j.counts()
    assert pending == 20  # never dropped, whatever the cap
    # 20 x 1,100 bytes in flight leave room for 13 kept replies of 2,100 bytes: the oldest 87 went
    assert kept == 13
    assert [p.seq for p in j.pending()] == live
    j.prune(now=2000.0)  # past the dedup window: every kept reply goes
    assert j.counts() == (20, 0)
    j.close()


def test_a_journal_is_named_by_session_prefix_and_broker(tmp_path: Path) -> None:
    """Two bridges of one node name on one host against two brokers keep two journals."""
    path = journal_path(tmp_path, "rkmqtt-node/1", "rkmqtt", "192.168.1.10:1883")
    assert path.name.startswith("journal-rkmqtt-node_1-192.168.1.10_1883-") and path.suffix == ".sqlite3"
    others = {journal_path(tmp_path, "rkmqtt-node/1", "rkmqtt", "192.168.1.11:1883"),
              journal_path(tmp_path, "rkmqtt-node/1", "house", "192.168.1.10:1883"),
              journal_path(tmp_path, "rkmqtt-node_1", "rkmqtt", "192.168.1.10:1883")}  # fmt: skip
    assert len(others) == 3 and path not in others
    assert path == journal_path(tmp_path, "rkmqtt-node/1", "rkmqtt", "192.168.1.10:1883")


def test_a_journal_of_the_old_name_is_taken_over_with_its_requests(tmp_path: Path) -> None:
    legacy = legacy_journal_path(tmp_path, "rkmqtt-node")
    assert legacy.name == "journal-rkmqtt-node.sqlite3"  # what rkmqtt 0.1.0 wrote
    old = Journal(legacy, 60, 10**6)
    seq = old.admit(incoming(text="left over"), RequestKey("dev", "a"), now=1.0)
    old.close()
    path = journal_path(tmp_path, "rkmqtt-node", "rkmqtt", "127.0.0.1:1883")
    j = Journal(path, 60, 10**6, legacy=legacy)
    assert [(p.seq, p.incoming.payload) for p in j.pending()] == [(seq, b"left over")]
    assert not legacy.exists()
    j.close()
    legacy.write_bytes(b"another file of the old name")  # once the new one exists, the old name is left alone
    Journal(path, 60, 10**6, legacy=legacy).close()
    assert legacy.read_bytes() == b"another file of the old name"


HOLD = """
import sys, time
from pathlib import Path
from rkmqtt.mqtt.journal import Journal
j = Journal(Path(sys.argv[1]), 60, 10**6)
print("open", flush=True)
time.sleep(120)
"""


def test_a_second_process_is_refused_the_journal_in_one_line_naming_the_first(tmp_path: Path) -> None:
    path = tmp_path / "journal-x.sqlite3"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(ConfigError) as refused:
            Journal(path, 60, 10**6)
        message = str(refused.value)
        assert f"is in use by another rkmqtt (pid {holder.pid})" in message and "\n" not in message
        holder.send_signal(signal.SIGKILL)  # a killed process leaves no lock behind
        holder.wait(10)
        Journal(path, 60, 10**6).close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_a_journal_survives_reopening(tmp_path: Path) -> None:
    path = journal_path(tmp_path, "rkmqtt-node/1", "rkmqtt", "localhost:1883")
    j = Journal(path, 60, 10**6)
    seq = j.admit(incoming(), RequestKey("dev", "a"), now=1.0)
    j.close()
    j2 = Journal(path, 60, 10**6)
    assert [p.seq for p in j2.pending()] == [seq]
    j2.close()


def test_damage_is_moved_aside_and_an_unwritable_place_is_a_config_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "j.sqlite3"
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 5000)
    j = Journal(path, 60, 10**6)
    assert j.pending() == []
    assert "is damaged" in caplog.text
    assert len(list(tmp_path.glob("j.sqlite3.corrupt-*"))) == 1
    j.close()
    taken = tmp_path / "a-directory.sqlite3"  # (as root, permissions would not stop the test)
    taken.mkdir()
    with pytest.raises(ConfigError, match=r"journal .* cannot open it"):
        Journal(taken, 60, 10**6)
    with pytest.raises(ConfigError, match="state_dir"):
        Journal(path / "below-a-file" / "j.sqlite3", 60, 10**6)


def test_writes_are_in_wal_mode(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3", 60, 10**6)
    j.admit(incoming(), RequestKey("dev", "a"))
    mode = sqlite3.connect(tmp_path / "j.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    j.close()
