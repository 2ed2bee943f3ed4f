"""What the library does to its host process (issue 28), with real subprocesses.

An application's own SIGTERM handler runs at once and once, with its flags;
a default-action SIGTERM is flushed without waiting for the main thread and
still kills; multiprocessing children get nothing of ours until they use the
library; gunicorn workers and ``shutdown()`` share one exit budget; the
host's OpenTelemetry providers are flushed through their public API.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Optional

import pytest
import requests

from .helpers import (
    TOKEN,
    AppProcess,
    Child,
    Plan,
    compare,
    example_gunicorn,
    free_port,
    sink_env,
    spooled_rows,
)
from .test_crash import BlackHole, _move_spool, replay

pytestmark = pytest.mark.slow  # every test here runs subprocesses


def _finish(child: Child, timeout: float = 60) -> tuple[int, str, str]:
    try:
        code = child.wait(timeout)
        return code, child.stdout, child.stderr
    finally:
        child.close()


def _run_noting_calls(
    sink: Any, tmp_path: Any, source: str, name: str, *args: str
) -> tuple[int, str, str, Any]:
    """Run a script whose children note each handler call in a file of
    ``calls/`` (named by pid); its exit status, output, and that folder."""
    calls = tmp_path / "calls"
    calls.mkdir()
    child = Child(
        source,
        sink.url,
        str(tmp_path),
        name,
        *args,
        CALLS=str(calls),
        MIXPANEL_OTEL_SHUTDOWN_TIMEOUT=3,
    )
    return (*_finish(child), calls)


def _workers_plan(workers: int, plan: Optional[Plan] = None) -> Plan:
    """What ``work(n)`` in the scripts below emits, for each worker."""
    plan = plan or Plan()
    for n in range(workers):
        plan.emit(f"w{n}", [f"w{n}-{j}" for j in range(3)], 50)
    return plan


# -- 1. a multiprocessing child's own SIGTERM handler ------------------------------------

POOL_WITH_HANDLER = """
import multiprocessing, signal
ctx = multiprocessing.get_context(sys.argv[1])
calls_dir = os.environ["CALLS"]

def on_term(signum, frame):
    with open(os.path.join(calls_dir, str(os.getpid())), "a") as f:
        f.write("called\\n")
    sys.exit(0)  # as many applications do: the exit path delivers

def init():
    signal.signal(signal.SIGTERM, on_term)

def work(n):
    client, _ = make(flush_interval=60)
    emit(client, f"w{n}", [f"w{n}-{j}" for j in range(3)], 50)
    return os.getpid()

if __name__ == "__main__":
    client, consumer = make(flush_interval=60)
    emit(client, "parent", ["parent0"], 10)
    pool = ctx.Pool(2, initializer=init)
    pids = set(pool.map(work, range(4), chunksize=1))
    pool.terminate()  # SIGTERM to every worker
    pool.join()
    print("PIDS", sorted(pids))
"""


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_a_pool_childs_own_sigterm_handler_runs_once_and_its_exit_delivers(sink, tmp_path, method):
    code, out, err, calls = _run_noting_calls(sink, tmp_path, POOL_WITH_HANDLER, "pool", method)
    assert code == 0, err
    for name in os.listdir(calls):
        assert (calls / name).read_text() == "called\n", (name, err)
    assert os.listdir(calls), f"no worker's handler ran: {err}"
    outcome = compare(sink, _workers_plan(4, Plan().emit("parent", ["parent0"], 10)))
    assert not outcome.lost and not outcome.stale, (outcome, err)


EXIT_INTERRUPTED = """
import multiprocessing, signal, threading
from multiprocessing import util
from mixpanel_otel._delivery import process
ctx = multiprocessing.get_context(sys.argv[1])
kind, where = sys.argv[2], sys.argv[3]
calls_dir = os.environ["CALLS"]
armed = []

def on_term(signum, frame):
    with open(os.path.join(calls_dir, str(os.getpid())), "a") as f:
        f.write("called\\n")
    sys.exit(0)

