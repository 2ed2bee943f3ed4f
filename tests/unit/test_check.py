"""``check``'s report: every failure in the verdict, answers that are not Mixpanel's."""

from __future__ import annotations

from mixpanel_otel._check import Check, _excerpt


class TestVerdict:
    def test_one_failure_is_one_line(self) -> None:
        check = Check()
        check.step("token", "set")
        check.fail("rules", "rules: rule 1, key 'group_id': missing")
        assert check.render().splitlines()[-2:] == [
            "  FAIL  rules: rule 1, key 'group_id': missing",
            "FAILED: rules: rule 1, key 'group_id': missing",
        ]

    def test_several_failures_are_all_named(self) -> None:
        check = Check()
        check.fail("rules", "rule 1: a")
        check.fail("rules", "trait 2: b")
        check.fail("token", "refused")
        assert not check.ok
        assert check.render().splitlines()[-4:] == [
            "FAILED: 3 problems:",
            "  - rules: rule 1: a",
            "  - rules: trait 2: b",
            "  - token: refused",
        ]

    def test_no_failure_is_ok(self) -> None:
        assert Check().ok and Check().render().endswith(
            "OK: this configuration can deliver group updates"
        )


class TestExcerpt:
    def test_an_html_page_is_named_by_its_title(self) -> None:
        page = "<!DOCTYPE html>\n<html><head><title>\n  Access &amp; Denied\n</title>"
        assert _excerpt(page) == "an HTML page titled 'Access & Denied'"

    def test_an_html_page_without_a_title_shows_its_text(self) -> None:
        page = "<html>\n<body>\n<h1>Not\nFound</h1>\n<p>" + "more " * 50 + "</p></body></html>"
        shown = _excerpt(page)
        assert shown.startswith("an HTML page: 'Not Found more more")
        assert shown.endswith("...'") and "\n" not in shown and "<" not in shown
        assert len(shown) < 130

    def test_text_is_one_clipped_line(self) -> None:
        assert _excerpt("upstream\nconnect error") == "'upstream connect error'"
        assert _excerpt("") == "an empty body"
        assert len(_excerpt("x" * 1000)) == 102  # 100 characters, quoted
