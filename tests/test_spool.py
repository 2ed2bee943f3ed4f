"""The spool against the local sink: order after an outage, a small disk, foreign files.

Issue 28 items 9 and 10. The interleavings are forced with a timing hook on
the consumer's ledger, not hoped for under load.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time

import pytest

from mixpanel_otel import GroupClient
from mixpanel_otel._delivery.jobs import Kind
from mixpanel_otel._delivery.spool import Spool

from .conftest import TOKEN
from .helpers import run, spooled_rows

WAIT = 30.0  # generous bound for a step another thread takes


def wire(group_id: str, **properties: object) -> str:
    message = {"$token": TOKEN, "$time": time.time(), "$group_key": "company"}
    message.update({"$group_id": group_id, "$set": properties})
    return json.dumps(message)


def leave_orphan(directory: str, base_url: str, texts: list[str]) -> None:
    """A spool file left by a process that is gone."""
    spool = Spool(directory, TOKEN, base_url)
    assert spool.append(texts)
    spool.close()


class PausedReplay:
    """Holds a replay job just before it hands its result to the ledger (after it
    read the spool) until released; tells when a spill job has finished."""

    def __init__(self, ledger) -> None:
        self.replay_waiting = threading.Event()
        self.release = threading.Event()
        self.spill_done = threading.Event()
        self._finish, self._finish_spill = ledger.finish, ledger.finish_spill
        self._held = False
        ledger.finish, ledger.finish_spill = self.finish, self.finish_spill

    def finish(self, job, *args):
        if job.kind is Kind.REPLAY and not self._held:
            self._held = True
            self.replay_waiting.set()
            assert self.release.wait(WAIT)
        return self._finish(job, *args)

    def finish_spill(self, job, *args):
        lost = self._finish_spill(job, *args)
        self.spill_done.set()
        return lost


def test_a_spill_while_a_replay_is_in_flight_keeps_each_groups_order(sink, tmp_path, make_consumer):
    """Item 9: the replay read the spool (empty) before a spill wrote to it and
    finishes after the spill; the older spooled ``$set`` must still go first."""
    spool_dir = str(tmp_path / "spool")
    consumer = make_consumer(sink, spool_dir=spool_dir, max_pending=2, max_block=0)
    client = GroupClient(consumer=consumer)
    hook = PausedReplay(consumer.parts.ledger)
    leave_orphan(spool_dir, sink.url, [wire("g", v=1)])
    flushing = threading.Thread(target=consumer.flush, args=(WAIT,))
    flushing.start()
    try:
        assert hook.replay_waiting.wait(WAIT)
        # No room while the replay is out: this overflows to a spill job.
        client.group_set("company", "g", {"v": 2})
        for i in range(4):
            client.group_set("company", f"other{i}", {"v": 2})
        assert hook.spill_done.wait(WAIT)
        client.group_set("company", "g", {"v": 3})  # in memory, newer than the spool
    finally:
        hook.release.set()
        flushing.join(WAIT)
    assert consumer.flush(WAIT)
    sent = [update["payload"]["v"] for update in sink.updates("company", "g")]
    assert sent == [1, 2, 3]
    assert sink.profile("company", "g")["v"] == 3
    assert spooled_rows(spool_dir, TOKEN, sink.url) == 0
    assert consumer.stats()["spool_rows"] == 0


@pytest.mark.parametrize("spill_first", [True, False])
def test_ledger_keeps_the_latest_spool_reading(spill_first):
    """Item 9, the ledger alone: of two readings the later one wins, in either order."""
    from mixpanel_otel._delivery.ledger import Ledger
    from mixpanel_otel._delivery.spool import Reading
    from mixpanel_otel._delivery.stats import Stats

    ledger = Ledger(
        Stats(),
        batch_size=10,
        max_pending=10,
        max_pending_bytes=10**6,
        max_in_flight=2,
        flush_interval=1.0,
        clock=time.monotonic,
    )
    stale, fresh = Reading(1, 0), Reading(2, 5)
    for reading in (fresh, stale) if spill_first else (stale, fresh):
        ledger.note_spool(reading)
    assert ledger.snapshot()["spool_rows"] == 5


# -- item 10: a small spool disk, foreign files ------------------------------------------

SMALL_DISK = """
import json, resource, signal
from mixpanel_otel._delivery.consumer import Consumer

limit = int(os.environ["LIMIT"])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
spool_dir = os.environ["SPOOL"]
consumer = Consumer(os.environ["MIXPANEL_TOKEN"], os.environ["MIXPANEL_API_HOST"],
                    threads=False, spool_dir=spool_dir, max_pending=100, max_block=0,
                    flush_interval=60, backoff_base=0.05, backoff_max=0.1, shutdown_timeout=0.5)
client = GroupClient(consumer=consumer)
for i in range(int(os.environ["COUNT"])):  # overflow waits for one spill job: all of it
    client.group_set("company", f"disk{i}", {"note": "x" * 100, "i": i})