def signal_now():  # the SIGTERM lands here: the handler raises SystemExit in this frame
    if "fired" not in armed:  # one signal, though a spawned child's exit may call this twice
        armed.append("fired")
        signal.raise_signal(signal.SIGTERM)

def note_exit_steps(deadline):
    with open(os.path.join(calls_dir, f"{os.getpid()}.exit"), "a") as f:
        f.write("ran\\n")

def work(n):
    signal.signal(signal.SIGTERM, on_term)
    client, _ = make(flush_interval=60)
    process.add_exit_step("providers", note_exit_steps)
    emit(client, f"w{n}", [f"w{n}-{j}" for j in range(3)], 50)
    if armed:
        return n
    armed.append(n)
    if where == "target":
        signal_now()
    elif where == "exit_function":  # multiprocessing's exit routine, before our finalizer
        util.Finalize(None, signal_now, exitpriority=1000)
    else:  # threading's shutdown hooks, which _bootstrap runs last, before ours
        threading._register_atexit(signal_now)
    return n

if __name__ == "__main__":
    if kind == "pool":
        with ctx.Pool(2) as pool:
            assert sorted(pool.map(work, range(4), chunksize=1)) == [0, 1, 2, 3]
            pool.close()
            pool.join()
    else:
        for n in range(2):
            child = ctx.Process(target=work, args=(n,))
            child.start()
            child.join()
            # Out of threading's shutdown, SystemExit leaves _bootstrap: CPython's own code.
            assert child.exitcode == 0 or where == "threading_shutdown", child.exitcode
    print("DONE", flush=True)
