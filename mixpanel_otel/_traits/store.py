"""Trait state on disk: one SQLite file, a row per group, so a restart keeps its windows.

The file lives in ``trait_state_dir`` (or ``spool_dir``), one per Mixpanel
project and host (``traits-<hash>.sqlite3``). Rows are JSON; sketches are
stored in their own serialized form. One process writes a file: a forked
child does not (it warns instead, see :mod:`.runtime`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading

from .engine import TraitEngine

__all__ = ["TraitStore"]


class TraitStore:
    """Loads an engine's groups at start; saves the ones that changed since the last save."""

    def __init__(self, directory: str, scope: str) -> None:
        os.makedirs(directory, exist_ok=True)
        name = hashlib.sha256(scope.encode()).hexdigest()[:16]
        self.path = os.path.join(directory, f"traits-{name}.sqlite3")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS groups ("
            " group_key TEXT NOT NULL, group_id TEXT NOT NULL, state TEXT NOT NULL,"
            " PRIMARY KEY (group_key, group_id))"
        )

    def load(self, engine: TraitEngine) -> int:
        """Restore every stored group into ``engine``; how many. From now on the
        engine notes which groups change, for :meth:`save`."""
        engine.track_changes = True
        with self._lock:
            rows = self._db.execute("SELECT group_key, group_id, state FROM groups").fetchall()
        for group_key, group_id, state in rows:
            engine.import_group((group_key, group_id), json.loads(state))
        engine.changed.clear()
        engine.forgotten.clear()
        return len(rows)

    def save(self, engine: TraitEngine) -> None:
        """Write the groups that changed, delete the ones the engine forgot."""
        with self._lock:
            changed, engine.changed = engine.changed, set()
            forgotten, engine.forgotten = engine.forgotten, set()
            rows = engine.export_groups(changed)
            if not rows and not forgotten:
                return
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "DELETE FROM groups WHERE group_key = ? AND group_id = ?", list(forgotten)
                )
                self._db.executemany(
                    "INSERT OR REPLACE INTO groups VALUES (?, ?, ?)",
                    [(key[0], key[1], json.dumps(data)) for key, data in rows],
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()
