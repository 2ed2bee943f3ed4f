"""The durable spool: wire messages kept on disk until Mixpanel acknowledged them.

Each live process owns one SQLite file in ``spool_dir`` (per token and API
host), held with an advisory lock (``flock``) on a sibling ``.lock`` file
for the life of the process. A process *adopts* the files of processes that
are gone (their lock is free): their rows move, whole and in order, to the
end of its own file, and the old files are removed. So no two live
processes ever send the same rows, and no "database is locked" can cost a
row.

Rows are read with :meth:`Spool.peek` and deleted with :meth:`Spool.ack`
only after Mixpanel acknowledged the batch that carried them: a process
killed mid-flight leaves them to be sent again (group operations are
idempotent). Never raises; a corrupt file, or one of another format, is
moved aside and reported, never deleted.

Hygiene: the directory is created 0700 and the files 0600; rows hold no
``$token`` (it is stripped on write and put back on read). A full disk
degrades to memory: the write fails at once, one throttled error says so,
and the caller counts what was not kept. Rows acknowledged while they
cannot be deleted (SQLite needs space to delete) are remembered and
skipped, and deleted once space returns: never sent twice. An open that
fails releases what it took and is not tried again for a while.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Callable, NamedTuple, Optional

from .stats import Throttle, logger

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no adoption across processes
    fcntl = None  # type: ignore[assignment]

__all__ = ["Reading", "Spool", "SpoolFile"]

_BUSY_TIMEOUT = 5.0  # seconds SQLite waits for another connection's transaction
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,  -- send order; rows put in front get lower numbers
    body TEXT NOT NULL       -- one wire message, JSON
);
CREATE TABLE IF NOT EXISTS adopted (
    name TEXT PRIMARY KEY    -- a file whose rows are in this one (see Spool.adopt)
);
"""
_ERRORS_EVERY = 60.0  # seconds between two spool errors in the log
_REOPEN_AFTER = 5.0  # seconds before an open that failed is tried again
_CHUNK = 500  # rows a transaction: a small disk keeps what fits, not nothing
#: Files of processes that forked away or were inherited: never closed here,
#: since closing a SQLite connection in a forked child can remove the
#: parent's WAL file under it.
_INHERITED: list[Any] = []


class Reading(NamedTuple):
    """Rows in this process's file, and the order of the reading: every change is made
    under the spool's lock, so a later reading (higher ``order``) saw all an earlier one saw."""

    order: int
    rows: int