"""


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
@pytest.mark.parametrize(
    "kind, where",
    [
        ("process", "target"),
        ("process", "exit_function"),
        ("process", "threading_shutdown"),
        ("pool", "exit_function"),
    ],
)
def test_a_childs_handler_raising_anywhere_on_its_way_out_costs_no_update(
    sink, tmp_path, method, kind, where
):
    """The child's exit steps run once whether the application's handler raises
    SystemExit in the target, in multiprocessing's exit routine or in threading's
    shutdown hooks (issue 28 item 1: a pool worker's 100 updates were lost)."""
    code, out, err, calls = _run_noting_calls(
        sink, tmp_path, EXIT_INTERRUPTED, "interrupted", method, kind, where
    )
    assert code == 0 and "DONE" in out, err
    handled = [name for name in os.listdir(calls) if not name.endswith(".exit")]
    assert handled, f"no child's handler ran: {err}"
    for name in os.listdir(calls):  # each handler, and each child's exit steps, once
        assert (calls / name).read_text() in ("called\n", "ran\n"), (name, err)
    assert {f"{name}.exit" for name in handled} <= set(os.listdir(calls)), err
    outcome = compare(sink, _workers_plan(4 if kind == "pool" else 2))
    assert not outcome.lost and not outcome.stale, (outcome, err)


EXECUTOR = """
import concurrent.futures, multiprocessing

def work(n):
    client, _ = make(flush_interval=60)
    emit(client, f"w{n}", [f"w{n}-{j}" for j in range(3)], 50)
    return n

if __name__ == "__main__":
    ctx = multiprocessing.get_context(sys.argv[1])
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as executor:
        assert sorted(executor.map(work, range(4))) == [0, 1, 2, 3]
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_process_pool_executor_workers_deliver_at_their_exit(sink, tmp_path, method):
    child = Child(EXECUTOR, sink.url, str(tmp_path), "executor", method)
    code, out, err = _finish(child)
    assert code == 0, err
    outcome = compare(sink, _workers_plan(4))
    assert not outcome.lost and not outcome.stale, (outcome, err)


# -- 7. a child that never uses the library ----------------------------------------------

POOL_FOOTPRINT = """
import multiprocessing
ctx = multiprocessing.get_context("fork")

def footprint(_=None):
    names = [t.name for t in threading.enumerate()]
    fds = os.listdir("/proc/self/fd")
    opened = set()
    for fd in fds:
        try:
            opened.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed since
            pass
    return names, {target for target in opened if not target.startswith("/proc/")}

client, consumer = make(flush_interval=60)
emit(client, "parent", ["parent0"], 10)
assert client.flush(10)
print("PARENT", footprint()[0], flush=True)
with ctx.Pool(1) as pool:
    inherited = footprint()[1]  # the child has the parent's descriptors, none more
    names, opened = pool.map(footprint, [0])[0]
    print("POOL CHILD", names, opened - inherited, flush=True)
    assert names == ["MainThread"] and opened <= inherited
queue = ctx.SimpleQueue()
child = ctx.Process(target=lambda: queue.put(footprint()))
child.start()
inherited = footprint()[1]  # after start(): the pipes it shares with the child
names, opened = queue.get()
child.join()
print("PROCESS CHILD", names, opened - inherited, flush=True)
assert names == ["MainThread"] and opened <= inherited
print("OK")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd")
def test_a_child_that_never_enqueues_gets_no_thread_and_no_descriptor(sink, tmp_path):
    code, out, err = _finish(Child(POOL_FOOTPRINT, sink.url, str(tmp_path), "footprint"))
    assert code == 0, (out, err)
    assert "OK" in out, (out, err)
    assert "mixpanel-otel-sigterm" in out.split("PARENT")[1].splitlines()[0], out


# -- 4. and 6. an application's handler installed first -----------------------------------

APP_HANDLER_FIRST = """
import ctypes, signal

class Sigaction(ctypes.Structure):  # glibc's struct sigaction on Linux
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]

SA_RESTART = 0x10000000

def sa_restart():
    action = Sigaction()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.sigaction(signal.SIGTERM, None, ctypes.byref(action)) == 0
    return bool(action.flags & SA_RESTART)

seen = []

def on_term(signum, frame):  # what gunicorn, uvicorn or Celery do: note it, stop gracefully
    seen.append(consumer.stats()["requests"])

signal.signal(signal.SIGTERM, on_term)
signal.siginterrupt(signal.SIGTERM, False)  # gunicorn's workers: system calls restart
assert sa_restart()
client, consumer = make(flush_interval=60)
emit(client, "a", ["app0", "app1"], 50)
print("HANDLER KEPT", signal.getsignal(signal.SIGTERM) is on_term, flush=True)
print("SA_RESTART KEPT", sa_restart(), flush=True)
mark("ready")
while not seen:
    signal.pause()
emit(client, "b", ["app0"], 1)  # the application still logs while it stops
print("REQUESTS IN HANDLER", seen[0], "AFTER", consumer.stats()["requests"], flush=True)
print("CALLS", len(seen), flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads glibc's sigaction")
def test_an_application_handler_installed_first_runs_at_once_with_its_flags(sink, tmp_path):
    child = Child(APP_HANDLER_FIRST, sink.url, str(tmp_path), "apphandler")
    try:
        assert child.wait_mark("ready", 30), child.stderr
        child.proc.send_signal(signal.SIGTERM)
        code = child.wait(30)
        out, err = child.stdout, child.stderr
    finally:
        child.close()
    assert code == 0, err  # the application's handler decided: it did not exit
    assert "HANDLER KEPT True" in out, out
    assert "SA_RESTART KEPT True" in out, out
    # No flush before the application's handler, and no eager sending after it.
    assert "REQUESTS IN HANDLER 0 AFTER 0" in out, out
    assert "CALLS 1" in out, out
    # Delivery happened in the application's own exit path (atexit).
    outcome = compare(sink, Plan().emit("a", ["app0", "app1"], 50).emit("b", ["app0"], 1))
    assert not outcome.lost, outcome


HANDLER_DURING_EXIT = """
import atexit, signal
from mixpanel_otel._delivery import process
handled = threading.Event()
atexit.register(lambda: print("HELD AFTER THE EXIT STEPS", consumer.stats()["pending"]))

def on_term(signum, frame):
    handled.set()
    sys.exit(3)

def main_thread_waits_for_the_steps():
    frame, names = sys._current_frames().get(threading.main_thread().ident), []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return "_shielded" in names and "start" not in names

def signal_the_main_thread(deadline):  # the SIGTERM comes while the exit steps run
    while not main_thread_waits_for_the_steps():
        time.sleep(0.01)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    assert handled.wait(30)
    time.sleep(0.5)  # a provider's flush that takes a while

signal.signal(signal.SIGTERM, on_term)
process.add_exit_step("providers", signal_the_main_thread)
client, consumer = make(flush_interval=60)
emit(client, "x", ["x0", "x1"], 100)
"""


def test_an_application_handler_raising_while_the_exit_steps_run_waits_for_them(sink, tmp_path):
    """The handler's SystemExit lands in the main thread's wait for the exit thread:
    the wait goes on, the consumers' step delivers. (Joining the thread there lost
    them: an interrupted ``Thread.join`` marks a running thread stopped.)"""
    code, out, err = _finish(Child(HANDLER_DURING_EXIT, sink.url, str(tmp_path), "during"))
    assert code == 0, err  # atexit: the handler's SystemExit ends the hook, not the process
    assert "HELD AFTER THE EXIT STEPS 0" in out, (out, err)
    outcome = compare(sink, Plan().emit("x", ["x0", "x1"], 100))
    assert not outcome.lost and not outcome.stale, (outcome, err)


# -- 5. a default-action SIGTERM while the main thread is in a long C call ----------------

LONG_QUERY = """
import sqlite3
client, consumer = make(flush_interval=60, shutdown_timeout=3)
emit(client, "q", [f"q{i}" for i in range(20)], 100)
db = sqlite3.connect(":memory:")
mark("ready")
# Never ends; sqlite releases the GIL while it runs.
db.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
           "SELECT count(*) FROM c").fetchall()
