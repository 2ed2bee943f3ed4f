"""Nothing lost at the edges (issue 20): overflow and failed spills reach ``on_error``,
a full disk, a foreign spool file, one exit budget, spool hygiene.

In-process tests use the shared consumer against the local sink; the full-disk
tests mount a small tmpfs (root only; skipped otherwise).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests

from mixpanel_otel import GroupClient
from mixpanel_otel._delivery.spool import Spool

from .conftest import TOKEN
from .helpers import Child, Plan, compare, spooled_rows, start_example

BLOB = {f"p{k}": "x" * 240 for k in range(8)}  # about 2 KB a message


def _client(make_consumer, sink, **options):
    consumer = make_consumer(sink, flush_interval=60, **options)
    return GroupClient(consumer=consumer), consumer


def _spool_errors(caplog, module: str = "spool") -> list[str]:
    """The spool's own error lines (``module=""``: every one that mentions the spool)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR
        and "spool" in r.getMessage()
        and (not module or r.module == module)
    ]


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs, as a real full filesystem (needs root to mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(directory, leave: int = 0) -> str:
    """Fill ``directory``'s filesystem, leaving about ``leave`` bytes; the filler's path."""
    path = os.path.join(directory, f"filler-{uuid.uuid4().hex[:6]}")
    with open(path, "wb") as f:
        try:
            while True:
                free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
                if free <= leave:
                    break
                f.write(b"\0" * min(4096, max(1, free - leave)))
                f.flush()
        except OSError:
            pass
    return path


# -- 3. every update that will not be delivered reaches on_error --------------------------


@pytest.mark.parametrize("spool", ["none", "unusable"])
def test_overflow_and_failed_spills_reach_on_error(sink, make_consumer, tmp_path, spool):
    reported: list[dict] = []
    options = {}
    if spool == "unusable":
        blocker = tmp_path / "file"
        blocker.write_text("a file where the spool directory should be")
        options["spool_dir"] = str(blocker / "spool")
    client, consumer = _client(
        make_consumer,
        sink,
        max_pending=20,
        max_block=0,
        shutdown_timeout=0.5,
        on_error=lambda exc, messages: reported.extend(messages),
        **options,
    )
    sink.down = True
    for i in range(200):
        client.group_set("company", f"g{i}", {"i": i})
    assert sink.wait_for(lambda: consumer.stats()["dropped"] > 0 or len(reported) > 0)
    consumer.shutdown(0.5)  # the server never came back: nothing of the 200 is delivered
    assert sink.wait_for(lambda: len(reported) >= 200, timeout=10), (
        len(reported),
        consumer.stats(),
    )
    assert len(reported) == 200, "each update reported once"
    assert sorted(m["$group_id"] for m in reported) == sorted(f"g{i}" for i in range(200))


# -- 4. a full disk ------------------------------------------------------------------------


def test_a_full_disk_never_costs_the_caller_spool_io(sink, make_consumer, small_disk):
    calls: list[str] = []
    original = Spool.append

    def spy(self, *args, **kwargs):  # records the thread, changes nothing
        calls.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    _fill(str(small_disk), leave=16 * 1024)
    Spool.append = spy  # type: ignore[method-assign]
    try:
        client, consumer = _client(
            make_consumer, sink, spool_dir=str(small_disk), max_pending=20, max_block=0
        )
        sink.down = True
        main = threading.current_thread().name
        for i in range(200):
            client.group_set("company", f"g{i}", BLOB)
        sink.down = False
        client.flush(10)
    finally:
        Spool.append = original  # type: ignore[method-assign]
    assert calls, "the spool was used"
    assert main not in calls, "spool I/O ran on the caller's thread"


def test_a_full_disk_degrades_to_memory_and_drains_without_a_resend_loop(
    sink, make_consumer, small_disk, caplog
):
    filler = str(small_disk / "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * 48 * 1024)  # removed later: space returns
    caplog.set_level(logging.ERROR, logger="mixpanel_otel")
    consumer = make_consumer(
        sink, spool_dir=str(small_disk / "spool"), max_pending=20, max_block=0, flush_interval=0.2
    )
    client = GroupClient(consumer=consumer)
    sink.down = True
    for i in range(30):
        client.group_set("company", f"g{i}", BLOB)
    assert sink.wait_for(lambda: consumer.stats()["spooled"] > 0), json.dumps(consumer.stats())
    for i in range(30, 300):  # more than the disk holds
        client.group_set("company", f"g{i}", BLOB)
    assert sink.wait_for(lambda: consumer.stats()["dropped"] > 0), consumer.stats()
    sink.down = False  # the server is back; the disk is still full
    client.flush(20)  # (its answer says whether updates were dropped meanwhile: they were)
    stats = consumer.stats()
    assert stats["pending"] == 0 and stats["spool_rows"] == 0, json.dumps(stats)
    received = [json.dumps(m, sort_keys=True) for m in sink.received("groups")]
    assert len(received) == len(set(received)), "a row sent twice: a resend loop"
    assert len(sink.profiles()) == 300 - consumer.stats()["dropped"]
    assert len(_spool_errors(caplog)) <= 2, _spool_errors(caplog)
    os.remove(filler)  # space returns: the acknowledged rows go, none is left for later
    client.group_set("company", "after", {"x": 1})
    assert consumer.shutdown(10)
    assert spooled_rows(str(small_disk / "spool"), TOKEN, sink.url) == 0
    received = [json.dumps(m, sort_keys=True) for m in sink.received("groups")]
    assert len(received) == len(set(received)), "a row sent twice after space returned"


# -- 5. a spool file of another format -----------------------------------------------------


def test_a_foreign_file_in_the_spool_is_moved_aside_never_deleted(
    sink, make_consumer, tmp_path, caplog
):
    spool = tmp_path / "spool"
    spool.mkdir()
    path = Spool(str(spool), TOKEN, sink.url).prefix + "-1-dead.sqlite3"  # a gone process's
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    other.execute("INSERT INTO notes (text) VALUES ('keep me')")
    other.commit()
    other.close()
    caplog.set_level(logging.ERROR, logger="mixpanel_otel")
    client, consumer = _client(make_consumer, sink, spool_dir=str(spool))
    client.group_set("company", "acme", {"plan": "pro"})
    assert client.flush(10)
    kept = [p for p in glob.glob(path + "*") if not p.endswith(("-wal", "-shm"))]
    assert kept, f"deleted: {os.listdir(spool)}"
    rows = sqlite3.connect(kept[0]).execute("SELECT text FROM notes").fetchall()
    assert rows == [("keep me",)]
    assert any(os.path.basename(path) in m for m in _spool_errors(caplog)), caplog.text
    assert sink.profile("company", "acme") == {"plan": "pro"}


# -- 6. exit: one budget, and the loss line counts updates ----------------------------------

_HANDLED_FIRST = """
import signal
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # the app's own, first
client, consumer = make(flush_interval=60, shutdown_timeout=3)
for i in range(50):
    client.group_set("company", f"g{i}", {"i": i})
mark("ready")
while True:
    time.sleep(0.05)
"""


@pytest.mark.slow
def test_sigterm_flush_and_exit_flush_share_one_shutdown_timeout(sink, tmp_path):
    sink.down = True
    child = Child(_HANDLED_FIRST, sink.url, str(tmp_path), "budget")
    try:
        assert child.wait_mark("ready"), child.stderr
        child.terminate()
        took = child.exit_seconds
        err = child.stderr
    finally:
        child.close()
        sink.down = False
    # One shutdown_timeout (3 s) for the whole exit, not one per flush (6 s).
    assert took < 4.8, (took, err)


@pytest.mark.slow
def test_the_exit_loss_line_counts_updates_not_merged_messages(sink, tmp_path):
    sink.down = True
    child = Child(
        """
        client, consumer = make(flush_interval=60, shutdown_timeout=0.5)
        for i in range(300):
            client.group_set("company", f"g{i % 3}", {f"p{i}": i})  # 3 messages, 300 updates
        """,
        sink.url,
        str(tmp_path),
        "lossline",
    )
    try:
        assert child.wait(30) == 0, child.stderr
        err = child.stderr
    finally:
        child.close()
        sink.down = False
    lost = re.findall(r"(\d+) (?:update\(s\) |updates )?lost", err)
    assert lost and int(lost[-1]) == 300, err


# -- 7. spool hygiene ----------------------------------------------------------------------


def test_a_failing_spool_is_reported_once_not_per_spill(sink, make_consumer, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the spool directory should be")
    caplog.set_level(logging.ERROR, logger="mixpanel_otel")
    client, consumer = _client(
        make_consumer, sink, spool_dir=str(blocker / "spool"), max_pending=10, max_block=0
    )
    sink.down = True
    for i in range(400):
        client.group_set("company", f"g{i}", {"i": i})
    sink.down = False
    client.flush(10)
    assert len(_spool_errors(caplog, module="")) <= 2, _spool_errors(caplog, module="")


def test_an_unusable_spool_leaks_nothing_and_says_so_once(sink, make_consumer, small_disk, caplog):
    _fill(str(small_disk))  # completely full: a lock file fits, a database does not
    caplog.set_level(logging.ERROR, logger="mixpanel_otel")
    before = len(os.listdir("/proc/self/fd"))
    client, consumer = _client(
        make_consumer, sink, spool_dir=str(small_disk), max_pending=10, max_block=0
    )
    sink.down = True
    for i in range(400):
        client.group_set("company", f"g{i}", {"i": i})
    sink.down = False
    client.flush(10)
    names = [n for n in os.listdir(small_disk) if n.startswith("mixpanel-otel-")]
    assert len(names) <= 2, names  # not a new .lock / .sqlite3 pair per attempt
    assert len(os.listdir("/proc/self/fd")) <= before + 12, "descriptors leaked"  # +transport
    assert len(_spool_errors(caplog)) <= 2, _spool_errors(caplog)


def test_spool_files_are_private_and_hold_no_token(sink, make_consumer, tmp_path):
    directory = tmp_path / "new" / "spool"
    client, consumer = _client(
        make_consumer, sink, spool_dir=str(directory), max_pending=10, max_block=0
    )
    sink.down = True
    for i in range(50):
        client.group_set("company", f"g{i}", {"i": i})
    assert sink.wait_for(lambda: consumer.stats()["spooled"] > 0), consumer.stats()
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    files = [os.path.join(directory, n) for n in os.listdir(directory)]
    assert files and all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files), [
        (f, oct(os.stat(f).st_mode)) for f in files
    ]
    database = next(f for f in files if f.endswith(".sqlite3"))
    raw = sqlite3.connect(database).execute("SELECT body FROM messages").fetchall()
    assert raw and not any(TOKEN in body for (body,) in raw), raw[:2]
    sink.down = False
    assert client.flush(10)
    assert len(sink.profiles()) == 50
    assert all(m["$token"] == TOKEN for m in sink.received("groups"))


# -- 1. SIGTERM flushes the host's OpenTelemetry pipeline first -----------------------------


@pytest.mark.slow
@pytest.mark.parametrize("example", ["flask_zero_code", "fastapi_zero_code"])
def test_sigterm_soon_after_a_request_delivers_every_property(sink, example):
    app = start_example(example, sink.url)
    try:
        app.wait_ready()
        answer = requests.post(
            f"{app.url}/checkout?seats=3", headers={"X-Tenant-Id": "acme"}, timeout=5
        )
        assert answer.json() == {"ok": True, "tenant": "acme"}
        time.sleep(0.3)  # the scenario itself: SIGTERM 0.3 s after the request
    finally:
        app.stop(signal.SIGTERM)
    output = app.output
    acme = sink.profile("company", "acme")
    assert acme is not None, output
    assert set(acme) == {"seats", "first_seen", "last_route", "last_seen", "last_service"}, (
        acme,
        output,
    )
    assert acme["seats"] == 3 and acme["last_route"] == "/checkout", acme


# -- 2. multiprocessing pools end promptly and deliver everything ---------------------------

POOLS = """
import multiprocessing, faulthandler, signal as _signal
from concurrent.futures import ProcessPoolExecutor
ctx = multiprocessing.get_context("fork")
client, consumer = make(flush_interval=60, shutdown_timeout=3)

def work(task):
    run, n = task
    emit(client, f"r{run}w{n}", [f"r{run}w{n}"], 3)
    return os.getpid()

def prefork_worker(tasks):  # a Celery-style prefork child: loops until SIGTERM
    while True:
        work(tasks.get())
        mark(f"done {os.getpid()}")

pids = []
how, runs = sys.argv[1], int(sys.argv[2])
for run in range(runs):
    faulthandler.dump_traceback_later(20, exit=True)  # a hung run fails, with its stack
    jobs = [(run, n) for n in range(12)]
    if how == "with":
        with ctx.Pool(4) as pool:
            pids += [p.pid for p in pool._pool]
            pool.map(work, jobs)
    elif how == "terminate":
        pool = ctx.Pool(4)
        pids += [p.pid for p in pool._pool]
        pool.map(work, jobs)
        pool.terminate()
        pool.join()
    elif how == "close":
        pool = ctx.Pool(4)
        pids += [p.pid for p in pool._pool]
        pool.map(work, jobs)
        pool.close()
        pool.join()
    elif how == "executor":
        with ProcessPoolExecutor(4, mp_context=ctx) as executor:
            pids += list(executor.map(work, jobs))
    elif how == "prefork":
        tasks = ctx.SimpleQueue()
        workers = [ctx.Process(target=prefork_worker, args=(tasks,)) for _ in range(4)]
        for w in workers:
            w.start()
        pids += [w.pid for w in workers]
        for job in jobs:
            tasks.put(job)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if os.path.exists(os.environ["MARK"]):
                with open(os.environ["MARK"]) as f:
                    if sum(line.startswith("done ") for line in f) >= 12 * (run + 1):
                        break
            time.sleep(0.01)
        for w in workers:
            w.terminate()
        for w in workers:
            w.join(10)
            assert w.exitcode == -_signal.SIGTERM, w.exitcode
    faulthandler.cancel_dump_traceback_later()
print("PIDS", " ".join(map(str, pids)))
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def busy_cpu():
    """Two busy processes beside the test (ended by pid afterwards)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize(
    "how, runs", [("with", 40), ("terminate", 2), ("close", 2), ("executor", 2), ("prefork", 2)]
)
def test_pools_end_promptly_and_deliver_under_cpu_load(sink, tmp_path, busy_cpu, how, runs):
    child = Child(POOLS, sink.url, str(tmp_path), f"pools-{how}", how, str(runs))
    try:
        code = child.wait(25 * runs)
        out, err = child.stdout, child.stderr
    finally:
        child.close()
    pids = [int(p) for p in out.split("PIDS", 1)[1].split()] if "PIDS" in out else []
    survivors = [pid for pid in pids if _alive(pid)]
    for pid in survivors:  # ours: never leave one behind
        os.kill(pid, signal.SIGKILL)
    assert code == 0, err
    assert not survivors, survivors
    plan = Plan()
    for run in range(runs):
        for n in range(12):
            plan.emit(f"r{run}w{n}", [f"r{run}w{n}"], 3)
    outcome = compare(sink, plan)
    assert not outcome.lost and not outcome.stale, outcome
