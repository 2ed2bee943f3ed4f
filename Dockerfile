# The mixpanel-otel gateway, built from this checkout (the package is not on a registry):
#
#   docker build -t mixpanel-otel-gateway .
#   docker run --rm -p 4317:4317 -p 4318:4318 -v mixpanel-spool:/spool \
#     -e MIXPANEL_TOKEN -e MIXPANEL_OTEL_GATEWAY_AUTH_TOKENS mixpanel-otel-gateway
#
# Arguments after the image name go to `mixpanel-otel gateway` (try `--help`).

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mixpanel_otel ./mixpanel_otel
# The package with its gateway and traits dependencies as wheels (a trait file with
# count_distinct or a percentile needs the traits extra): the final image needs no compiler.
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[gateway,traits]'

FROM python:3.12-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'mixpanel-otel[gateway,traits]' \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway \
    && mkdir /spool && chown gateway /spool
# Inside a container the gateway must listen beyond loopback for -p to reach it, so it
# starts only with authentication (bearer tokens, or mutual TLS; docs/gateway.md,
# "Securing the gateway"), or with --allow-unauthenticated on a network you trust.
ENV MIXPANEL_OTEL_SPOOL_DIR=/spool \
    MIXPANEL_OTEL_GATEWAY_HOST=0.0.0.0 \
    MIXPANEL_OTEL_GATEWAY_HEALTH_SOCKET=/tmp/mixpanel-otel-gateway.sock \
    PYTHONUNBUFFERED=1
USER gateway
VOLUME ["/spool"]
EXPOSE 4317 4318
# Healthy while the gateway serves; unhealthy while it stops or when nothing answers.
# The gateway answers /health on the Unix socket MIXPANEL_OTEL_GATEWAY_HEALTH_SOCKET names,
# in plain HTTP whatever its ports and TLS (arguments after the image name included), and
# `mixpanel-otel health` reads the same variable: no port, scheme or client certificate
# to repeat here.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["mixpanel-otel", "health"]
# exec form: the gateway is PID 1, so the runtime's SIGTERM reaches it (a clean stop).
ENTRYPOINT ["mixpanel-otel", "gateway"]
