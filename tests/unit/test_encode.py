"""Form quoting of wire text: the fast path must equal ``urllib.parse.quote_plus``."""

from __future__ import annotations

import json
from urllib.parse import quote_plus

from hypothesis import given
from hypothesis import strategies as st

from mixpanel_otel._delivery.encode import quote_form

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(st.text())
def test_any_text_is_quoted_as_quote_plus_does(text):
    assert quote_form(text) == quote_plus(text)


@given(_json)
def test_json_text_is_quoted_as_quote_plus_does(value):
    text = json.dumps(value, separators=(",", ":"))
    assert quote_form(text) == quote_plus(text)
