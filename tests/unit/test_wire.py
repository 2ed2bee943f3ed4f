"""Mixpanel's wire facts: values, groups, updates and messages. No I/O."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixpanel_otel import MixpanelException
from mixpanel_otel._wire import (
    Truncations,
    check_group,
    group_id_key,
    group_updates,
    iso_utc,
    make_update,
    normalize_meta,
    normalize_value,
    updates_from_message,
    wire_message,
)

EXAMPLES = settings(
    max_examples=max(30, settings.default.max_examples // 6),
    deadline=None,  # a loaded 2-core box
    suppress_health_check=[HealthCheck.too_slow],
)


class TestValues:
    @pytest.mark.parametrize(
        "value, expected",
        [
            (dt.datetime(2024, 1, 2, 3, 4, 5, 999), "2024-01-02T03:04:05"),
            (
                dt.datetime(2024, 1, 2, 5, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2))),
                "2024-01-02T03:04:05",
            ),
            (dt.date(2024, 1, 2), "2024-01-02T00:00:00"),
            (decimal.Decimal("3"), 3),
            (decimal.Decimal("2.5"), 2.5),
            (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
            ((1, "a"), [1, "a"]),
            ({"a": (True, None)}, {"a": [True, None]}),
        ],
        ids=["naive", "aware", "date", "decimal int", "decimal", "uuid", "tuple", "nested"],
    )
    def test_normalised_as_mixpanel_stores_it(self, value, expected):
        assert normalize_value(value) == expected

    def test_a_set_becomes_a_list(self):
        assert sorted(normalize_value({2, 1})) == [1, 2]

    @pytest.mark.parametrize(
        "value, reason",
        [
            (float("nan"), "not a valid JSON number"),
            (float("inf"), "not a valid JSON number"),
            (decimal.Decimal("NaN"), "not a valid JSON number"),
            (object(), "not JSON serializable"),
            (b"bytes", "not JSON serializable"),
            ([[[["deep"]]]], "nested deeper than 3"),
        ],
    )
    def test_what_mixpanel_cannot_store_is_refused_with_the_reason(self, value, reason):
        with pytest.raises(MixpanelException, match=reason):
            normalize_value(value)

    def test_iso_utc(self):
        assert iso_utc(0) == "1970-01-01T00:00:00"
        assert iso_utc(None) is None


@EXAMPLES
@given(st.text(max_size=300))
def test_a_string_is_cut_to_255_bytes_at_a_character_boundary_and_counted(text):
    counter = Truncations()
    cut = normalize_value(text, counter)
    assert len(cut.encode("utf-8", "surrogatepass")) <= 255
    assert text.startswith(cut)
    long = len(text.encode("utf-8", "surrogatepass")) > 255
    assert counter.count == int(long)
    assert (cut == text) != long


class TestGroups:
    @pytest.mark.parametrize(
        "group_key, group_id, reason",
        [
            ("", "a", "group_key must be a non-empty string"),
            (None, "a", "group_key must be a non-empty string"),
            ("c", "", "group_id must be a non-empty string"),
            ("c", True, "group_id must be a string or a number, not bool"),
            ("c", ["a"], "group_id must be a string or a number, not list"),
            ("c", float("nan"), "is not a valid number"),
        ],
    )
    def test_a_group_mixpanel_cannot_key_is_refused(self, group_key, group_id, reason):
        with pytest.raises(MixpanelException, match=reason):
            check_group(group_key, group_id)

    def test_a_uuid_group_id_is_sent_as_its_text(self):
        assert check_group("c", uuid.UUID(int=0)) == "00000000-0000-0000-0000-000000000000"

    def test_42_and_42_point_0_and_the_string_name_one_profile(self):
        assert group_id_key(42) == group_id_key(42.0) == group_id_key("42") == "42"
        assert group_id_key(42.5) == "42.5"


class TestUpdates:
    def test_unknown_operation(self):
        with pytest.raises(MixpanelException, match="unknown operation"):
            make_update("c", "a", "$add", {"n": 1}, 0.0)

    @pytest.mark.parametrize(
        "op, payload, reason",
        [
            ("$set", ["a"], r"\$set: properties must be a dict, not list"),
            ("$set", {1: "a"}, "property name 1 is not a string"),
            ("$set", {"x" * 256: 1}, "is over 255 characters"),
            ("$unset", "plan", r"\$unset takes a list of property names, not str"),
            ("$unset", [], "at least one property name"),
            ("$unset", [""], "is not a non-empty string"),
        ],
    )
    def test_a_bad_payload_names_the_operation_and_the_reason(self, op, payload, reason):
        with pytest.raises(MixpanelException, match=reason):
            make_update("c", "a", op, payload, 0.0)

    def test_the_payload_is_a_copy_the_pipeline_owns(self):
        properties = {"a": [1]}
        update = make_update("c", "a", "$set", properties, 0.0)
        update.payload["b"] = 2
        assert properties == {"a": [1]}

    def test_union_wraps_scalars_and_delete_sends_an_empty_string(self):
        assert make_update("c", "a", "$union", {"t": "x", "u": ["y"]}, 0.0).payload == {
            "t": ["x"],
            "u": ["y"],
        }
        assert make_update("c", "a", "$delete", None, 0.0).payload == ""

    def test_several_operations_become_several_updates_in_order(self):
        operations = {"$unset": ["u"], "$set": {"s": 1}, "$set_once": {"o": 1}}
        updates = group_updates("c", "a", operations, None, 1.0)
        assert [u.op for u in updates] == ["$set_once", "$set", "$unset"]
        assert [u.op for u in group_updates("c", "a", {**operations, "$delete": 1}, None, 1.0)] == [
            "$delete"
        ]

    def test_meta_time_is_the_update_time(self):
        (update,) = group_updates("c", "a", {"$set": {"s": 1}}, {"$time": 9, "$ip": "0"}, 1.0)
        assert update.time == 9 and update.meta == {"$ip": "0"}

    def test_meta_time_must_be_a_number(self):
        with pytest.raises(MixpanelException, match="meta \\$time must be a number"):
            normalize_meta({"$time": "yesterday"})

    def test_with_errors_the_good_operations_are_kept(self):
        errors: list[str] = []
        updates = group_updates(
            "c", "a", {"$set": {"s": 1}, "$unset": "oops"}, None, 1.0, errors=errors
        )
        assert [u.op for u in updates] == ["$set"]
        assert errors == ["$unset: $unset takes a list of property names, not str"]

    def test_with_errors_a_bad_group_fails_every_operation_at_once(self):
        with pytest.raises(MixpanelException, match="group_id"):
            group_updates("c", None, {"$set": {"s": 1}}, None, 1.0, errors=[])

    def test_no_operation_at_all(self):
        with pytest.raises(MixpanelException, match="no operation"):
            group_updates("c", "a", {}, None, 1.0)


class TestMessages:
    def test_the_official_sdks_message_key_for_key(self):
        update = make_update("company", "acme", "$set", {"plan": "pro"}, 1.5, {"$ip": "0"})
        assert wire_message("tok", update) == {
            "$token": "tok",
            "$time": 1.5,
            "$group_key": "company",
            "$group_id": "acme",
            "$set": {"plan": "pro"},
            "$ip": "0",
        }

    def test_a_group_update_message_is_taken_apart(self):
        message = {
            "$group_key": "c",
            "$group_id": "a",
            "$set": {"s": 1},
            "$unset": ["u"],
            "$time": 3,
            "$ignore_time": True,
        }
        updates = updates_from_message(message)
        assert [(u.op, u.time, u.meta) for u in updates] == [
            ("$set", 3, {"$ignore_time": True}),
            ("$unset", 3, {"$ignore_time": True}),
        ]

    @pytest.mark.parametrize(
        "message, reason",
        [
            ([], "message must be a dict, not list"),
            ({"$group_id": "a", "$set": {}}, "message has no \\$group_key"),
        ],
    )
    def test_a_message_that_is_not_one_is_named(self, message, reason):
        with pytest.raises(MixpanelException, match=reason):
            updates_from_message(message)


JSON_LIKE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=300)
    | st.datetimes()
    | st.decimals()
    | st.uuids(),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=10), inner, max_size=3)
        | st.tuples(inner)
    ),
    max_leaves=10,
)


@EXAMPLES
@given(st.dictionaries(st.text(max_size=300), JSON_LIKE, max_size=4))
def test_what_make_update_accepts_is_strict_json_within_mixpanels_limits(properties):
    try:
        update = make_update("company", "acme", "$set", properties, 1.0)
    except MixpanelException:
        return
    text = json.dumps(wire_message("t", update), allow_nan=False)

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)

    assert all(len(s.encode("utf-8", "surrogatepass")) <= 255 for s in strings(update.payload))
    assert all(len(name) <= 255 for name in update.payload)
    assert json.loads(text)["$set"] == json.loads(json.dumps(update.payload))
