"""The official mixpanel SDK with background, batched delivery from get_consumer().

    mixpanel-otel serve &
    export MIXPANEL_TOKEN=local MIXPANEL_API_HOST=http://127.0.0.1:8765
    python examples/mixpanel_sdk_background.py

Calls return at once (no HTTP on the caller's thread); the shared consumer
batches, retries and flushes at exit.
"""

import os

from mixpanel import Mixpanel

from mixpanel_otel import get_consumer

token = os.environ["MIXPANEL_TOKEN"]
mp = Mixpanel(token, consumer=get_consumer(token))
mp.group_set("company", "initech", {"plan": "free", "seats": 12})
mp.group_union("company", "initech", {"integrations": ["slack"]})
mp.track("user-42", "Report exported", {"company": "initech"})
