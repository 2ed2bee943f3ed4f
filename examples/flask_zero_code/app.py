"""A plain Flask app with no Mixpanel code: profiles come from its telemetry.

Run it with ./run.sh (``opentelemetry-instrument`` with the ``mixpanel``
exporters); the rules in rules.toml turn the ``X-Tenant-Id`` request header
into ``company`` group profiles.
"""

import logging
import os

from flask import Flask, request

logging.basicConfig(level=logging.INFO)
log = logging.getLogger("shop")
app = Flask(__name__)


@app.post("/checkout")
def checkout():
    tenant = request.headers.get("X-Tenant-Id", "unknown")
    seats = int(request.args.get("seats", "1"))
    # An ordinary log line that also carries a group update (record conventions).
    log.info(
        "group",
        extra={"group_key": "company", "group_id": tenant, "$set": {"seats": seats}},
    )
    return {"ok": True, "tenant": tenant}


@app.get("/health")
def health():
    return "ok"


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "5001")))