mark("query ended")
"""


def test_sigterm_during_a_long_sqlite_query_delivers_then_dies_by_the_signal(sink, tmp_path):
    child = Child(LONG_QUERY, sink.url, str(tmp_path), "query")
    try:
        assert child.wait_mark("ready", 30), child.stderr
        code = child.terminate(timeout=30)  # the old handler waited for the query: forever
        err = child.stderr
    finally:
        child.close()
    assert code == -signal.SIGTERM, err
    outcome = compare(sink, Plan().emit("q", [f"q{i}" for i in range(20)], 100))
    assert not outcome.lost and not outcome.stale, outcome


NON_PYTHON_THREAD = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.pthread_create.argtypes = [ctypes.POINTER(ctypes.c_ulong)] + [ctypes.c_void_p] * 3
client, consumer = make(flush_interval=60, shutdown_timeout=3)
emit(client, "c", [f"c{i}" for i in range(5)], 100)
# A thread Python knows nothing of (a C library's worker), waiting in pause(): no
# Python thread state, so nothing of Python's may run there.
thread = ctypes.c_ulong()
assert libc.pthread_create(ctypes.byref(thread), None,
                           ctypes.cast(libc.pause, ctypes.c_void_p), None) == 0
signal.pthread_kill(thread.value, signal.SIGTERM)  # the kernel may pick any thread
time.sleep(30)
print("NOT KILLED", flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="starts a thread with libc")
def test_a_sigterm_that_lands_in_a_thread_python_does_not_know_still_delivers_and_kills(
    sink, tmp_path
):
    """A C handler that reads the interrupted thread's Python frames
    (``faulthandler``) finds none there, writes nothing, and the signal is lost."""
    child = Child("import signal\n" + NON_PYTHON_THREAD, sink.url, str(tmp_path), "cthread")
    code, out, err = _finish(child)
    assert code == -signal.SIGTERM, (code, out, err)
    outcome = compare(sink, Plan().emit("c", [f"c{i}" for i in range(5)], 100))
    assert not outcome.lost and not outcome.stale, outcome


WAKEUP_DESCRIPTOR = """
import asyncio, signal
import mixpanel_otel