class Spool:
    """This process's spool for one (token, API host) in ``directory``: its own file
    (created and locked on first use), adoption of gone processes' files; thread-safe."""

    def __init__(self, directory: str, token: str, base_url: str) -> None:
        digest = hashlib.sha256(f"{token}\n{base_url}".encode()).hexdigest()[:16]
        self.directory = directory
        self.prefix = os.path.join(directory, f"mixpanel-otel-{digest}")
        #: Held by every change; re-entrant, so a writer that encodes its rows holds it
        #: around encoding and :meth:`append` both, and two writers keep their order.
        self.lock = threading.RLock()
        self._file: Optional[SpoolFile] = None
        self._lock_fd: Optional[int] = None
        self.path = ""  # this process's file, once it has one
        self._token_field = '{"$token":' + json.dumps(token) + ","
        # Every error is logged under self.lock: the throttle needs no lock of its own.
        self._errors = Throttle(_ERRORS_EVERY, lock=contextlib.nullcontext())
        self._retry_open_at = 0.0
        self._readings = 0

    def reading(self) -> Reading:
        """The rows now, ordered against every other reading: a reader that keeps only
        the latest never stores a count older than one it already has."""
        with self.lock:
            self._readings += 1
            return Reading(self._readings, self._file.rows if self._file is not None else 0)

    def _error(self, text: str, *args: Any) -> None:
        allowed, suppressed = self._errors.allow()
        if allowed:
            more = f" ({suppressed} more spool error(s) since the last)" if suppressed else ""
            logger.error("mixpanel-otel: " + text + more, *args)

    # -- files ---------------------------------------------------------------------

    def _own(self) -> Optional[SpoolFile]:
        """This process's file, created (and locked) on first use."""
        if self._file is not None or time.monotonic() < self._retry_open_at:
            return self._file
        fd: Optional[int] = None
        stem = f"{self.prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = _take_lock(stem + ".lock")
            os.close(os.open(stem + ".sqlite3", os.O_RDWR | os.O_CREAT, 0o600))
            self._file = SpoolFile(stem + ".sqlite3", self._error)
        except (OSError, sqlite3.Error) as exc:
            if fd is not None:  # release what this attempt took
                os.close(fd)
            for suffix in (".sqlite3", ".sqlite3-wal", ".sqlite3-shm", ".lock"):
                _remove(stem + suffix)
            self._retry_open_at = time.monotonic() + _REOPEN_AFTER
            self._error("spool in %s is unusable: %s", self.directory, exc)
            return None
        self._lock_fd = fd
        self.path = stem + ".sqlite3"
        return self._file

    def _strip(self, text: str) -> str:
        """A message as stored: without its ``$token``."""
        field = self._token_field
        return "{" + text[len(field) :] if text.startswith(field) else text

    def _unstrip(self, body: str) -> str:
        """A stored row as sent: with the ``$token`` put back (rows of older versions kept it)."""
        if not body.startswith("{") or body.startswith('{"$token":'):
            return body
        rest = body[1:]
        return self._token_field + rest if rest != "}" else self._token_field[:-1] + "}"

    def orphans(self) -> list[str]:
        """Spool files of this (token, host) but this process's, oldest first
        (their owners may be alive: :meth:`adopt` takes only the unlocked ones)."""
        paths = glob.glob(glob.escape(self.prefix) + "*.sqlite3")
        return sorted((path for path in paths if path != self.path), key=_mtime)

    def adopt(self) -> int:
        """Move the rows of every orphaned file into this process's; return how many.

        The rows and the orphan's name go in one transaction, and the orphan is
        removed after it: a process killed in between leaves a file whose name
        another file lists, and that file is removed, not adopted twice.
        """
        with self.lock:
            taken = []
            for path in self.orphans():
                try:
                    taken.append((path, _take_lock(_lock_path(path))))
                except OSError:
                    continue  # its process is alive
            try:
                copied = self._adopted_names([path for path, _ in taken])
                return sum(self._adopt(path, copied) for path, _ in taken)
            finally:
                for path, fd in taken:
                    if not os.path.exists(path):
                        _remove(_lock_path(path))  # adopted: the lock is ours, not its owner's
                    os.close(fd)

    def _adopted_names(self, paths: list[str]) -> set[str]:
        """The files whose rows are already in one of ``paths`` or in this process's."""
        names: set[str] = set()
        for path in paths + ([self.path] if self.path else []):
            with contextlib.suppress(sqlite3.Error):
                names.update(_read_names(path))
        return names

    def _adopt(self, path: str, copied: set[str]) -> int:
        name = os.path.basename(path)
        try:
            if not os.path.exists(path):
                return 0
            if name in copied:  # its rows were copied; the copier died before removing it
                _remove_file(path)
                return 0
            try:
                rows, names = _read_rows(path)
            except sqlite3.DatabaseError as exc:
                _move_aside(path, exc)
                return 0
            own = self._own()
            if own is None:
                return 0
            own.insert(rows, adopted=[name, *names])
            _remove_file(path)
            return len(rows)
        except (OSError, sqlite3.Error) as exc:
            logger.error("mixpanel-otel: could not adopt spool %s: %s", path, exc)
            return 0

    # -- rows ----------------------------------------------------------------------

    def append(self, texts: Sequence[str], before: Sequence[str] = ()) -> int:
        """Write ``before`` in front of every row and ``texts`` after every row, in order,
        in chunks of :data:`_CHUNK` rows (a transaction each); how many were kept,
        ``before`` first. The first chunk that fails ends the write, so what fits is
        kept and nothing goes after rows it must precede. A busy file is waited for
        (SQLite's busy timeout); a full disk fails at once, and the pages of the
        failed write are given back.
        """
        if not texts and not before:
            return 0
        kept = 0
        with self.lock:
            own = self._own()
            if own is None:
                return 0
            try:
                start = own.front_start(len(before)) if before else None
                for part, first in ((before, start), (texts, None)):
                    for at in range(0, len(part), _CHUNK):
                        chunk = [self._strip(text) for text in part[at : at + _CHUNK]]
                        own.insert(chunk, None if first is None else first + at)
                        kept += len(chunk)
            except sqlite3.Error as exc:
                own.give_back_space()
                left = len(before) + len(texts) - kept
                text = "spool %s could not keep %d message(s) (%d kept): %s"
                self._error(text, self.path, left, kept, exc)
        return kept

    def peek(self, limit: int) -> list[tuple[int, str]]:
        """The oldest ``limit`` rows, ``(id, text)``, left in place until :meth:`ack`."""
        with self.lock:
            if self._file is None:
                return []
            return [(i, self._unstrip(body)) for i, body in self._file.peek(limit)]

    def ack(self, ids: list[int]) -> None:
        """Delete rows that were delivered (or refused for good)."""
        with self.lock:
            if ids and self._file is not None:
                self._file.ack(ids)

    def close(self) -> None:
        """Close the file; an empty one is removed, a full one stays for the next process."""
        with self.lock:
            own, self._file = self._file, None
            fd, self._lock_fd = self._lock_fd, None
            if own is not None and own.close():
                _remove(own.path[: -len(".sqlite3")] + ".lock")
            if fd is not None:
                os.close(fd)

    def forget_after_fork(self) -> None:
        """In a forked child: let go of the parent's file without touching it."""
        self.lock = threading.RLock()
        if self._file is not None:
            _INHERITED.append(self._file.db)  # never closed here: see _INHERITED
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # our copy only; the parent's lock stays
        self._file = None
        self._lock_fd = None
        self.path = ""


