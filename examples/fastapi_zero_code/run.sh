#!/usr/bin/env bash
# Zero-code: the app is unchanged; opentelemetry-instrument loads the exporters.
# Start a sink first (mixpanel-otel serve), then: ./run.sh
set -euo pipefail
cd "$(dirname "$0")"
export MIXPANEL_TOKEN="${MIXPANEL_TOKEN:-local-token}"
export MIXPANEL_API_HOST="${MIXPANEL_API_HOST:-http://127.0.0.1:8765}"
export MIXPANEL_OTEL_RULES="$PWD/rules.toml"
export OTEL_SERVICE_NAME="${OTEL_SERVICE_NAME:-shop}"
export OTEL_TRACES_EXPORTER="${OTEL_TRACES_EXPORTER:-mixpanel}"
export OTEL_LOGS_EXPORTER="${OTEL_LOGS_EXPORTER:-mixpanel}"
export OTEL_METRICS_EXPORTER=none
export OTEL_PYTHON_LOGGING_AUTO_INSTRUMENTATION_ENABLED=true
export OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST=x-tenant-id
exec opentelemetry-instrument uvicorn app:app --host 127.0.0.1 --port "${PORT:-5002}"