def wakeup_fd():
    current = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(current)
    return current

hosts = os.pipe()
os.set_blocking(hosts[1], False)
if sys.argv[1] == "host-first":  # trio, Twisted: theirs before the library's
    signal.set_wakeup_fd(hosts[1])
client, consumer = make(flush_interval=60)
print("HOST'S KEPT" if wakeup_fd() == hosts[1] else "OURS" if wakeup_fd() != -1 else "NONE")
if sys.argv[1] == "shutdown":
    mixpanel_otel.shutdown()
    print("AFTER SHUTDOWN", wakeup_fd())
    sys.exit(0)

async def main():  # asyncio takes the descriptor for its own signals
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, lambda: None)
    emit(client, "w", ["w0", "w1"], 50)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(30)

asyncio.run(main())
print("NOT KILLED", flush=True)
"""


@pytest.mark.parametrize("case", ["free", "host-first", "shutdown"])
def test_the_wakeup_descriptor_is_taken_only_while_free_and_given_back(sink, tmp_path, case):
    """Another library's descriptor is left alone, and a SIGTERM still delivers
    and kills through our handler when the descriptor is asyncio's."""
    code, out, err = _finish(Child(WAKEUP_DESCRIPTOR, sink.url, str(tmp_path), "wakeup", case))
    if case == "shutdown":
        assert code == 0 and "OURS" in out and "AFTER SHUTDOWN -1" in out, (out, err)
        return
    assert ("HOST'S KEPT" if case == "host-first" else "OURS") in out, (out, err)
    assert code == -signal.SIGTERM, (code, out, err)
    outcome = compare(sink, Plan().emit("w", ["w0", "w1"], 50))
    assert not outcome.lost and not outcome.stale, outcome


# -- 8. the host's providers, flushed through their public API ----------------------------

PROVIDERS = """
import atexit, gc
scans = []
_get_referrers = gc.get_referrers
gc.get_referrers = lambda *objects: scans.append(1) or _get_referrers(*objects)
atexit.register(lambda: print("HEAP SCANS", len(scans), flush=True))  # runs last

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
import mixpanel_otel
from mixpanel_otel import MixpanelSpanExporter

def provider():
    made = TracerProvider()
    # Held for a minute: only a flush at exit gets these spans out.
    made.add_span_processor(BatchSpanProcessor(MixpanelSpanExporter(flush_interval=60),
                                               schedule_delay_millis=60_000))
    return made

trace.set_tracer_provider(provider())
other = provider()
mixpanel_otel.flush_at_exit(other)
for tracer, group in ((trace.get_tracer("app"), "global0"), (other.get_tracer("job"), "other0")):
    with tracer.start_as_current_span("work") as span:
        span.set_attribute("mixpanel.group_key", "company")
        span.set_attribute("mixpanel.group_id", group)
        span.set_attribute("mixpanel.$set.plan", "pro")
"""


def test_exit_flushes_the_global_and_handed_over_providers_without_a_heap_scan(sink, tmp_path):
    code, out, err = _finish(Child(PROVIDERS, sink.url, str(tmp_path), "providers"))
    assert code == 0, err
    assert "HEAP SCANS 0" in out, (out, err)
    assert sink.profile("company", "global0") == {"plan": "pro"}, err
    assert sink.profile("company", "other0") == {"plan": "pro"}, err


# -- 3. one exit budget: shutdown() and atexit, spill included -----------------------------

