"""The request journal: accepted requests kept in SQLite until their final reply is delivered, and the
recorded finals that answer a retried id; one file per bridge (its client id, prefix and broker; it also
holds what the bridge drained from an offline node's session), locked against a second process. `admit`
and `delivered` run on paho's network thread, `drop` on the scheduler thread, `pending` and `close` on
the main thread. How a row ends: docs/architecture.md, "The request journal"."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rkmqtt.errors import ConfigError
from rkmqtt.mqtt.intake import Incoming
from rkmqtt.sched.request import RequestKey

_LOGGER = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    client TEXT NOT NULL,
    id TEXT NOT NULL,
    arrived REAL NOT NULL,            -- wall clock, seconds
    payload BLOB NOT NULL,
    response_topic TEXT,
    correlation BLOB,
    expiry REAL,
    final BLOB,                       -- the delivered final reply of a request that started
    delivered REAL                    -- wall clock; NULL while in flight
);
CREATE INDEX IF NOT EXISTS requests_key ON requests (client, id);
CREATE INDEX IF NOT EXISTS requests_delivered ON requests (delivered);
"""
_PRUNE_EVERY = 500  # deliveries between two prunes
_ROW_BYTES = "LENGTH(payload) + COALESCE(LENGTH(final), 0) + 100"  # what a row weighs against the size cap


@dataclass(frozen=True)
class Pending:
    """A request journaled but not answered, to take up again."""

    seq: int
    incoming: Incoming
    arrived: float  # wall clock


@dataclass(frozen=True)
class Delivered:
    """The final reply recorded for a retried id."""

    seq: int
    final: bytes


