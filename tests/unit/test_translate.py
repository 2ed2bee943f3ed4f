"""The translator: record conventions, the flat form and rules -> group updates. No I/O."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixpanel_otel import MixpanelException
from mixpanel_otel._rules import load_rules
from mixpanel_otel._translate import NoOperation, Translator, from_flat, from_tags
from mixpanel_otel._wire import Truncations

T = 1_700_000_000.0


def ops(updates):
    return [(u.group_key, u.group_id, u.op, u.payload) for u in updates]


def translate(translator, attributes, resource=None, special=None):
    errors: list[str] = []
    ignored: list[str] = []
    updates = translator.translate(
        attributes, T, resource or {}, special or (lambda name: None), errors, ignored
    )
    return updates, errors, ignored


class TestFromTags:
    def test_a_record_without_tags_is_not_a_group_record(self):
        assert from_tags({"msg": "hello"}, T) == []

    def test_one_operation(self):
        (update,) = from_tags({"group_key": "company", "group_id": "acme", "$set": {"a": 1}}, T)
        assert (update.group_key, update.group_id, update.op, update.payload) == (
            "company",
            "acme",
            "$set",
            {"a": 1},
        )
        assert update.time == T and update.meta is None

    def test_several_operations_in_wire_order_and_delete_alone(self):
        record = {
            "group_key": "company",
            "group_id": "acme",
            "$unset": ["x"],
            "$union": {"tags": "a"},
            "$set": {"a": 1},
            "$set_once": {"b": 2},
            "$remove": {"tags": "z"},
        }
        assert [u.op for u in from_tags(record, T)] == [
            "$set_once",
            "$set",
            "$union",
            "$remove",
            "$unset",
        ]
        assert [u.op for u in from_tags({**record, "$delete": True}, T)] == ["$delete"]

    def test_union_wraps_a_scalar(self):
        (update,) = from_tags({"group_key": "c", "group_id": 7, "$union": {"tags": "a"}}, T)
        assert update.payload == {"tags": ["a"]}

    def test_meta_time_is_the_update_time_and_other_meta_is_merged(self):
        record = {"group_key": "c", "group_id": "a", "$set": {"x": 1}, "$time": 5, "$ip": "1.2.3.4"}
        (update,) = from_tags(record, T)
        assert update.time == 5
        assert update.meta == {"$ip": "1.2.3.4"}

    def test_tags_without_an_operation_are_context_not_an_error(self):
        with pytest.raises(NoOperation):
            from_tags({"group_key": "company", "group_id": "acme"}, T)
        with pytest.raises(NoOperation):
            from_tags({"group_key": "company"}, T)

    @pytest.mark.parametrize(
        "record, missing",
        [
            ({"group_key": "c", "$set": {"a": 1}}, "group_id"),
            ({"group_id": "a", "$set": {"a": 1}}, "group_key"),
            ({"group_key": "c", "group_id": None, "$set": {"a": 1}}, "group_id"),
        ],
    )
    def test_an_operation_beside_one_tag_names_the_missing_one(self, record, missing):
        with pytest.raises(MixpanelException, match=f"without {missing}"):
            from_tags(record, T)

    def test_with_errors_a_bad_operation_costs_only_itself(self):
        errors: list[str] = []
        record = {
            "group_key": "c",
            "group_id": "a",
            "$set": {"ok": 1},
            "$union": {"x": float("nan")},
        }
        assert ops(from_tags(record, T, errors=errors)) == [("c", "a", "$set", {"ok": 1})]
        assert errors == ["$union: property 'x': nan is not a valid JSON number"]


class TestFromFlat:
    def test_every_operation(self):
        attributes = {
            "mixpanel.group_key": "company",
            "mixpanel.group_id": "acme",
            "mixpanel.$set.plan": "pro",
            "mixpanel.$set_once.first": "x",
            "mixpanel.$union.tags": ("a", "b"),
            "mixpanel.$remove.tags": "z",
            "mixpanel.$unset": ("old",),
            "http.route": "/ignored",
        }
        assert ops(from_flat(attributes, T)) == [
            ("company", "acme", "$set_once", {"first": "x"}),
            ("company", "acme", "$set", {"plan": "pro"}),
            ("company", "acme", "$union", {"tags": ["a", "b"]}),
            ("company", "acme", "$remove", {"tags": "z"}),
            ("company", "acme", "$unset", ["old"]),
        ]

    def test_delete_only_when_true(self):
        base = {"mixpanel.group_key": "c", "mixpanel.group_id": "a", "mixpanel.$set.x": 1}
        assert [u.op for u in from_flat({**base, "mixpanel.$delete": True}, T)] == ["$delete"]
        assert [u.op for u in from_flat({**base, "mixpanel.$delete": False}, T)] == ["$set"]

    def test_meta(self):
        attributes = {
            "mixpanel.group_key": "c",
            "mixpanel.group_id": "a",
            "mixpanel.$set.x": 1,
            "mixpanel.$ip": "1.2.3.4",
        }
        assert from_flat(attributes, T)[0].meta == {"$ip": "1.2.3.4"}

    @pytest.mark.parametrize("name", ["mixpanel.$add.x", "mixpanel.$set", "mixpanel.$unset.x"])
    def test_an_unknown_attribute_is_named(self, name):
        attributes = {"mixpanel.group_key": "c", "mixpanel.group_id": "a", name: 1}
        with pytest.raises(MixpanelException, match="unknown attribute"):
            from_flat(attributes, T)

    def test_half_tagged_names_the_flat_tag(self):
        with pytest.raises(MixpanelException, match="without mixpanel.group_id"):
            from_flat({"mixpanel.group_key": "c", "mixpanel.$set.x": 1}, T)


RULES = [
    {
        "group_key": "company",
        "group_id": "tenant.id",
        "when": {"http.route": ["/checkout", "/cart"]},
        "set": {"plan": "tenant.plan", "last_service": "service.name", "op": "@name"},
        "set_once": {"first_seen": "@start_time"},
        "union": {"services": "service.name"},
    },
]


class TestTranslator:
    def test_without_rules_it_reads_tags_and_the_flat_form(self):
        translator = Translator()
        record = {
            "group_key": "company",
            "group_id": "a",
            "$set": {"x": 1},
            "mixpanel.group_key": "company",
            "mixpanel.group_id": "b",
            "mixpanel.$set.y": 2,
        }
        updates, errors, ignored = translate(translator, record)
        assert ops(updates) == [
            ("company", "a", "$set", {"x": 1}),
            ("company", "b", "$set", {"y": 2}),
        ]
        assert errors == ignored == []

    def test_without_rules_the_resource_and_specials_are_never_read(self):
        def special(name):
            raise AssertionError("read a special")

        translator = Translator()
        updates, _, _ = translate(translator, {"tenant.id": "acme"}, special=special)
        assert updates == []

    def test_a_rule_reads_the_record_then_the_resource_and_specials(self):
        translator = Translator(load_rules(RULES))
        specials = {"@name": "POST /checkout", "@start_time": "2024-01-02T03:04:05"}
        updates, errors, _ = translate(
            translator,
            {"tenant.id": ("acme",), "http.route": "/cart", "tenant.plan": "pro"},
            resource={"service.name": "shop", "tenant.plan": "free"},
            special=specials.get,
        )
        assert errors == []
        assert ops(updates) == [
            ("company", "acme", "$set_once", {"first_seen": "2024-01-02T03:04:05"}),
            (
                "company",
                "acme",
                "$set",
                {"plan": "pro", "last_service": "shop", "op": "POST /checkout"},
            ),
            ("company", "acme", "$union", {"services": ["shop"]}),
        ]

    @pytest.mark.parametrize(
        "attributes",
        [{"http.route": "/checkout"}, {"tenant.id": "acme", "http.route": "/home"}],
        ids=["no group id", "when does not match"],
    )
    def test_a_rule_that_does_not_apply_gives_nothing(self, attributes):
        updates, errors, ignored = translate(Translator(load_rules(RULES)), attributes)
        assert updates == [] and errors == [] and ignored == []

    def test_a_missing_source_leaves_the_property_out(self):
        rules = load_rules([{"group_key": "c", "group_id": "t", "set": {"a": "x", "b": "y"}}])
        updates, _, _ = translate(Translator(rules), {"t": "acme", "x": 1})
        assert ops(updates) == [("c", "acme", "$set", {"a": 1})]

    def test_a_bad_rule_value_is_labelled_with_the_rule_and_costs_only_itself(self):
        rules = load_rules(
            [
                {"group_key": "c", "group_id": "t", "set": {"bad": "x"}},
                {"group_key": "c", "group_id": "t", "set": {"good": "y"}},
            ]
        )
        updates, errors, _ = translate(Translator(rules), {"t": "acme", "x": float("inf"), "y": 2})
        assert ops(updates) == [("c", "acme", "$set", {"good": 2})]
        assert errors == ["rule 1: $set: property 'bad': inf is not a valid JSON number"]

    def test_a_bad_group_id_from_a_rule_is_labelled(self):
        rules = load_rules([{"group_key": "c", "group_id": "t", "set": {"a": "x"}}])
        _, errors, _ = translate(Translator(rules), {"t": True, "x": 1})
        assert errors == ["rule 1: group_id must be a string or a number, not bool"]

    def test_bad_tags_do_not_cost_the_rules_nor_the_reverse(self):
        rules = load_rules([{"group_key": "c", "group_id": "t", "set": {"a": "x"}}])
        record = {"group_key": "c", "group_id": ["x"], "$set": {"a": 1}, "t": "acme", "x": 1}
        updates, errors, _ = translate(Translator(rules), record)
        assert ops(updates) == [("c", "acme", "$set", {"a": 1})]
        assert len(errors) == 1 and "group_id" in errors[0]

    def test_tags_without_an_operation_are_reported_as_ignored(self):
        updates, errors, ignored = translate(Translator(), {"group_key": "c", "group_id": "a"})
        assert updates == [] and errors == [] and len(ignored) == 1

    def test_long_strings_are_cut_and_counted_on_the_translators_counter(self):
        counter = Truncations()
        updates, _, _ = translate(
            Translator(counter=counter),
            {"group_key": "c", "group_id": "a", "$set": {"s": "é" * 200}},
        )
        assert len(updates[0].payload["s"].encode()) <= 255
        assert counter.count == 1


# -- properties ------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=80),
)
NAMES = st.text(st.characters(blacklist_characters="."), min_size=1, max_size=20)
PROPERTIES = st.dictionaries(NAMES, SCALARS, min_size=1, max_size=4)
OPERATIONS = st.fixed_dictionaries(
    {},
    optional={
        "$set": PROPERTIES,
        "$set_once": PROPERTIES,
        "$union": PROPERTIES,
        "$remove": PROPERTIES,
        "$unset": st.lists(NAMES, min_size=1, max_size=3, unique=True),
    },
).filter(bool)
GROUP_IDS = st.one_of(st.text(min_size=1, max_size=20), st.integers(0, 10**9))
#: A sixth of the profile's examples: these records are costly to draw (the unit tests'
#: budget is 15 s); HYPOTHESIS_PROFILE=deep still runs hundreds.
EXAMPLES = settings(
    max_examples=max(30, settings.default.max_examples // 6),
    deadline=None,  # a loaded 2-core box
    suppress_health_check=[HealthCheck.too_slow],
)


@EXAMPLES
@given(OPERATIONS, GROUP_IDS)
def test_the_flat_form_and_the_tags_give_the_same_updates(operations, group_id):
    tags = {"group_key": "company", "group_id": group_id, **operations}
    flat = {"mixpanel.group_key": "company", "mixpanel.group_id": group_id}
    for op, payload in operations.items():
        if op == "$unset":
            flat["mixpanel.$unset"] = payload
        else:
            flat.update({f"mixpanel.{op}.{name}": value for name, value in payload.items()})
    assert ops(from_tags(tags, T)) == ops(from_flat(flat, T))


ANY_VALUE = st.recursive(
    SCALARS | st.floats() | st.binary(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
KEYS = st.sampled_from(
    [
        "group_key",
        "group_id",
        "$set",
        "$set_once",
        "$union",
        "$remove",
        "$unset",
        "$delete",
        "$time",
        "$ip",
        "mixpanel.group_key",
        "mixpanel.group_id",
        "mixpanel.$set.a",
        "mixpanel.$union.b",
        "mixpanel.$unset",
        "mixpanel.$delete",
        "mixpanel.$bogus",
        "tenant.id",
        "x",
    ]
)


@EXAMPLES
@given(st.dictionaries(KEYS, ANY_VALUE, max_size=8))
def test_no_record_makes_the_translator_raise(attributes):
    rules = load_rules([{"group_key": "c", "group_id": "tenant.id", "set": {"p": "x"}}])
    for translator in (Translator(), Translator(rules)):
        updates, errors, ignored = translate(translator, attributes)
        for update in updates:
            assert update.op in ("$set", "$set_once", "$union", "$remove", "$unset", "$delete")
