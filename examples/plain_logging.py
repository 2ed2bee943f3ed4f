"""Group profiles from ordinary stdlib logging: one handler on the root logger.

mixpanel-otel serve &                                   # the local sink
MIXPANEL_TOKEN=local MIXPANEL_API_HOST=http://127.0.0.1:8765 python examples/plain_logging.py
mixpanel-otel profiles
"""

import logging

from mixpanel_otel import MixpanelGroupHandler

logging.basicConfig(level=logging.INFO)
logging.getLogger().addHandler(MixpanelGroupHandler())  # token and host from the environment

log = logging.getLogger("billing")
log.info("an ordinary record: not a group update, ignored by the handler")
log.info(
    "plan changed",
    extra={"group_key": "company", "group_id": "acme", "$set": {"plan": "enterprise"}},
)
log.info(
    "first purchase",
    extra={
        "group_key": "company",
        "group_id": "acme",
        "$set_once": {"first_purchase": "2024-05-01T10:00:00"},
        "$union": {"products": ["analytics", "sso"]},
    },
)
log.info("seat removed", extra={"group_key": "company", "group_id": "acme", "$unset": ["trial"]})
# No flush or close needed: everything pending is delivered at exit (bounded).
