"""The one front-end path: adapters, the walker, reporting; the disabled consumer. No I/O."""

from __future__ import annotations

import logging

import pytest

from mixpanel_otel._frontend import DisabledConsumer
from mixpanel_otel._logging import LOG_RECORDS
from mixpanel_otel._records import Adapter

TAGGED = {"group_key": "company", "group_id": "acme", "$set": {"plan": "pro"}}


class Dicts(Adapter[dict]):
    """Records that are plain dicts; ``@events`` holds span events, ``@boom`` breaks it."""

    has_events = True

    def attributes(self, record):
        if "@boom" in record:
            raise RuntimeError("a broken record")
        return {k: v for k, v in record.items() if not k.startswith("@")}

    def time(self, record):
        return 100.0

    def resource(self, record):
        return {"service.name": "shop"}

    def special(self, record, name, time):
        return "the-name" if name == "@name" else super().special(record, name, time)

    def events(self, record, time):
        return [(attributes, time + 1) for attributes in record.get("@events", ())]

    def describe(self, record):
        return f"dict {record.get('@id')}"


class TagsOnly(Dicts):
    has_events = False

    def resource(self, record):
        raise AssertionError("the tags-only path read the resource")

    def special(self, record, name, time):
        raise AssertionError("the tags-only path read a special")


def ops(updates):
    return [(u.group_id, u.op, u.payload, u.time) for u in updates]


def test_a_batch_reads_tags_rules_and_span_events(make_front, recording):
    rules = [
        {"group_key": "company", "group_id": "tenant", "set": {"svc": "service.name", "n": "@name"}}
    ]
    result = (
        make_front(rules)
        .walker(Dicts())
        .ingest(
            [
                {
                    "tenant": "t1",
                    "@events": [
                        {
                            "mixpanel.group_key": "company",
                            "mixpanel.group_id": "e",
                            "mixpanel.$set.x": 1,
                            "tenant": "not-read",
                        }
                    ],
                },
                TAGGED,
            ]
        )
    )
    assert result.records == 2 and result.rejected == 0
    assert ops(recording.updates) == [
        ("t1", "$set", {"svc": "shop", "n": "the-name"}, 100.0),
        ("e", "$set", {"x": 1}, 101.0),  # an event is read without rules
        ("acme", "$set", {"plan": "pro"}, 100.0),
    ]


def test_without_rules_or_events_only_tags_are_read(make_front, recording):
    walker = make_front().walker(TagsOnly())
    walker.ingest([TAGGED, {"tenant": "t1"}])
    walker.ingest_one(TAGGED)
    assert [u.group_id for u in recording.updates] == ["acme", "acme"]


@pytest.mark.parametrize("adapter", [Dicts(), TagsOnly()], ids=["everything", "tags only"])
def test_a_broken_record_costs_only_itself_and_is_counted(make_front, recording, adapter, caplog):
    walker = make_front().walker(adapter)
    result = walker.ingest([{"@boom": 1, "@id": 7}, TAGGED])
    walker.ingest_one({"@boom": 1, "@id": 8})  # never raises into the caller
    assert [u.group_id for u in recording.updates] == ["acme"]
    assert result.rejected == 1 and result.reasons == ["dict 7: RuntimeError('a broken record')"]
    assert recording.invalid == 2
    assert "dict 7: RuntimeError('a broken record')" in caplog.text


def test_invalid_and_ignored_records_are_counted_and_reasons_kept_for_the_answer(
    make_front, recording
):
    bad = [{"@id": i, "group_key": "company", "group_id": ["x"], "$set": {}} for i in range(7)]
    result = make_front().walker(TagsOnly()).read([*bad, {"group_key": "c", "group_id": "a"}])
    assert result.records == 8 and result.rejected == 7
    assert len(result.reasons) == 5  # the first few
    assert result.reasons[0] == "dict 0: group_id must be a string or a number, not list"
    assert recording.invalid == 7 and recording.ignored == 1
    assert recording.updates == []  # read() hands nothing to the consumer


def test_the_handlers_own_records_are_never_read(make_front, recording):
    walker = make_front().walker(LOG_RECORDS)
    ours = logging.makeLogRecord({"name": "mixpanel_otel.worker", **TAGGED})
    theirs = logging.makeLogRecord({"name": "app", **TAGGED})
    walker.ingest_one(ours)
    walker.ingest_one(theirs)
    assert len(recording.updates) == 1


def test_the_disabled_consumer_has_every_key_the_real_one_has():
    from mixpanel_otel.testing import capture_groups

    with capture_groups() as captured:
        real = captured.stats()
    disabled = DisabledConsumer("for a test").stats()
    assert set(real) <= set(disabled)
    assert set(disabled) - set(real) == {"discarded", "disabled"}
    assert disabled["disabled"] == 1 and not any(disabled[key] for key in real)
