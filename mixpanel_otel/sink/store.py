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
from typing import Any, Callable, Optional, Union

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
#: Most values bound in one statement (SQLite's old default limit is 999).
_CHUNK = 900

_SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    group_key TEXT NOT NULL,
    group_id TEXT NOT NULL,
    properties TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    history TEXT,
    PRIMARY KEY (group_key, group_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deleted_history (
    group_key TEXT NOT NULL,
    group_id TEXT NOT NULL,
    history TEXT NOT NULL,
    PRIMARY KEY (group_key, group_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    endpoint TEXT NOT NULL,
    messages TEXT NOT NULL,
    count INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_endpoint ON batches (endpoint, id);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY,
    endpoint TEXT NOT NULL,
    message TEXT NOT NULL,
    reason TEXT NOT NULL,
    received_at REAL NOT NULL
);
"""
# Tables of databases written by earlier versions, read and then emptied: ``updates``
# (one row an update, moved into ``history`` when the database is opened) and
# ``received`` (one row a message).
_LEGACY = ("updates", "received")


def _compact_encoder() -> Callable[[Any], str]:
    """``json.dumps`` with compact separators, minus its per-call set-up.

    Values stored here come from JSON, so they hold no cycles and no
    non-JSON types; the C encoder is made once and reused. Falls back to the
    public API when this Python's encoder differs.
    """
    public = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return public

    def refuse(value: Any) -> Any:
        raise TypeError(f"{type(value).__name__} is not JSON")

    try:
        encode = make(
            None, refuse, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
        )

        def dumps(value: Any) -> str:
            return "".join(encode(value, 0))

        sample = {"a": [1, 2.5, True, None, "é\n"], "b": {"c": -0.0}}
        if dumps(sample) == public(sample):
            return dumps
    except Exception:  # pragma: no cover - another Python's private encoder
        pass
    return public  # pragma: no cover


_dumps = _compact_encoder()
_loads = json.loads

#: Between two entries of a ``history`` array. Compact JSON has no raw newline
#: (strings escape it), so the entries can be counted, cut and appended as text:
#: a profile touched again costs a split and a join, not a parse and a dump of
#: its last 50 updates.
_ENTRY_BREAK = ",\n"
#: ``PRAGMA user_version`` of the current layout (2: histories use _ENTRY_BREAK).
_LAYOUT_VERSION = 2


def _history_entries(text: Optional[str]) -> list[str]:
    """The JSON texts of a ``history`` array's entries, oldest first."""
    if not text or text == "[]":
        return []
    return text[1:-1].split(_ENTRY_BREAK)


def _history_text(entries: list[str]) -> str:
    """A ``history`` array of the last UPDATES_PER_PROFILE entries (valid JSON)."""
    if len(entries) > UPDATES_PER_PROFILE:
        del entries[:-UPDATES_PER_PROFILE]
    return "[" + _ENTRY_BREAK.join(entries) + "]"


def _endpoint_name(endpoint: str) -> str:
    name = endpoint.strip("/")
    if name not in ENDPOINTS.values():
        raise ValueError(
            f"unknown endpoint {endpoint!r}; expected one of " + ", ".join(ENDPOINTS.values())
        )
    return name


def _profile_filter(group_key: Optional[str], id_contains: Optional[str]) -> tuple[str, list[str]]:
    """The ``WHERE`` clause (or "") and its parameters for a profile listing."""
    where, params = [], []
    if group_key:
        where.append("group_key = ?")
        params.append(group_key)
    if id_contains:
        where.append("group_id LIKE ? ESCAPE '\\'")
        params.append(_like(id_contains))
    return (" WHERE " + " AND ".join(where) if where else ""), params


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
        offset: int = 0,
    ) -> list[JSONDict]:
        """Profiles with ``created_at``/``updated_at``; by (group_key, group_id) or newest
        first; ``limit`` rows after skipping ``offset`` (a page)."""
        where, params = _profile_filter(group_key, id_contains)
        sql = "SELECT group_key, group_id, properties, created_at, updated_at FROM profiles" + where
        sql += " ORDER BY " + (
            "updated_at DESC, group_key, group_id" if recent_first else "group_key, group_id"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)} OFFSET {max(0, int(offset))}"
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

    def count_profiles(
        self, group_key: Optional[str] = None, id_contains: Optional[str] = None
    ) -> int:
        """How many profiles :meth:`search_profiles` finds with this filter."""
        where, params = _profile_filter(group_key, id_contains)
        return int(self._query("SELECT COUNT(*) FROM profiles" + where, params)[0][0])

    def profiles(
        self, group_key: Optional[str] = None, id_contains: Optional[str] = None
    ) -> list[JSONDict]:
        """``group_key``, ``group_id``, ``properties`` of every profile, sorted by the first two."""
        where, params = _profile_filter(group_key, id_contains)
        sql = "SELECT group_key, group_id, properties FROM profiles" + where
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
        """The last updates of one profile, oldest first: op, payload, time, received_at.

        A deleted profile keeps its updates (the ``$delete`` last).
        """
        key = (group_key, group_id_key(group_id))
        rows = self._query(
            "SELECT history FROM profiles WHERE group_key=? AND group_id=?"
            " UNION ALL SELECT history FROM deleted_history WHERE group_key=? AND group_id=?",
            (*key, *key),
        )
        entries = _loads(rows[0][0]) if rows and rows[0][0] else []
        return [{"op": op, "payload": p, "time": t, "received_at": r} for op, p, t, r in entries]

    def received(self, endpoint: str) -> list[Any]:
        """Valid messages stored for ``"engage"``, ``"track"``, ``"import"`` (or ``"groups"``)."""
        rows = self._query(
            "SELECT messages FROM batches WHERE endpoint=? ORDER BY id", (_endpoint_name(endpoint),)
        )
        messages: list[Any] = []
        for (text,) in rows:
            messages.extend(_loads(text))
        return messages

    def recent_messages(self, endpoint: str, limit: int = 200) -> list[JSONDict]:
        """The newest valid messages of one endpoint, newest first: message, received_at."""
        rows = self._query(
            "SELECT messages, received_at FROM batches WHERE endpoint=? ORDER BY id DESC LIMIT ?",
            (_endpoint_name(endpoint), int(limit)),
        )
        recent: list[JSONDict] = []
        for text, received_at in rows:
            for message in reversed(_loads(text)):
                if len(recent) >= limit:
                    return recent
                recent.append({"message": message, "received_at": received_at})
        return recent

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
            "SELECT endpoint, SUM(count) FROM batches GROUP BY endpoint"
            " UNION ALL SELECT 'profiles', COUNT(*) FROM profiles"
            " UNION ALL SELECT 'rejected', COUNT(*) FROM rejected"
        )
        for name, n in rows:
            counts[name] = counts.get(name, 0) + n
        return counts


