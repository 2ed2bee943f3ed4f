"""Batching without a thread: the buffer and the dispatch rules, called directly."""

from __future__ import annotations

from mixpanel_otel._delivery.buffer import Buffer
from mixpanel_otel._delivery.dispatch import Dispatch
from mixpanel_otel._delivery.jobs import Kind, Lane
from mixpanel_otel._delivery.receipts import Fate, Receipt
from mixpanel_otel._delivery.sender import Result
from mixpanel_otel._wire import make_update


def update(gid, op="$set", payload=None, meta=None):
    return make_update("company", gid, op, payload if payload is not None else {"x": 1}, 1.0, meta)


def add(target, *updates):
    for u in updates:
        if isinstance(target, Dispatch):
            assert target.add(u, lambda: True) >= 0
        elif not target.coalesce(u):
            target.append(u)


def delivered(job):
    return Result(delivered=list(job.updates))


# -- buffer ----------------------------------------------------------------------------


def test_same_operation_merges_unless_a_later_update_touches_it():
    buffer = Buffer()
    add(
        buffer,
        update("a", payload={"x": 1}),
        update("a", "$unset", ["y"]),
        update("a", payload={"z": 2}),
    )
    assert [u.payload for u in buffer] == [{"x": 1, "z": 2}, ["y"]]
    add(buffer, update("a", "$unset", ["x"]), update("a", payload={"x": 3}))
    assert [u.op for u in buffer] == ["$set", "$unset", "$set"]


def test_delete_supersedes_everything_pending_and_carries_their_receipts():
    buffer = Buffer()
    receipt = Receipt(3)
    first, second, delete = (
        update("a"),
        update("a", "$union", {"l": [1]}),
        update("a", "$delete", ""),
    )
    for u in (first, second, delete):
        u.receipts = [receipt]
    add(buffer, first, second)
    assert buffer.coalesce(delete) == 2
    assert list(buffer) == [delete] and buffer.count == 1
    assert delete.receipts == [receipt, receipt, receipt]


def test_different_meta_never_merges():
    buffer = Buffer()
    add(buffer, update("a"), update("a", meta={"$ip": "1.2.3.4"}))
    assert buffer.count == 2


def test_set_merges_keep_size_to_what_is_held():
    buffer = Buffer()
    for i in range(5000):
        add(buffer, update("hot", payload={"n": i}))
    (only,) = list(buffer)
    assert only.payload == {"n": 4999} and buffer.bytes == only.size < 500


def test_take_skips_busy_groups_and_keeps_each_groups_order():
    buffer = Buffer()
    add(
        buffer,
        update("a", payload={"v": 1}),
        update("b"),
        update("a", "$unset", ["v"]),
        update("c"),
    )
    batch = buffer.take(10, busy={("company", "a")})
    assert [u.group_id for u in batch] == ["b", "c"]
    batch = buffer.take(1)
    assert [(u.group_id, u.op) for u in batch] == [("a", "$set")]
    buffer.restore(batch)
    assert [(u.group_id, u.op) for u in buffer.take(10)] == [("a", "$set"), ("a", "$unset")]


# -- dispatch --------------------------------------------------------------------------


def test_a_group_in_flight_is_busy_until_its_job_settles():
    dispatch = Dispatch(batch_size=2)
    add(dispatch, update("a", payload={"v": 1}), update("b"))
    first = dispatch.pick(spool_ready=False, in_flight_limit=8)
    assert first is not None and first.kind is Kind.GROUPS
    add(dispatch, update("a", "$unset", ["v"]), update("c"), update("d"))
    second = dispatch.pick(spool_ready=False, in_flight_limit=8)
    assert [u.group_id for u in second.updates] == ["c", "d"], "a waits for its first message"
    assert dispatch.pick(spool_ready=False, in_flight_limit=8) is None
    dispatch.finish(first, delivered(first))
    dispatch.partial = True
    third = dispatch.pick(spool_ready=False, in_flight_limit=8)
    assert [(u.group_id, u.op) for u in third.updates] == [("a", "$unset")]
    assert dispatch.held == 3  # second and third in flight


def test_partial_batches_wait_for_a_tick_and_held_counts_in_flight():
    dispatch = Dispatch(batch_size=10)
    add(dispatch, *(update(f"g{i}") for i in range(3)))
    assert dispatch.pick(spool_ready=False, in_flight_limit=8) is None
    dispatch.partial = True
    job = dispatch.pick(spool_ready=False, in_flight_limit=8)
    assert job.count == 3 and dispatch.held == 3 and dispatch.in_flight == 3
    receipt = Receipt(1)
    job.updates[0].receipts = [receipt]
    dispatch.finish(job, delivered(job))
    assert dispatch.held == 0 and receipt.settled and receipt.delivered == 1


