"""A new user's second hour (issue 22): what the first real configuration runs into."""

from __future__ import annotations

from mixpanel_otel import GroupClient
from mixpanel_otel.testing import reset_consumers

from .conftest import TOKEN


def test_an_api_host_with_the_endpoint_path_posts_to_groups_once(sink):
    client = GroupClient(TOKEN, api_host=f"{sink.url}/groups", flush_interval=0.05)
    try:
        client.group_set("company", "acme", {"plan": "pro"})
        assert client.flush(10)
        assert sink.profile("company", "acme") == {"plan": "pro"}
    finally:
        reset_consumers()