def read_profiles(
    db_path: Union[str, os.PathLike[str]], group_key: Optional[str] = None
) -> list[JSONDict]:
    """The profiles a sink database holds, as :meth:`Sink.profiles` gives them, without serving."""
    return Reader(db_path, readonly=True).profiles(group_key)


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a database written by an earlier version to this layout, once."""
    if db.execute("PRAGMA user_version").fetchone()[0] >= _LAYOUT_VERSION:
        return
    columns = {row[1] for row in db.execute("PRAGMA table_info(profiles)")}
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    db.execute("BEGIN IMMEDIATE")
    try:
        if "history" not in columns:
            db.execute("ALTER TABLE profiles ADD COLUMN history TEXT")
        for table in ("profiles", "deleted_history"):  # one JSON array text, no entry breaks
            rows = db.execute(
                f"SELECT history, group_key, group_id FROM {table} WHERE history IS NOT NULL"
            ).fetchall()
            db.executemany(
                f"UPDATE {table} SET history=? WHERE group_key=? AND group_id=?",
                [(_history_text([_dumps(e) for e in _loads(h)]), k, i) for h, k, i in rows],
            )
        if "updates" in tables:
            histories: dict[tuple[str, str], list[str]] = {}
            for group_key, group_id, op, payload, t, r in db.execute(
                "SELECT group_key, group_id, op, payload, time, received_at FROM updates"
                " ORDER BY id"
            ):
                entry = _dumps([op, _loads(payload), t, r])
                histories.setdefault((group_key, group_id), []).append(entry)
            rows = [(_history_text(h), *key) for key, h in histories.items()]
            db.executemany("UPDATE profiles SET history=? WHERE group_key=? AND group_id=?", rows)
            existing = set(db.execute("SELECT group_key, group_id FROM profiles"))
            db.executemany(
                "INSERT OR REPLACE INTO deleted_history VALUES (?, ?, ?)",
                [(g, i, h) for h, g, i in rows if (g, i) not in existing],
            )
            db.execute("DROP TABLE updates")
        if "received" in tables:
            for endpoint, texts, last in db.execute(
                "SELECT endpoint, json_group_array(json(message)), MAX(received_at)"
                " FROM (SELECT * FROM received ORDER BY id) GROUP BY endpoint"
            ).fetchall():
                count = len(_loads(texts))
                db.execute(
                    "INSERT INTO batches (endpoint, messages, count, received_at)"
                    " VALUES (?, ?, ?, ?)",
                    (endpoint, texts, count, last),
                )
            db.execute("DROP TABLE received")
        db.execute(f"PRAGMA user_version={_LAYOUT_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class Store(Reader):
    """The sink's database: one writer connection, serialised by a lock; readers beside it."""

    def __init__(self, db_path: Union[str, os.PathLike[str]]) -> None:
        super().__init__(db_path)
        self._lock = threading.Lock()
        self._closed = False
        self._received_since_prune = 0
        self._rejected_since_prune = 0
        self._any_deleted = True  # whether deleted_history may hold rows (read below)
        db = sqlite3.connect(
            self.db_path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute("PRAGMA page_size=16384")  # new databases only; fewer pages a commit
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA cache_size=-16000")
            db.executescript(_SCHEMA)
            _migrate(db)
            found = db.execute("SELECT 1 FROM deleted_history LIMIT 1").fetchone()
            self._any_deleted = found is not None
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
        array_text: Optional[str] = None,
    ) -> None:
        """Store one request in one transaction.

        ``accepted`` holds (operation, message) pairs (the operation is ``""``
        outside ``/groups``); ``rejected`` holds (message, reason) pairs.
        ``array_text``, the messages as the JSON array text they were read
        from, is stored as it is when every message was accepted.
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
                    if rejected or array_text is None:
                        array_text = _dumps([message for _, message in accepted])
                    self._store_received(db, endpoint, array_text, len(accepted), now)
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
        """[properties, created_at, history entry texts] of the profiles named, in a few statements.

        A profile that does not exist has properties None, and the history it
        had before it was deleted, if any.
        """
        by_group_key: dict[str, list[str]] = {}
        for group_key, group_id in keys:
            by_group_key.setdefault(group_key, []).append(group_id)
        found: dict[tuple[str, str], list[Any]] = {}
        for group_key, ids in by_group_key.items():
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = (
                    "SELECT group_id, properties, created_at, history FROM profiles"
                    f" WHERE group_key=? AND group_id IN ({marks})"
                )
                params = (group_key, *chunk)
                if self._any_deleted:
                    sql += (
                        " UNION ALL SELECT group_id, NULL, NULL, history FROM deleted_history"
                        f" WHERE group_key=? AND group_id IN ({marks})"
                    )
                    params += params
                rows = db.execute(sql, params)
                for group_id, props, created, history in rows:
                    found[(group_key, group_id)] = [
                        None if props is None else _loads(props),
                        created,
                        _history_entries(history),
                    ]
        return found

    def _apply_groups(
        self, db: sqlite3.Connection, accepted: Sequence[tuple[str, JSONDict]], now: float
    ) -> None:
        """Apply ``/groups`` messages in order; write each profile touched once."""
        keys = []
        for _, message in accepted:
            group_id = message["$group_id"]
            if type(group_id) is not str:
                group_id = group_id_key(group_id)
            keys.append((message["$group_key"], group_id))
        state = self._load_profiles(db, set(keys))
        restored = [key for key, entry in state.items() if entry[0] is None]
        apply = apply_operation
        for (op, message), key in zip(accepted, keys):
            entry = state.get(key)
            if entry is None:
                entry = state[key] = [None, None, []]
            payload = message[op]
            new = entry[0] = apply(entry[0], op, payload)
            if new is None:
                entry[1] = None
            elif entry[1] is None:
                entry[1] = now
            when = message.get("$time")
            if when is not None and type(when) is not float:
                when = float(when)
            entry[2].append(_dumps([op, payload, when, now]))
        written, deleted = [], []
        for key, (props, created, history) in state.items():
            if props is None:
                deleted.append((*key, _history_text(history)))
            else:
                written.append((*key, _dumps(props), created, now, _history_text(history)))
        if restored:  # deleted profiles touched again: their history moves back or is rewritten
            db.executemany("DELETE FROM deleted_history WHERE group_key=? AND group_id=?", restored)
        if deleted:
            db.executemany(
                "DELETE FROM profiles WHERE group_key=? AND group_id=?",
                [row[:2] for row in deleted],
            )
            db.executemany("INSERT OR REPLACE INTO deleted_history VALUES (?, ?, ?)", deleted)
            self._any_deleted = True
        if written:
            db.executemany(
                "INSERT OR REPLACE INTO profiles"
                " (group_key, group_id, properties, created_at, updated_at, history)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                written,
            )

    def _store_received(
        self, db: sqlite3.Connection, endpoint: str, array_text: str, count: int, now: float
    ) -> None:
        db.execute(
            "INSERT INTO batches (endpoint, messages, count, received_at) VALUES (?, ?, ?, ?)",
            (endpoint, array_text, count, now),
        )
        self._received_since_prune += count
        if self._received_since_prune >= RECEIVED_CAP // 4:
            self._received_since_prune = 0
            self._prune_received(db)

    def _prune_received(self, db: sqlite3.Connection) -> None:
        """Drop the batches older than each endpoint's newest RECEIVED_CAP messages."""
        for (name,) in db.execute("SELECT DISTINCT endpoint FROM batches").fetchall():
            db.execute(
                "DELETE FROM batches WHERE endpoint=? AND id < (SELECT id FROM ("
                " SELECT id, SUM(count) OVER (ORDER BY id DESC) AS newer FROM batches"
                " WHERE endpoint=?) WHERE newer >= ? LIMIT 1)",
                (name, name, RECEIVED_CAP),
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
            for table in ("profiles", "deleted_history", "batches", "rejected"):
                self._db.execute(f"DELETE FROM {table}")
            self._db.execute("COMMIT")
