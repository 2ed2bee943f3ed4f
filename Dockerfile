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
# The package and its gateway dependencies as wheels: the final image needs no compiler.
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[gateway]'

FROM python:3.12-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels 'mixpanel-otel[gateway]' \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway \
    && mkdir /spool && chown gateway /spool
# Inside a container the gateway must listen beyond loopback for -p to reach it, so it
# starts only with authentication (bearer tokens, or mutual TLS; docs/gateway.md,
# "Securing the gateway"), or with --allow-unauthenticated on a network you trust.
ENV MIXPANEL_OTEL_SPOOL_DIR=/spool \
    MIXPANEL_OTEL_GATEWAY_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
USER gateway
VOLUME ["/spool"]
EXPOSE 4317 4318
# 200 from /health while the gateway can deliver; 503 (unhealthy) while stopping.
# /health needs no token; with --tls-cert it is served over TLS (the check trusts any
# certificate: it only asks the gateway on this host whether it is up).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request as u; tls = bool(os.environ.get('MIXPANEL_OTEL_GATEWAY_TLS_CERT')); u.urlopen(('https' if tls else 'http') + '://127.0.0.1:' + os.environ.get('MIXPANEL_OTEL_GATEWAY_HTTP_PORT', '4318') + '/health', timeout=4, context=ssl._create_unverified_context() if tls else None)"]
# exec form: the gateway is PID 1, so the runtime's SIGTERM reaches it (a clean stop).
ENTRYPOINT ["mixpanel-otel", "gateway"]
