"""Trait state on disk, shared by the processes of one host: an observation log,
the aggregated groups, and a lock that elects one aggregator.

One SQLite file per Mixpanel project and host (``traits-<hash>.sqlite3`` in
``trait_state_dir``), in WAL mode with a busy timeout, so several processes
write it safely:

- ``observations``: every process appends the records it counted (in batches,
  as JSON); a committed batch survives ``kill -9``.
- ``groups`` and ``meta.cursor``: the aggregated state of every group and the
  last observation it includes, saved together in one transaction; the
  observations it includes are deleted then. A new aggregator loads them and
  replays the log after the cursor, so no observation counts twice or is lost.
- ``exports``: digests of gateway calls counted recently (a resent call
  counts once, across restarts too).

The aggregator is the process holding ``fcntl.flock`` on ``<file>.lock``;
the kernel releases it when that process dies, and another takes over.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable
from typing import Any, Optional

__all__ = ["Batch", "TraitStore"]

#: One record's observations: (record time, [(trait signature, group id, value)]).
Batch = list[tuple[float, list[tuple[str, str, Any]]]]

_BUSY_MS = 10_000
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS groups ("
    " group_key TEXT NOT NULL, group_id TEXT NOT NULL, state TEXT NOT NULL,"
    " PRIMARY KEY (group_key, group_id))",
    "CREATE TABLE IF NOT EXISTS observations (id INTEGER PRIMARY KEY AUTOINCREMENT, batch TEXT)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value)",
    "CREATE TABLE IF NOT EXISTS exports (digest TEXT PRIMARY KEY, at REAL NOT NULL)",
)


class TraitStore:
    """The shared state file of one project and host, opened by one process."""

    def __init__(self, directory: str, scope: str) -> None:
        os.makedirs(directory, exist_ok=True)
        name = hashlib.sha256(scope.encode()).hexdigest()[:16]
        self.path = os.path.join(directory, f"traits-{name}.sqlite3")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=_BUSY_MS / 1000
        )
        self._db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a commit survives the process's death
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                self._db.execute(statement)
        self._lock_file: Optional[int] = None
        self.pid = os.getpid()

    # -- the aggregator's lock -------------------------------------------------------

    def try_lead(self) -> bool:
        """Take the aggregator's lock if it is free (it stays taken until :meth:`resign`)."""
        if self._lock_file is not None:
            return True
        handle = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(handle)
            return False
        self._lock_file = handle
        return True

    @property
    def leading(self) -> bool:
        return self._lock_file is not None

    def resign(self) -> None:
        if self._lock_file is not None:
            os.close(self._lock_file)  # releases the flock
            self._lock_file = None

    def set_leader_exiting(self, exiting: bool) -> None:
        """Tell processes that end after this one whether the aggregator is ending too."""
        self._write("INSERT OR REPLACE INTO meta VALUES ('leader_exiting', ?)", (int(exiting),))

    def leader_exiting(self) -> bool:
        row = self._read("SELECT value FROM meta WHERE name = 'leader_exiting'")
        return bool(row and row[0][0])

    # -- observations ----------------------------------------------------------------

    def append(
        self,
        batch: Batch,
        digest: Optional[str] = None,
        dedupe_window: float = 0.0,
        now: float = 0.0,
    ) -> bool:
        """Add ``batch`` to the log, durably. With ``digest``: not when a batch with
        the same digest was added within ``dedupe_window`` seconds; False then."""
        data = json.dumps(batch, separators=(",", ":"))
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if digest is not None:
                row = self._db.execute(
                    "SELECT at FROM exports WHERE digest = ?", (digest,)
                ).fetchone()
                if row is not None and now - row[0] < dedupe_window:
                    return False
                self._db.execute("INSERT OR REPLACE INTO exports VALUES (?, ?)", (digest, now))
                self._db.execute("DELETE FROM exports WHERE at < ?", (now - dedupe_window,))
            if batch:
                self._db.execute("INSERT INTO observations (batch) VALUES (?)", (data,))
        return True

    def read_after(self, cursor: int, limit: int = 1000) -> list[tuple[int, Batch]]:
        """Up to ``limit`` logged batches after ``cursor``, in order."""
        rows = self._read(
            "SELECT id, batch FROM observations WHERE id > ? ORDER BY id LIMIT ?", (cursor, limit)
        )
        return [(int(row[0]), json.loads(row[1])) for row in rows]

    # -- aggregated state ------------------------------------------------------------

    def load(self) -> tuple[int, list[tuple[tuple[str, str], dict[str, Any]]]]:
        """The cursor and every stored group."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            cursor = self._db.execute("SELECT value FROM meta WHERE name = 'cursor'").fetchone()
            rows = self._db.execute("SELECT group_key, group_id, state FROM groups").fetchall()
        groups = [((key, gid), json.loads(state)) for key, gid, state in rows]
        return (int(cursor[0]) if cursor else 0), groups

    def save(
        self,
        cursor: int,
        rows: Iterable[tuple[tuple[str, str], dict[str, Any]]],
        forgotten: Iterable[tuple[str, str]],
    ) -> None:
        """Write changed groups and the cursor they include, in one transaction;
        drop the observations they include."""
        encoded = [(key[0], key[1], json.dumps(data)) for key, data in rows]
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "DELETE FROM groups WHERE group_key = ? AND group_id = ?", list(forgotten)
            )
            self._db.executemany("INSERT OR REPLACE INTO groups VALUES (?, ?, ?)", encoded)
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('cursor', ?)", (cursor,))
            self._db.execute("DELETE FROM observations WHERE id <= ?", (cursor,))

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(sql, args)

    def close(self) -> None:
        self.resign()
        with self._lock:
            self._db.close()

    def abandon(self) -> None:
        """In a forked child: let go of the parent's connection and lock. The lock
        stays the parent's (a flock is released when its last descriptor closes);
        the connection is dropped unused, as SQLite asks of one crossing a fork."""
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None