class SpoolFile:
    """One open spool file: rows in send order. Acknowledged rows are deleted, or,
    while the disk is too full to delete them, kept in memory and skipped. Callers
    hold the :class:`Spool`'s lock."""

    def __init__(self, path: str, error: Callable[..., None]) -> None:
        self.path = path
        self.db = _open(path)
        self.rows = 0  # rows in the file, as far as it knows
        self._acked: set[int] = set()  # delivered, not deleted yet (a full disk)
        self._error = error

    def front_start(self, count: int) -> int:
        """The first id of ``count`` rows that go before every row."""
        first = self.db.execute("SELECT min(id) FROM messages").fetchone()[0]
        return (first if first is not None else 1) - count

    def insert(
        self, texts: list[str], start: Optional[int] = None, adopted: Sequence[str] = ()
    ) -> None:
        """Write rows in one transaction, after every row or with ids from ``start``;
        ``adopted``: the names of the files they came from, noted in the same one."""
        if not texts and not adopted:
            return
        db = self.db
        with _transaction(db):
            db.executemany(
                "INSERT OR IGNORE INTO adopted (name) VALUES (?)", ((n,) for n in adopted)
            )
            if start is not None:
                db.executemany(
                    "INSERT INTO messages (id, body) VALUES (?, ?)",
                    ((start + i, text) for i, text in enumerate(texts)),
                )
            else:
                db.executemany("INSERT INTO messages (body) VALUES (?)", ((t,) for t in texts))
        self.rows += len(texts)

    def give_back_space(self) -> None:
        """After a failed write: empty the WAL, which holds the rolled-back pages and
        would keep a small disk full until exit."""
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def peek(self, limit: int) -> list[tuple[int, str]]:
        """The oldest ``limit`` rows not acknowledged, ``(id, body)``."""
        self.compact()
        acked = self._acked
        try:
            rows = self.db.execute(
                "SELECT id, body FROM messages ORDER BY id LIMIT ?", (limit + len(acked),)
            ).fetchall()
        except sqlite3.Error as exc:
            self._error("spool %s unreadable: %s", self.path, exc)
            return []
        rows = [row for row in rows if row[0] not in acked][:limit]
        if len(rows) < limit:
            self.rows = len(rows)
        return [(int(row[0]), str(row[1])) for row in rows]

    def ack(self, ids: list[int]) -> None:
        self._acked.update(ids)
        self.rows = max(0, self.rows - len(ids))
        self.compact()

    def compact(self) -> None:
        """Delete the rows acknowledged so far, unless the disk is too full to."""
        if not self._acked:
            return
        ids = sorted(self._acked)
        try:
            with _transaction(self.db):
                self.db.executemany("DELETE FROM messages WHERE id = ?", ((i,) for i in ids))
        except sqlite3.Error as exc:
            self._error("spool %s could not delete sent rows yet: %s", self.path, exc)
            return
        self._acked.difference_update(ids)

    def close(self) -> bool:
        """Close the file and remove it if empty; whether it was."""
        self.rows = 0
        try:
            self.compact()
            left = self.db.execute("SELECT count(*) FROM messages").fetchone()[0]
            empty = bool(left - len(self._acked) <= 0)
            self.db.close()
        except sqlite3.Error:
            empty = False
        if empty:
            for suffix in ("", "-wal", "-shm"):
                _remove(self.path + suffix)
        return empty


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT; a failure, the COMMIT's too, rolls back and raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def _read_rows(path: str) -> tuple[list[str], list[str]]:
    """The rows of another process's file, oldest first, and the files it adopted;
    a file that is not a spool (another schema) raises :class:`sqlite3.DatabaseError`."""
    source = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None)
    try:
        query = "SELECT name FROM sqlite_master WHERE type = 'table'"
        tables = [row[0] for row in source.execute(query)]
        if not tables:  # its process died before writing the schema, or not ours
            raise _Empty(path)
        columns = [row[1] for row in source.execute("PRAGMA table_info(messages)")]
        known = sorted(tables) in (["messages"], ["adopted", "messages"])  # older: messages
        if not known or columns != ["id", "body"]:
            raise sqlite3.DatabaseError(f"not a mixpanel-otel spool (tables {sorted(tables)})")
        rows = [str(row[0]) for row in source.execute("SELECT body FROM messages ORDER BY id")]
        adopted = source.execute("SELECT name FROM adopted") if "adopted" in tables else ()
        return rows, [str(row[0]) for row in adopted]
    finally:
        source.close()


