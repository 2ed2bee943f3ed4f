"""The sink's SQLite storage: profiles, their last updates, and every message seen.

:class:`Store` writes one request's messages in one transaction with batched
statements (one ``SELECT`` for the request's profiles, then ``executemany``
per table). Its read queries are public (the pages, the CLI and
:class:`~mixpanel_otel.sink.Sink` use them); :func:`read_profiles` reads a
database file without a running sink. Operation semantics are the one
implementation in :mod:`mixpanel_otel._semantics`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

from .._semantics import apply_operation
from .._wire import group_id_key
from .protocol import ENDPOINTS

__all__ = [
    "RECEIVED_CAP",
    "REJECTED_CAP",
    "UPDATES_PER_PROFILE",
    "Reader",
    "Store",
    "read_profiles",
]

JSONDict = dict[str, Any]
GroupId = Union[str, int, float]

#: Last updates kept per profile for the "last updates" view.
UPDATES_PER_PROFILE = 50
#: Messages kept per endpoint in the ``received`` table (pruned in steps of a quarter).
RECEIVED_CAP = 100_000
#: Rejected messages kept (pruned in steps of a quarter).
REJECTED_CAP = 10_000
#: Distinct profiles whose update counts are tracked before all of them are pruned at once.
_TRACKED_PROFILES = 50_000
#: Most values bound in one statement (SQLite's old default limit is 999).
_CHUNK = 900

_SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    group_key TEXT NOT NULL,
    group_id TEXT NOT NULL,
    properties TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (group_key, group_id)
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_key TEXT NOT NULL,
    group_id TEXT NOT NULL,
    op TEXT NOT NULL,
    payload TEXT NOT NULL,
    time REAL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS updates_by_profile ON updates (group_key, group_id, id);
CREATE TABLE IF NOT EXISTS received (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint TEXT NOT NULL,
    message TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS received_by_endpoint ON received (endpoint, id);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint TEXT NOT NULL,
    message TEXT NOT NULL,
    reason TEXT NOT NULL,
    received_at REAL NOT NULL
);
"""

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.loads


def _endpoint_name(endpoint: str) -> str:
    name = endpoint.strip("/")
    if name not in ENDPOINTS.values():
        raise ValueError(
            f"unknown endpoint {endpoint!r}; expected one of " + ", ".join(ENDPOINTS.values())
        )
    return name


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class Reader:
    """The read queries, each on a short-lived connection (WAL lets reads run beside writes)."""

    def __init__(self, db_path: Union[str, os.PathLike[str]], readonly: bool = False) -> None:
        self.db_path = os.fspath(db_path)
        self._readonly = readonly

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        if self._readonly:
            uri = "file:" + os.path.abspath(self.db_path) + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=10.0)
        else:
            conn = sqlite3.connect(self.db_path, timeout=10.0)
        try:
            return conn.execute(sql, tuple(params)).fetchall()
        finally:
            conn.close()

    def search_profiles(
        self,
        group_key: Optional[str] = None,
        id_contains: Optional[str] = None,
        recent_first: bool = False,
        limit: Optional[int] = None,
    ) -> list[JSONDict]:
        """Profiles with ``created_at``/``updated_at``; by (group_key, group_id) or newest first."""
        where, params = [], []
        if group_key:
            where.append("group_key = ?")
            params.append(group_key)
        if id_contains:
            where.append("group_id LIKE ? ESCAPE '\\'")
            params.append(_like(id_contains))
        sql = "SELECT group_key, group_id, properties, created_at, updated_at FROM profiles"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY " + (
            "updated_at DESC, group_key, group_id" if recent_first else "group_key, group_id"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [
            {
                "group_key": k,
                "group_id": i,
                "properties": _loads(p),
                "created_at": c,
                "updated_at": u,
            }
            for k, i, p, c, u in self._query(sql, params)
        ]

    def profiles(self, group_key: Optional[str] = None) -> list[JSONDict]:
        """``group_key``, ``group_id``, ``properties`` of every profile, sorted by the first two."""
        sql = "SELECT group_key, group_id, properties FROM profiles"
        params: tuple[str, ...] = ()
        if group_key:
            sql, params = sql + " WHERE group_key = ?", (group_key,)
        rows = self._query(sql + " ORDER BY group_key, group_id", params)
        return [{"group_key": k, "group_id": i, "properties": _loads(p)} for k, i, p in rows]

    def profile(self, group_key: str, group_id: GroupId) -> Optional[JSONDict]:
        """The properties of one profile, or None if it does not exist."""
        rows = self._query(
            "SELECT properties FROM profiles WHERE group_key=? AND group_id=?",
            (group_key, group_id_key(group_id)),
        )
        return _loads(rows[0][0]) if rows else None

    def group_keys(self) -> list[str]:
        """The distinct group keys that have a profile."""
        return [k for (k,) in self._query("SELECT DISTINCT group_key FROM profiles ORDER BY 1")]

    def updates(self, group_key: str, group_id: GroupId) -> list[JSONDict]:
        """The last updates of one profile, oldest first: op, payload, time, received_at."""
        rows = self._query(
            "SELECT op, payload, time, received_at FROM updates"
            " WHERE group_key=? AND group_id=? ORDER BY id DESC LIMIT ?",
            (group_key, group_id_key(group_id), UPDATES_PER_PROFILE),
        )
        return [
            {"op": op, "payload": _loads(payload), "time": t, "received_at": r}
            for op, payload, t, r in reversed(rows)
        ]

    def received(self, endpoint: str) -> list[Any]:
        """Valid messages stored for ``"engage"``, ``"track"``, ``"import"`` (or ``"groups"``)."""
        rows = self._query(
            "SELECT message FROM received WHERE endpoint=? ORDER BY id", (_endpoint_name(endpoint),)
        )
        return [_loads(m) for (m,) in rows]

    def recent_messages(self, endpoint: str, limit: int = 200) -> list[JSONDict]:
        """The newest valid messages of one endpoint, newest first: message, received_at."""
        rows = self._query(
            "SELECT message, received_at FROM received WHERE endpoint=? ORDER BY id DESC LIMIT ?",
            (_endpoint_name(endpoint), int(limit)),
        )
        return [{"message": _loads(m), "received_at": r} for m, r in rows]

    def rejected(self, endpoint: Optional[str] = None, limit: int = 200) -> list[JSONDict]:
        """The newest refused messages, newest first: endpoint, message, reason, received_at.

        A request refused whole (not JSON, too many messages, wrong credentials)
        is one entry whose ``message`` is the data as sent, clipped.
        """
        sql = "SELECT endpoint, message, reason, received_at FROM rejected"
        params: tuple[Any, ...] = ()
        if endpoint:
            sql, params = sql + " WHERE endpoint=?", (_endpoint_name(endpoint),)
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", (*params, int(limit)))
        return [
            {"endpoint": e, "message": _loads(m), "reason": why, "received_at": r}
            for e, m, why, r in rows
        ]

    def counts(self) -> dict[str, int]:
        """Stored messages per endpoint, plus ``profiles`` and ``rejected``."""
        counts = dict.fromkeys(ENDPOINTS.values(), 0)
        rows = self._query(
            "SELECT endpoint, COUNT(*) FROM received GROUP BY endpoint"
            " UNION ALL SELECT 'profiles', COUNT(*) FROM profiles"
            " UNION ALL SELECT 'rejected', COUNT(*) FROM rejected"
        )
        counts.update({name: n for name, n in rows})
        return counts


