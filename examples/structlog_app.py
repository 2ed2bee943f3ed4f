"""Group profiles from structlog: the processor reads the same keys as the handler.

mixpanel-otel serve &
MIXPANEL_TOKEN=local MIXPANEL_API_HOST=http://127.0.0.1:8765 python examples/structlog_app.py
mixpanel-otel profiles
"""

import structlog

from mixpanel_otel import MixpanelGroupProcessor

structlog.configure(
    processors=[
        structlog.processors.add_log_level,
        # strip=True removes the group keys before rendering (and from any
        # stdlib handler further down, so nothing is sent twice).
        MixpanelGroupProcessor(strip=True),
        structlog.processors.JSONRenderer(),
    ]
)

log = structlog.get_logger()
log.info("signup", group_key="company", group_id="globex", **{"$set": {"plan": "pro"}})
log.info(
    "feature used", group_key="company", group_id="globex", **{"$union": {"features": ["sso"]}}
)
log.info("no group here", user="ann")
