"""Rules files and lists: checked when loaded, mistakes named by rule and key. No network."""

from __future__ import annotations

import pytest

from mixpanel_otel import MixpanelException
from mixpanel_otel._exceptions import ConfigurationError
from mixpanel_otel._rules import RULES_ENV, load_rules

GOOD = {"group_key": "company", "group_id": "tenant.id", "set": {"plan": "tenant.plan"}}


def test_a_list_of_rules_is_checked_and_numbered_from_one():
    first, second = load_rules([GOOD, {**GOOD, "group_key": "team"}])
    assert (first.index, second.index) == (1, 2)
    assert (second.group_key, second.group_id) == ("team", "tenant.id")
    assert first.operations == [("$set", [("plan", "tenant.plan")])]


def test_operations_are_kept_in_wire_order_whatever_the_table_order():
    (rule,) = load_rules(
        [
            {
                "group_key": "c",
                "group_id": "t",
                "remove": {"r": "x"},
                "union": {"u": "x"},
                "set": {"s": "x"},
                "set_once": {"o": "@start_time"},
                "unset": ["gone"],
            }
        ]
    )
    assert [op for op, _ in rule.operations] == ["$set_once", "$set", "$union", "$remove"]
    assert rule.unset == ["gone"]


def test_a_toml_file(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(
        """
[[rule]]
group_key = "company"
group_id = "tenant.id"
when = { "http.route" = ["/checkout", "/cart"] }
[rule.set]
last_seen = "@end_time"
"""
    )
    (rule,) = load_rules(str(path))
    assert rule.when == {"http.route": ["/checkout", "/cart"]}
    assert rule.operations == [("$set", [("last_seen", "@end_time")])]
    assert load_rules(path)[0].group_key == "company"  # a PathLike too


@pytest.mark.parametrize(
    "raw, message",
    [
        ("not a table", "rule 1 is not a table but str"),
        ({**GOOD, "sett": {}}, "rule 1, key 'sett': unknown key"),
        ({**GOOD, "group_key": ""}, "rule 1, key 'group_key': must be a non-empty string"),
        ({"group_key": "c", "set": {"a": "b"}}, "rule 1, key 'group_id': must be a non-empty"),
        ({**GOOD, "when": ["x"]}, "rule 1, key 'when': must be a table"),
        ({**GOOD, "when": {"a": {"b": 1}}}, "rule 1, key 'when.a': must be a value or a list"),
        ({**GOOD, "set": {}}, "rule 1, key 'set': must be a non-empty table"),
        ({**GOOD, "set": {"p": 3}}, "rule 1, key 'set.p': must name an attribute"),
        ({**GOOD, "set": {"p": "@duration"}}, "rule 1, key 'set.p': unknown '@duration'"),
        ({**GOOD, "set": {"p" * 256: "a"}}, "property name over 255 characters"),
        ({**GOOD, "unset": "plan"}, "rule 1, key 'unset': must be a list of property names"),
        ({**GOOD, "unset": [""]}, "rule 1, key 'unset': must be a list of non-empty"),
        ({"group_key": "c", "group_id": "t"}, "rule 1, key 'set': the rule updates nothing"),
    ],
)
def test_a_mistake_names_the_rule_and_the_key(raw, message):
    with pytest.raises(MixpanelException, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_rules([raw])


def test_the_second_rule_is_named_as_the_second():
    with pytest.raises(MixpanelException, match="rule 2, key 'group_id'"):
        load_rules([GOOD, {"group_key": "c", "set": {"a": "b"}}])


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[rule]\n", "is not valid TOML"),
        ("[[rules]]\ngroup_key = 'c'\n", "unknown top-level key 'rules'"),
        ("rule = 3\n", "'rule' must be \\[\\[rule\\]\\] tables"),
    ],
)
def test_a_bad_file_is_named(tmp_path, text, message):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(MixpanelException, match=message) as caught:
        load_rules(str(path))
    assert str(path) in str(caught.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(MixpanelException, match="rules file .*nope.toml.*No such file"):
        load_rules(str(tmp_path / "nope.toml"))


@pytest.mark.parametrize("rules", [{"group_key": "c"}, 3])
def test_rules_that_are_neither_a_path_nor_a_list(rules):
    with pytest.raises(MixpanelException, match="rules must be a path to a TOML file or a list"):
        load_rules(rules)


def test_none_reads_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(RULES_ENV, raising=False)
    assert load_rules(None) == []
    path = tmp_path / "rules.toml"
    path.write_text("[[rule]]\ngroup_key = 'c'\ngroup_id = 't'\nunset = ['x']\n")
    monkeypatch.setenv(RULES_ENV, str(path))
    assert [rule.unset for rule in load_rules(None)] == [["x"]]


def test_a_bad_file_named_by_the_environment_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(RULES_ENV, str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigurationError) as caught:
        load_rules(None)
    assert caught.value.from_environment
    assert str(caught.value).startswith(f"{RULES_ENV}: rules file")
