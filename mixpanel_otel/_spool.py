"""The durable spool: encoded group messages kept in SQLite until delivered.

Used for overflow during an outage and for what the exit deadline leaves;
replayed, oldest first, by the next consumer (in this or a later process)
that uses the same directory. Rows are claimed and deleted in one
transaction, so two processes never replay the same row. A corrupt or
unreadable file is moved aside and reported; the spool never raises.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from typing import Optional

__all__ = ["Spool"]

logger = logging.getLogger("mixpanel_otel")

_BUSY_TIMEOUT = 2.0  # seconds to wait for another process's transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,   -- send order; rows put back in front get lower numbers
    body TEXT NOT NULL         -- one wire message, JSON
);
"""


class Spool:
    """One SQLite file per (token, API host) in ``directory``; thread-safe, never raises."""

    def __init__(self, directory: str, token: str, base_url: str) -> None:
        digest = hashlib.sha256(f"{token}\n{base_url}".encode()).hexdigest()[:16]
        self.path = os.path.join(directory, f"mixpanel-otel-{digest}.sqlite3")
        self._lock = threading.Lock()
        self._db: Optional[sqlite3.Connection] = None

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            db.execute("SELECT count(*) FROM messages").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def _connect(self) -> Optional[sqlite3.Connection]:
        if self._db is not None:
            return self._db
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                db = self._open()
            except sqlite3.OperationalError as exc:
                # Busy or locked by another process, disk full: the file is fine.
                logger.warning("mixpanel-otel: spool %s not available now: %s", self.path, exc)
                return None
            except sqlite3.DatabaseError as exc:  # "not a database", "malformed"
                self._move_aside(exc)
                db = self._open()
        except (OSError, sqlite3.Error) as exc:
            logger.error("mixpanel-otel: spool %s is unusable: %s", self.path, exc)
            return None
        self._db = db
        return db

    def _move_aside(self, exc: BaseException) -> None:
        aside = f"{self.path}.corrupt-{int(time.time())}"
        logger.error(
            "mixpanel-otel: spool %s is unreadable (%s); moved aside to %s", self.path, exc, aside
        )
        if self._db is not None:
            self._db.close()
            self._db = None
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(self.path + suffix, aside + suffix)
            except OSError:
                pass

    def _run(self, work, default):
        with self._lock:
            db = self._connect()
            if db is None:
                return default
            try:
                return work(db)
            except sqlite3.DatabaseError as exc:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(exc, sqlite3.OperationalError):
                    # Busy, locked, full, I/O: the file is fine; try again later.
                    logger.warning("mixpanel-otel: spool %s: %s", self.path, exc)
                else:
                    self._move_aside(exc)  # corrupt: "not a database", "malformed"
                return default

    def put(self, front: list[str], back: list[str]) -> bool:
        """Store ``front`` before every stored row and ``back`` after them, in order."""

        def work(db: sqlite3.Connection) -> bool:
            db.execute("BEGIN IMMEDIATE")
            low, high = db.execute("SELECT min(seq), max(seq) FROM messages").fetchone()
            low = 0 if low is None else low
            high = 0 if high is None else high
            rows = [(low - len(front) + i, body) for i, body in enumerate(front)]
            rows += [(high + 1 + i, body) for i, body in enumerate(back)]
            db.executemany("INSERT INTO messages (seq, body) VALUES (?, ?)", rows)
            db.execute("COMMIT")
            return True

        if not front and not back:
            return True
        return self._run(work, False)

    def take(self, limit: int) -> list[str]:
        """Claim (and delete) up to ``limit`` of the oldest rows."""

        def work(db: sqlite3.Connection) -> list[str]:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "SELECT seq, body FROM messages ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
            if rows:
                db.execute("DELETE FROM messages WHERE seq <= ?", (rows[-1][0],))
            db.execute("COMMIT")
            return [body for _, body in rows]

        return self._run(work, [])

    def count(self) -> int:
        return self._run(lambda db: db.execute("SELECT count(*) FROM messages").fetchone()[0], 0)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
