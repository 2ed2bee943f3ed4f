"""The official mixpanel SDK with background, batched delivery from get_consumer().

    mixpanel-otel serve &
    export MIXPANEL_TOKEN=local MIXPANEL_API_HOST=http://127.0.0.1:8765
    python examples/mixpanel_sdk_background.py

Calls return at once (no HTTP on the caller's thread); the shared consumer
batches, retries and flushes at exit. ``SDKSerializer`` encodes values as
GroupClient does: Decimal as a number, datetimes in UTC (the SDK's own encoder
refuses a Decimal and keeps a datetime's own time zone).
"""

import datetime
import decimal
import os

from mixpanel import Mixpanel

from mixpanel_otel import SDKSerializer, get_consumer

token = os.environ["MIXPANEL_TOKEN"]
mp = Mixpanel(token, consumer=get_consumer(token), serializer=SDKSerializer)
renewed = datetime.datetime(
    2025, 3, 1, 9, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=1))
)
mp.group_set(
    "company",
    "initech",
    {"plan": "free", "seats": 12, "mrr": decimal.Decimal("99.50"), "renewed": renewed},
)
mp.group_union("company", "initech", {"integrations": ["slack"]})
mp.track("user-42", "Report exported", {"company": "initech"})