def test_spooled_rows_go_first_and_alone():
    dispatch = Dispatch(batch_size=1)
    dispatch.partial = True
    add(dispatch, update("a"), update("b"))
    in_flight = dispatch.pick(spool_ready=True, in_flight_limit=8)
    dispatch.spool_rows = 5  # a spill wrote rows while that job was out
    beside = dispatch.pick(spool_ready=True, in_flight_limit=8)
    assert beside is None, "no replay job beside a group job"
    dispatch.finish(in_flight, delivered(in_flight))
    spool_job = dispatch.pick(spool_ready=True, in_flight_limit=8)
    assert spool_job.kind is Kind.REPLAY
    waits = dispatch.pick(spool_ready=True, in_flight_limit=8)
    assert waits is None, "memory waits while the spool has rows"
    dispatch.finish(spool_job, Result())
    dispatch.spool_rows = 0
    assert dispatch.pick(spool_ready=True, in_flight_limit=8).updates[0].group_id == "b"


def test_unsent_updates_go_back_in_front_and_abandoned_jobs_are_the_spools():
    dispatch = Dispatch(batch_size=2)
    dispatch.partial = True
    add(dispatch, update("a", payload={"v": 1}), update("b"))
    job = dispatch.pick(spool_ready=False, in_flight_limit=8)
    add(dispatch, update("a", "$unset", ["v"]))
    dispatch.finish(job, Result(unsent=list(job.updates)))
    assert [(u.group_id, u.op) for u in dispatch.buffer] == [
        ("a", "$set"),
        ("a", "$unset"),
        ("b", "$set"),
    ]
    job = dispatch.pick(spool_ready=False, in_flight_limit=8)
    front, back, lost = dispatch.take_all()
    assert front == job.updates and [u.group_id for u in back] == ["b"] and lost == []
    assert dispatch.in_flight == 0 and dispatch.held == 0
    dispatch.finish(job, delivered(job))  # a late answer changes nothing
    assert dispatch.in_flight == 0


def test_lanes_send_one_job_at_a_time_in_order():
    dispatch = Dispatch(batch_size=2)
    for text in ("1", "2", "3"):
        dispatch.add_sdk(("events",), lambda: Lane("/track"), text)
    job = dispatch.pick(spool_ready=False, in_flight_limit=8)
    assert job.texts == ["1", "2"] and dispatch.pick(spool_ready=False, in_flight_limit=8) is None
    dispatch.partial = True
    assert dispatch.pick(spool_ready=False, in_flight_limit=8) is None, "the lane is busy"
    dispatch.finish(job, Result())
    assert dispatch.pick(spool_ready=False, in_flight_limit=8).texts == ["3"]


def test_receipts_count_each_fate():
    receipt = Receipt(3)
    for fate in (Fate.DELIVERED, Fate.SPOOLED):
        receipt.settle(fate)
    assert not receipt.settled
    receipt.settle(Fate.FAILED, "bad")
    assert receipt.settled and receipt.failed == 1 and receipt.errors == ["bad"]


def test_overflow_queued_for_the_spool_stays_behind_older_and_ahead_of_newer_updates():
    """An update that overflows to the spool is newer than what the buffer held and
    older than what the buffer takes after it: the spill writes each group in that
    order (the four-process spool test once saw a group end on an older value)."""
    dispatch = Dispatch(batch_size=10)
    add(dispatch, update("g", payload={"last": 1}))
    dispatch.add_to_spill([update("g", payload={"last": 2})])  # no room: overflow
    add(dispatch, update("g", payload={"last": 3}))  # room again (a job finished)
    job = dispatch.pick(spool_ready=True, in_flight_limit=8)
    assert job is not None and job.kind is Kind.SPILL
    assert [u.payload["last"] for u in job.updates] == [1, 2, 3]


def test_the_exit_takes_the_spill_queue_ahead_of_newer_buffered_updates():
    dispatch = Dispatch(batch_size=10)
    add(dispatch, update("g", payload={"last": 1}))
    dispatch.add_to_spill([update("g", payload={"last": 2})])
    add(dispatch, update("g", payload={"last": 3}))
    front, back, lost = dispatch.take_all()
    assert [u.payload["last"] for u in front + back] == [1, 2, 3] and not lost


# -- inbox -----------------------------------------------------------------------------


def test_a_caller_offering_while_the_inbox_is_moved_never_passes_max_pending():
    """The inbox is emptied one update at a time under the ledger's lock while
    callers offer without it: a caller that came in mid-move saw fewer waiting
    and the old held count, and was admitted past the bound (1,005 held of a
    1,000 maximum, in a loaded run)."""
    from types import SimpleNamespace

    from mixpanel_otel._delivery.inbox import Inbox

    inbox = Inbox(200, SimpleNamespace(max_pending=10, max_pending_bytes=10**9), lambda: None)
    inbox.count(held=0, held_bytes=0)
    for i in range(10):
        assert inbox.offer([update(f"g{i}")], 100)
    assert not inbox.offer([update("full")], 100)
    held = []
    admitted = []

    def add_while_a_caller_offers(moved):
        held.append(moved)
        admitted.append(inbox.offer([update(f"late{len(held)}")], 100))  # another thread
        return 0

    inbox.move(add_while_a_caller_offers)
    assert admitted == [False] * 10
    inbox.count(held=len(held), held_bytes=100 * len(held))  # what the ledger publishes
    assert not inbox.offer([update("still full")], 100)
