"""The sink's pages' values: JSON cut between tokens, floats rounded, tokens masked."""

from __future__ import annotations

import base64
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mixpanel_otel.sink.access import Access
from mixpanel_otel.sink.display import preview, short_float
from mixpanel_otel.sink.redact import redact

_MORE = re.compile(r"(, )?\u2026 \d+ more(?=[}\]])")

_TEXT = st.text(st.characters(blacklist_characters="\u2026", blacklist_categories=("Cs",)))
_SCALARS = st.none() | st.booleans() | st.integers() | _TEXT
_FLOATS = st.floats(allow_nan=False, allow_infinity=False)


def _json(scalars):
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=8) | st.dictionaries(_TEXT, inner, max_size=8),
        max_leaves=30,
    )


class TestPreview:
    @settings(max_examples=150)
    @given(_json(_SCALARS | _FLOATS), st.integers(0, 400))
    def test_never_cuts_inside_a_token(self, value, width):
        shown = preview(value, width)
        json.loads(_MORE.sub("", shown))  # raises when a key, number or string was cut

    @settings(max_examples=150)
    @given(_json(_SCALARS))
    def test_a_value_that_fits_is_whole(self, value):
        whole = json.dumps(value, ensure_ascii=False, sort_keys=True)
        assert preview(value, len(whole) + 10) == whole

    def test_floats_keep_six_significant_digits(self):
        assert short_float(68.03059450035343) == "68.0306"
        assert short_float(0.5) == "0.5" and short_float(1e-9) == "1e-09"
        assert short_float(1000000.0) == "1000000.0", "a float stays a float"
        assert short_float(123456789.25) == "123456789.2"
        assert short_float(1733572345.123456) == "1733572345.1"


SECRET = "s3cr3t-project-token-0123"


class TestRedact:
    def test_messages_lose_their_token_however_they_were_kept(self):
        messages = [
            {"$token": SECRET, "$group_id": "acme"},
            {"event": "signup", "properties": {"token": SECRET, "plan": "pro"}},
        ]
        text = json.dumps(messages)
        forms = [messages, text, json.dumps(text), text.replace("$", "\\u0024")]
        forms.append(base64.b64encode(text.encode()).decode())
        for form in forms:
            for cut in (len(str(form)), 60, 20):
                shown = redact(form[:cut] if isinstance(form, str) else form)
                assert SECRET[:6] not in json.dumps(shown).replace("\\", ""), (form, cut)

    def test_a_property_named_token_outside_properties_is_kept(self):
        assert redact({"$set": {"token": "a-user-value"}}) == {"$set": {"token": "a-user-value"}}

    def test_the_sinks_own_token_is_masked_in_any_text(self):
        assert redact("not json " + SECRET, SECRET) == "not json <token>"


class TestAccess:
    def test_host_names(self):
        access = Access("127.0.0.1", ["sink"])
        for host in ("127.0.0.1:8765", "localhost", "[::1]:1", "SINK:80", "127.1.2.3"):
            assert access.host_refusal(host) is None, host
        for host in ("evil.example", "evil.example:8765", "", None, "sink.evil.example"):
            assert access.host_refusal(host), host

    def test_browser_origins(self):
        access = Access("127.0.0.1")
        own = {"host": "127.0.0.1:8765", "origin": "http://127.0.0.1:8765"}
        assert access.origin_refusal(own) is None
        assert access.origin_refusal({"host": "127.0.0.1:8765"}) is None  # an SDK
        assert access.origin_refusal({"origin": "http://localhost:3000"}) is None
        assert access.origin_refusal({"origin": "http://evil.example"})
        assert access.origin_refusal({"origin": "null"})
        assert access.origin_refusal({"origin": "javascript:alert(1)"})
        assert access.origin_refusal({"sec-fetch-site": "cross-site"})
        assert access.origin_refusal({"sec-fetch-site": "none"}) is None
