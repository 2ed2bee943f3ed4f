"""One validation of the API host and the token, for ``check`` and every front end."""

from __future__ import annotations

import logging

import pytest

from mixpanel_otel import GroupClient, MixpanelException, get_consumer
from mixpanel_otel._config import base_url_of, resolve_target


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in ("MIXPANEL_TOKEN", "MIXPANEL_API_HOST", "MIXPANEL_REGION"):
        monkeypatch.delenv(name, raising=False)


class TestBaseUrl:
    @pytest.mark.parametrize(
        ("api_host", "base_url"),
        [
            ("api-eu.mixpanel.com", "https://api-eu.mixpanel.com"),
            ("https://api.mixpanel.com/", "https://api.mixpanel.com"),
            ("https://api.mixpanel.com/groups", "https://api.mixpanel.com"),
            ("http://127.0.0.1:8765/groups/", "http://127.0.0.1:8765"),
            ("https://proxy.example/mixpanel/track", "https://proxy.example/mixpanel"),
            ("https://proxy.example/mixpanel", "https://proxy.example/mixpanel"),
            ("127.0.0.1:8765", "http://127.0.0.1:8765"),
            ("localhost:8765", "http://localhost:8765"),
            ("[::1]:8765", "http://[::1]:8765"),
            ("example.com:8443", "https://example.com:8443"),
        ],
    )
    def test_accepted_forms(self, api_host, base_url):
        assert base_url_of(api_host) == base_url

    @pytest.mark.parametrize(
        ("api_host", "reason"),
        [
            ("htp://127.0.0.1:8765", "scheme 'htp' is not http or https"),
            ("ftp://api.mixpanel.com", "scheme 'ftp' is not http or https"),
            ("http://", "no host name"),
            ("http://api.mixpanel.com:port", "port is not a number"),
            ("https://api.mixpanel.com/?x=1", "query string"),
            ("api mixpanel com", "no spaces"),
            ("https://user:pw@api.mixpanel.com", "user names"),
        ],
    )
    def test_refused_forms(self, api_host, reason):
        with pytest.raises(ValueError, match=reason):
            base_url_of(api_host)


class TestEveryFrontEndValidates:
    def test_an_argument_raises_at_construction(self):
        with pytest.raises(MixpanelException, match="api_host='htp://127.0.0.1:8765': scheme"):
            GroupClient("t", api_host="htp://127.0.0.1:8765")
        with pytest.raises(MixpanelException, match="scheme 'htp'"):
            get_consumer("t", "htp://127.0.0.1:8765")

    def test_a_variable_disables_with_one_error(self, monkeypatch, caplog):
        monkeypatch.setenv("MIXPANEL_TOKEN", "t")
        monkeypatch.setenv("MIXPANEL_API_HOST", "htp://127.0.0.1:8765")
        with caplog.at_level(logging.ERROR, logger="mixpanel_otel"):
            client = GroupClient()
        assert client.disabled is not None and "MIXPANEL_API_HOST=" in client.disabled
        assert "scheme 'htp'" in client.disabled

    def test_a_token_with_whitespace_is_refused(self, monkeypatch):
        with pytest.raises(MixpanelException, match="token has whitespace around it"):
            GroupClient(" t")
        monkeypatch.setenv("MIXPANEL_TOKEN", "t\n")
        client = GroupClient(api_host="127.0.0.1:9")
        assert client.disabled is not None
        assert "MIXPANEL_TOKEN has whitespace around it" in client.disabled

    def test_the_shared_consumer_is_one_per_base_url(self):
        # 127.0.0.1:9 and its URL with the endpoint path name one consumer
        same = [resolve_target("t", h)[1] for h in ("127.0.0.1:9", "http://127.0.0.1:9/groups")]
        assert same == ["http://127.0.0.1:9", "http://127.0.0.1:9"]
