"""A tiny WSGI app for gunicorn.conf.py: spans and log records become group updates.

gunicorn -c examples/gunicorn.conf.py --chdir examples gunicorn_app:app
"""

import logging
import os

from opentelemetry import trace

from mixpanel_otel import MixpanelGroupHandler

logging.getLogger().addHandler(MixpanelGroupHandler())
logging.getLogger().setLevel(logging.INFO)
log = logging.getLogger("shop")


def app(environ, start_response):
    tenant = environ.get("HTTP_X_TENANT_ID", "unknown")
    with trace.get_tracer("shop").start_as_current_span("request") as span:
        # The flat form on a span, read by the MixpanelSpanExporter set up in post_fork.
        span.set_attribute("mixpanel.group_key", "company")
        span.set_attribute("mixpanel.group_id", tenant)
        span.set_attribute("mixpanel.$union.workers", [str(os.getpid())])
    log.info("request", extra={"group_key": "company", "group_id": tenant, "$set": {"seen": True}})
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"hello {tenant} from {os.getpid()}\n".encode()]
