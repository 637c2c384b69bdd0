"""The request journal on its own: rows, their three ends, pruning, the size cap, damage."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from rkmqtt.errors import ConfigError
from rkmqtt.mqtt.intake import Incoming
from rkmqtt.mqtt.journal import Delivered, Journal, journal_path
from rkmqtt.sched.request import RequestKey


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


def test_a_journal_survives_reopening(tmp_path: Path) -> None:
    path = journal_path(tmp_path, "rkmqtt-node/1")
    assert path.name == "journal-rkmqtt-node_1.sqlite3"
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