def read_profiles(
    db_path: Union[str, os.PathLike[str]], group_key: Optional[str] = None
) -> list[JSONDict]:
    """The profiles a sink database holds, as :meth:`Sink.profiles` gives them, without serving."""
    return Reader(db_path, readonly=True).profiles(group_key)


class Store(Reader):
    """The sink's database: one writer connection, serialised by a lock; readers beside it."""

    def __init__(self, db_path: Union[str, os.PathLike[str]]) -> None:
        super().__init__(db_path)
        self._lock = threading.Lock()
        self._closed = False
        # Updates stored per profile since its history was last pruned (see _prune_updates).
        self._unpruned: dict[tuple[str, str], int] = {}
        self._received_since_prune = 0
        self._rejected_since_prune = 0
        db = sqlite3.connect(
            self.db_path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA cache_size=-16000")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        self._db = db

    @property
    def closed(self) -> bool:
        return self._closed

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        if self._closed:
            raise RuntimeError("this sink is stopped")
        return super()._query(sql, params)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    # -- writing

    def write(
        self,
        endpoint: str,
        accepted: Sequence[tuple[str, JSONDict]],
        rejected: Sequence[tuple[Any, str]],
        now: float,
    ) -> None:
        """Store one request in one transaction.

        ``accepted`` holds (operation, message) pairs (the operation is ``""``
        outside ``/groups``); ``rejected`` holds (message, reason) pairs.
        Raises RuntimeError once the store is closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the sink is stopping")
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if endpoint == "groups" and accepted:
                    self._apply_groups(db, accepted, now)
                if accepted:
                    self._store_received(db, endpoint, accepted, now)
                if rejected:
                    self._store_rejected(
                        db, [(endpoint, _dumps(m), why, now) for m, why in rejected]
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def reject_request(self, endpoint: str, data: str, reason: str, now: float) -> None:
        """Record a request refused whole (``data`` is the data as sent, clipped)."""
        with self._lock:
            if self._closed:
                return
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                self._store_rejected(db, [(endpoint, _dumps(data), reason, now)])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _load_profiles(
        self, db: sqlite3.Connection, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], list[Any]]:
        """[properties, created_at] of the profiles named, read in a few statements."""
        by_group_key: dict[str, list[str]] = {}
        for group_key, group_id in keys:
            by_group_key.setdefault(group_key, []).append(group_id)
        found: dict[tuple[str, str], list[Any]] = {}
        for group_key, ids in by_group_key.items():
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    "SELECT group_id, properties, created_at FROM profiles"
                    f" WHERE group_key=? AND group_id IN ({marks})",
                    (group_key, *chunk),
                )
                for group_id, props, created in rows:
                    found[(group_key, group_id)] = [_loads(props), created]
        return found

    def _apply_groups(
        self, db: sqlite3.Connection, accepted: Sequence[tuple[str, JSONDict]], now: float
    ) -> None:
        keys = []
        for _, message in accepted:
            group_id = message["$group_id"]
            if type(group_id) is not str:
                group_id = group_id_key(group_id)
            keys.append((message["$group_key"], group_id))
        state = self._load_profiles(db, set(keys))
        update_rows = []
        for (op, message), key in zip(accepted, keys):
            entry = state.get(key)
            if entry is None:
                entry = state[key] = [None, None]
            payload = message[op]
            new = apply_operation(entry[0], op, payload)
            if new is None:
                entry[1] = None
            elif entry[1] is None:
                entry[1] = now
            entry[0] = new
            when = message.get("$time")
            update_rows.append(
                (*key, op, _dumps(payload), None if when is None else float(when), now)
            )
        written, deleted = [], []
        for key, (props, created) in state.items():
            if props is None:
                deleted.append(key)
            else:
                written.append((*key, _dumps(props), created, now))
        if deleted:
            db.executemany("DELETE FROM profiles WHERE group_key=? AND group_id=?", deleted)
        if written:
            db.executemany("INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, ?, ?)", written)
        db.executemany(
            "INSERT INTO updates (group_key, group_id, op, payload, time, received_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            update_rows,
        )
        self._prune_updates(db, keys)

    def _prune_updates(self, db: sqlite3.Connection, keys: list[tuple[str, str]]) -> None:
        """Keep about the last UPDATES_PER_PROFILE updates of each profile, pruning rarely.

        A profile's history is pruned once UPDATES_PER_PROFILE new updates have
        arrived since its last pruning, so it never holds more than twice that;
        reads take only the newest UPDATES_PER_PROFILE. Past _TRACKED_PROFILES
        tracked profiles, all of them are pruned and forgotten, bounding memory.
        """
        unpruned = self._unpruned
        due = []
        for key in keys:
            count = unpruned.get(key, 0) + 1
            if count >= UPDATES_PER_PROFILE:
                due.append(key)
                count = 0
            unpruned[key] = count
        if len(unpruned) > _TRACKED_PROFILES:
            due.extend(key for key, count in unpruned.items() if count)
            unpruned.clear()
        if due:
            db.executemany(
                "DELETE FROM updates WHERE group_key=? AND group_id=? AND id <= ("
                " SELECT id FROM updates WHERE group_key=? AND group_id=?"
                f" ORDER BY id DESC LIMIT 1 OFFSET {UPDATES_PER_PROFILE})",
                [(*key, *key) for key in dict.fromkeys(due)],
            )

    def _store_received(
        self,
        db: sqlite3.Connection,
        endpoint: str,
        accepted: Sequence[tuple[str, JSONDict]],
        now: float,
    ) -> None:
        db.executemany(
            "INSERT INTO received (endpoint, message, received_at) VALUES (?, ?, ?)",
            [(endpoint, _dumps(m), now) for _, m in accepted],
        )
        self._received_since_prune += len(accepted)
        if self._received_since_prune >= RECEIVED_CAP // 4:
            self._received_since_prune = 0
            for (name,) in db.execute("SELECT DISTINCT endpoint FROM received").fetchall():
                db.execute(
                    "DELETE FROM received WHERE endpoint=? AND id <= (SELECT id FROM received"
                    f" WHERE endpoint=? ORDER BY id DESC LIMIT 1 OFFSET {RECEIVED_CAP})",
                    (name, name),
                )

    def _store_rejected(
        self, db: sqlite3.Connection, rows: list[tuple[str, str, str, float]]
    ) -> None:
        db.executemany(
            "INSERT INTO rejected (endpoint, message, reason, received_at) VALUES (?, ?, ?, ?)",
            rows,
        )
        self._rejected_since_prune += len(rows)
        if self._rejected_since_prune >= REJECTED_CAP // 4:
            self._rejected_since_prune = 0
            db.execute(
                "DELETE FROM rejected WHERE id <= (SELECT id FROM rejected"
                f" ORDER BY id DESC LIMIT 1 OFFSET {REJECTED_CAP})"
            )

    def clear(self) -> None:
        """Delete every profile, update, received and rejected message."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this sink is stopped")
            self._db.execute("BEGIN IMMEDIATE")
            for table in ("profiles", "updates", "received", "rejected"):
                self._db.execute(f"DELETE FROM {table}")
            self._db.execute("COMMIT")
            self._unpruned.clear()