def _read_names(path: str) -> list[str]:
    """The files ``path`` adopted (none for a file without the table)."""
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT)
    try:
        return [str(row[0]) for row in source.execute("SELECT name FROM adopted")]
    except sqlite3.OperationalError:  # no such table
        return []
    finally:
        source.close()


def _lock_path(path: str) -> str:
    return path[: -len(".sqlite3")] + ".lock"


def _remove_file(path: str) -> None:
    """A spool file with its WAL and shared memory."""
    for suffix in ("", "-wal", "-shm"):
        _remove(path + suffix)


def _take_lock(lock_path: str) -> int:
    """A descriptor holding ``lock_path``'s lock; :class:`OSError` when another
    process holds it (or it cannot be opened)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
    return fd


def _open(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # survives a killed process, which is the promise
        db.executescript(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


class _Empty(sqlite3.DatabaseError):
    """A file with no table: no rows, but never deleted (it may not be ours)."""


def _move_aside(path: str, exc: BaseException) -> None:
    empty = isinstance(exc, _Empty)  # most likely a process killed as it created its file
    aside = f"{path}.{'empty' if empty else 'corrupt'}-{int(time.time())}"
    for suffix in ("", "-wal", "-shm"):  # its WAL may hold its newest pages: kept with it
        with contextlib.suppress(OSError):
            os.replace(path + suffix, aside + suffix)
    if empty:
        logger.warning("mixpanel-otel: spool %s holds no table; set aside as %s", path, aside)
    else:
        text = "mixpanel-otel: spool %s is unreadable (%s); moved aside to %s"
        logger.error(text, path, exc, aside)
