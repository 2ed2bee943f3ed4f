"""gunicorn settings for an app that uses mixpanel-otel.

The consumer is fork-safe on its own: a worker forked from a master that had
already queued updates starts empty (the master keeps and delivers its own),
and each worker starts its background thread on first use. With
``--preload`` and OpenTelemetry, build the providers after the fork so each
worker has its own BatchSpanProcessor thread:

    gunicorn -c examples/gunicorn.conf.py app:app
"""

import logging

# The library's own warnings (delivery failing, what an exit left behind) beside gunicorn's.
logging.getLogger("mixpanel_otel").addHandler(logging.StreamHandler())

bind = "127.0.0.1:8000"
workers = 2
# Longer than MIXPANEL_OTEL_SHUTDOWN_TIMEOUT (5 s by default): a stopped worker
# delivers (or spools) what it holds within that, and is never killed mid-way.
graceful_timeout = 10


def post_fork(server, worker):
    # OpenTelemetry's SDK threads do not survive fork: set the providers up here.
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from mixpanel_otel import MixpanelSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    provider.add_span_processor(BatchSpanProcessor(MixpanelSpanExporter()))
    trace.set_tracer_provider(provider)


def worker_exit(server, worker):
    # Deliver what this worker still holds before it goes: the OpenTelemetry provider,
    # then every consumer, within one shutdown_timeout (spooled or reported lost after
    # it); the exit that follows only gets what is left of that budget.
    import mixpanel_otel

    mixpanel_otel.shutdown()