ONE_BUDGET = """
import mixpanel_otel
client, consumer = make(spool_dir=os.environ["SPOOL"], flush_interval=0.05, shutdown_timeout=2)
emit(client, "h", [f"h{i}" for i in range(500)], 1000)
time.sleep(0.3)  # requests are in flight, unanswered
mixpanel_otel.shutdown()  # a framework's shutdown hook; atexit comes next, with what is left
emit(client, "late", ["late0"], 1)  # after shutdown(): waits for a flush
consumer.flush(10)  # capped by what is left of the budget
"""


def test_shutdown_atexit_and_flush_share_one_budget_and_the_spill_fits_in_it(sink, tmp_path):
    hole = BlackHole()
    spool = str(tmp_path / "spool")
    child = Child(ONE_BUDGET, hole.url, str(tmp_path), "budget", timed_exit=True, SPOOL=spool)
    try:
        assert child.wait(60) == 0, child.stderr
        err = child.stderr
    finally:
        child.close()
        hole.close()
    # The exit line states the setting, not what was left of it.
    assert "within the 2.0 s shutdown timeout" in err, err
    assert "kept in the spool" in err and "lost" not in err, err
    _move_spool(spool, hole.url, sink.url)
    replay(sink, str(tmp_path), spool)
    plan = Plan().emit("h", [f"h{i}" for i in range(500)], 1000)
    outcome = compare(sink, plan)
    assert not outcome.lost and not outcome.stale, outcome


EXIT_BOUND = """
client, consumer = make(spool_dir=os.environ["SPOOL"], flush_interval=0.05, shutdown_timeout=2,
                        max_pending=50_000)
emit(client, "x", [f"x{i}" for i in range(5000)], 10_000)
time.sleep(0.3)  # requests are in flight, unanswered
"""


def test_exit_with_a_spool_and_a_silent_server_ends_within_the_bound(sink, tmp_path):
    hole = BlackHole()
    spool = str(tmp_path / "spool")
    child = Child(EXIT_BOUND, hole.url, str(tmp_path), "bound", timed_exit=True, SPOOL=spool)
    try:
        assert child.wait(60) == 0, child.stderr
        took, err = child.exit_seconds, child.stderr
    finally:
        child.close()
        hole.close()
    assert "kept in the spool" in err and "lost" not in err, (took, err)
    assert spooled_rows(spool, TOKEN, hole.url) > 0
    # shutdown_timeout + 0.5 s is the promise; 4.5 s more for a loaded machine (an
    # unbounded exit waits for the 10 s request timeout, and more).
    assert took < 2 + 0.5 + 4.5, (took, err)


# -- 2. gunicorn with a Mixpanel that hangs at shutdown -------------------------------------


@pytest.mark.parametrize("spool", [True, False])
def test_gunicorn_workers_exit_in_time_when_mixpanel_hangs(sink, tmp_path, spool):
    hole = BlackHole()
    port = free_port()
    env = {"MIXPANEL_OTEL_SPOOL_DIR": str(tmp_path / "spool")} if spool else {}
    server = AppProcess(
        example_gunicorn(port),
        port,
        sink_env(hole.url, MIXPANEL_OTEL_FLUSH_INTERVAL="0.2", **env),
    )
    tenants = [f"t{i}" for i in range(40)]
    try:
        server.wait_ready("/")
        for tenant in tenants:
            requests.get(f"{server.url}/", headers={"X-Tenant-Id": tenant}, timeout=30)
    finally:
        code = server.stop(signal.SIGTERM)
        hole.close()
    output = server.output
    assert code == 0, output
    assert "SIGKILL" not in output and "TIMEOUT" not in output, output
    assert "within the 5.0 s shutdown timeout" in output, output
    if not spool:
        assert "lost" in output, output
        return
    assert "lost" not in output, output
    _move_spool(str(tmp_path / "spool"), hole.url, sink.url)
    replay(sink, str(tmp_path), str(tmp_path / "spool"))
    profiles = {p["group_id"]: p["properties"] for p in sink.profiles()}
    for tenant in tenants:
        assert profiles.get(tenant, {}).get("seen") is True, (tenant, output)
        assert profiles[tenant].get("workers"), (tenant, output)