consumer.flush(1.0)  # runs the spill job from this thread, then fails to deliver
wal = [os.path.getsize(os.path.join(spool_dir, name))
       for name in os.listdir(spool_dir) if name.endswith("-wal")]
print(json.dumps({"stats": consumer.stats(), "wal": wal}), flush=True)
consumer.shutdown(0.5)
"""


def test_a_small_disk_keeps_what_fits_and_gives_the_rest_of_the_space_back(sink, tmp_path):
    """Item 10: one spill of 8,400 updates onto a disk too small for all of them keeps
    the chunks that fit (not nothing), and the failed write leaves no WAL behind."""
    spool_dir = str(tmp_path / "spool")
    count, limit = 8400, 1024 * 1024  # ~1.5 MB of rows; each file may hold 1 MB
    sink.down = True
    try:
        code, out, err = run(
            SMALL_DISK,
            sink.url,
            str(tmp_path),
            "small",
            SPOOL=spool_dir,
            LIMIT=limit,
            COUNT=count,
        )
    finally:
        sink.down = False
    assert code == 0, err
    report = json.loads(out.splitlines()[-1])
    stats = report["stats"]
    assert "could not keep" in err, err
    assert report["wal"] and max(report["wal"]) < 64 * 1024, report  # not ~1 MB until exit
    assert 1000 <= stats["spooled"] < count, stats
    rows = spooled_rows(spool_dir, TOKEN, sink.url)
    assert rows >= stats["spooled"], (rows, stats)
    # Every update is accounted for: kept on disk or reported lost (at the spill, or
    # at exit for those memory took back), none twice.
    lost_at_exit = sum(int(n) for n in re.findall(r"(\d+) lost", err))
    assert rows + stats["dropped"] + lost_at_exit == count, (rows, lost_at_exit, stats)
    replayed = run(
        "client, consumer = make(spool_dir=os.environ['SPOOL']); consumer.flush(30)",
        sink.url,
        str(tmp_path),
        "replay",
        SPOOL=spool_dir,
    )
    assert replayed[0] == 0, replayed[2]
    assert sink.counters["messages"] >= rows and spooled_rows(spool_dir, TOKEN, sink.url) == 0


def test_a_write_whose_commit_fails_is_rolled_back_and_the_next_write_works(tmp_path):
    """A COMMIT that fails leaves SQLite's transaction open: the spool rolls it back,
    or every later write would fail ("cannot start a transaction within a transaction")."""
    spool = Spool(str(tmp_path), TOKEN, "http://127.0.0.1:9")
    assert spool.append([wire("a")]) == 1
    other = sqlite3.connect(spool.path, isolation_level=None)
    other.executescript(
        """
        CREATE TABLE parent (id INTEGER PRIMARY KEY);
        CREATE TABLE child (id INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);
        CREATE TRIGGER orphan AFTER INSERT ON messages BEGIN INSERT INTO child VALUES (1); END;
        """
    )
    # Checked at COMMIT only (deferred): the insert succeeds, its COMMIT fails.
    spool._file.db.execute("PRAGMA foreign_keys = ON")
    assert spool.append([wire("b")]) == 0
    other.execute("DROP TRIGGER orphan")  # waits on a transaction left open, then fails
    other.close()
    assert spool.append([wire("c")]) == 1
    assert [json.loads(text)["$group_id"] for _, text in spool.peek(10)] == ["a", "c"]
    spool.close()


def test_every_foreign_file_is_moved_aside_and_no_lock_is_left(sink, tmp_path, make_consumer):
    """Item 10: a 0-byte file, a non-database and another schema under spool names are
    moved aside (never deleted), and no ``.lock`` stays beside them."""
    import sqlite3

    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    prefix = Spool(str(spool_dir), TOKEN, sink.url).prefix
    (spool_dir / f"{prefix}-1-empty.sqlite3").write_bytes(b"")
    (spool_dir / f"{prefix}-2-text.sqlite3").write_bytes(b"not a database at all")
    other = sqlite3.connect(f"{prefix}-3-other.sqlite3")
    other.execute("CREATE TABLE notes (body TEXT)")
    other.execute("INSERT INTO notes VALUES ('keep me')")
    other.commit()
    other.close()
    leave_orphan(str(spool_dir), sink.url, [wire("adopted", v=1)])
    consumer = make_consumer(sink, spool_dir=str(spool_dir))
    assert consumer.flush(WAIT)
    names = sorted(os.listdir(spool_dir))
    aside = [name for name in names if ".corrupt-" in name or ".empty-" in name]
    assert len([n for n in aside if n.endswith(tuple("0123456789"))]) == 3, names
    assert not [
        n
        for n in names
        if n.endswith(".lock")
        and n[: -len(".lock")]
        not in {own[: -len(".sqlite3")] for own in names if own.endswith(".sqlite3")}
    ], names
    assert sink.profile("company", "adopted") == {"v": 1}
    kept = [n for n in aside if "-3-other" in n and n.endswith(tuple("0123456789"))]
    check = sqlite3.connect(str(spool_dir / kept[0]))
    assert check.execute("SELECT body FROM notes").fetchall() == [("keep me",)]
    check.close()