class Journal:
    def __init__(self, path: Path, dedup_window_s: float, max_bytes: int, legacy: Path | None = None) -> None:
        """`legacy`: a journal of the old name to take over when `path` does not exist yet."""
        self.path = path
        self.dedup_window_s = dedup_window_s
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._deliveries = 0
        _make_dir(path.parent)
        self._owner = _own(path)
        try:
            if legacy is not None:
                adopt_legacy(legacy, path)
            self._db = _open(path)
        except BaseException:
            os.close(self._owner)
            raise

    # -- paho network thread ----------------------------------------------------------------
    def admit(self, msg: Incoming, key: RequestKey, now: float | None = None) -> int | Delivered:
        """Journal an accepted request and return its row; or, when the id ran recently and its
        final reply was delivered, that reply (nothing is written then)."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute(
                "SELECT seq, final FROM requests WHERE client = ? AND id = ? AND final IS NOT NULL "
                "AND delivered >= ? ORDER BY seq DESC LIMIT 1",
                (key.client, key.id, now - self.dedup_window_s),
            ).fetchone()
            if row is not None:
                return Delivered(int(row[0]), bytes(row[1]))
            cur = self._db.execute(
                "INSERT INTO requests (client, id, arrived, payload, response_topic, correlation, expiry) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key.client, key.id, now, msg.payload, msg.response_topic, msg.correlation, msg.expiry_s),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def delivered(self, seq: int, final: bytes, started: bool, now: float | None = None) -> None:
        """The broker acknowledged the final reply of row `seq`."""
        now = time.time() if now is None else now
        with self._lock:
            if started and self.dedup_window_s > 0:
                self._db.execute("UPDATE requests SET final = ?, delivered = ? WHERE seq = ?", (final, now, seq))
            else:
                self._db.execute("DELETE FROM requests WHERE seq = ?", (seq,))
            self._deliveries += 1
            if self._deliveries % _PRUNE_EVERY == 0:
                self._prune(now)

    def has(self, key: RequestKey, now: float | None = None) -> bool:
        """Whether a request with this key is in flight here, or was answered within the dedup
        window (a failover drain's copy of a request this node has already)."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM requests WHERE client = ? AND id = ? AND (delivered IS NULL OR delivered >= ?) LIMIT 1",
                (key.client, key.id, now - self.dedup_window_s),
            ).fetchone()
        return row is not None

    # -- scheduler thread -------------------------------------------------------------------------
    def drop(self, seq: int) -> None:
        """Row `seq` was a duplicate of a request in flight (or a retry answered from memory)."""
        with self._lock:
            self._db.execute("DELETE FROM requests WHERE seq = ?", (seq,))

    # -- main thread ----------------------------------------------------------------------------------
    def pending(self) -> list[Pending]:
        """Requests not answered yet, in arrival order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, client, payload, response_topic, correlation, expiry, arrived FROM requests "
                "WHERE delivered IS NULL ORDER BY seq"
            ).fetchall()
        return [
            Pending(
                seq,
                Incoming(client, bytes(payload), topic, None if corr is None else bytes(corr), expiry),
                arrived,
            )
            for seq, client, payload, topic, corr, expiry, arrived in rows
        ]

    def prune(self, now: float | None = None) -> None:
        with self._lock:
            self._prune(time.time() if now is None else now)

    def counts(self) -> tuple[int, int]:
        """(requests in flight, delivered replies kept)."""
        with self._lock:
            pending, kept = self._db.execute(
                "SELECT COUNT(*) - COUNT(delivered), COUNT(delivered) FROM requests"
            ).fetchone()
        return int(pending), int(kept)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            with contextlib.suppress(OSError):  # closing the file ends the lock
                os.close(self._owner)

    def _prune(self, now: float) -> None:
        """Finished rows past the dedup window go; then, above the size cap, the oldest finished."""
        self._db.execute(
            "DELETE FROM requests WHERE delivered IS NOT NULL AND delivered < ?", (now - self.dedup_window_s,)
        )
        excess = self._size() - self.max_bytes
        if excess <= 0:
            return
        cut, freed = None, 0
        for seq, size in self._db.execute(
            f"SELECT seq, {_ROW_BYTES} FROM requests WHERE delivered IS NOT NULL ORDER BY seq"
        ):
            cut, freed = seq, freed + size
            if freed >= excess:
                break
        if cut is not None:  # requests in flight are never dropped, whatever the size
            self._db.execute("DELETE FROM requests WHERE delivered IS NOT NULL AND seq <= ?", (cut,))

    def _size(self) -> int:
        return int(self._db.execute(f"SELECT COALESCE(SUM({_ROW_BYTES}), 0) FROM requests").fetchone()[0])


def journal_path(state_dir: Path, client_id: str, topic_prefix: str, broker: str) -> Path:
    """One journal per bridge: a client id on one broker (`host:port`), serving one prefix. The
    requests in it are the ones this bridge acknowledged: on its own session, and on an offline
    node's session that it drained (those are its own to answer from then on). Two bridges of one
    node name on one machine against two brokers keep two journals. The name is readable; a short
    hash of the three keeps names that read the same apart."""
    digest = hashlib.sha256(f"{client_id}\n{topic_prefix}\n{broker}".encode()).hexdigest()[:8]
    return state_dir / f"journal-{_safe(client_id)[:64]}-{_safe(broker)[:64]}-{digest}.sqlite3"


def legacy_journal_path(state_dir: Path, client_id: str) -> Path:
    """The name a journal had before it named the broker and prefix (rkmqtt 0.1.0)."""
    return state_dir / f"journal-{_safe(client_id)}.sqlite3"


def adopt_legacy(legacy: Path, path: Path) -> bool:
    """Rename a journal of the old name to `path` (when there is none there yet), so that the
    requests it holds are taken up; True when it did."""
    if path.exists() or not legacy.is_file():
        return False
    for suffix in ("-wal", "-shm", ""):  # the database last: its presence is what is checked
        src = Path(f"{legacy}{suffix}")
        if src.exists():
            src.replace(Path(f"{path}{suffix}"))
    _LOGGER.warning("journal %s renamed to %s (journals are now named by broker and prefix too)", legacy, path)
    return True


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in text)


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"state_dir {folder}: cannot create it ({e.strerror}); set state_dir to a writable directory"
        ) from e


def _own(path: Path) -> int:
    """Lock the journal for this process (an flock on `<journal>.lock`, which holds our pid), or
    raise ConfigError naming the process that has it: two processes must not take up and answer
    the same requests. The lock ends with the process, however it ends."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"journal {path}: cannot open {lock_path.name} ({e.strerror}); set state_dir") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(
            f"journal {path} is in use by another rkmqtt (pid {other}) with the same node, prefix and broker: "
            "stop that one, or give this one its own node_name or state_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _open(path: Path) -> sqlite3.Connection:
    """Open (or create) the journal. A file that is not a sound SQLite journal is moved aside with a
    warning; a file that cannot be opened is a ConfigError naming it."""
    try:
        return _connect(path)
    except sqlite3.OperationalError as e:  # permissions, a read-only disk, a locked file
        raise ConfigError(f"journal {path}: cannot open it ({e}); make it writable or set state_dir") from e
    except sqlite3.DatabaseError as e:  # not a database, or a damaged one
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        _LOGGER.warning("journal %s is damaged (%s): moved aside to %s; starting an empty one", path, e, aside)
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{path}{suffix}")
            if src.exists():
                src.replace(Path(f"{aside}{suffix}"))
        return _connect(path)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")
        db.executescript(_SCHEMA)
        db.execute("SELECT seq, client, id, arrived, payload, response_topic, correlation, expiry, final, delivered "
                   "FROM requests LIMIT 1").fetchall()  # fmt: skip
    except BaseException:
        db.close()
        raise
    # Autocommit (isolation_level None): each statement is its own commit, one WAL append.
    return db
