"""A plain FastAPI app with no Mixpanel code: profiles come from its telemetry.

Run it with ./run.sh (``opentelemetry-instrument uvicorn`` with the ``mixpanel``
exporters); the rules in rules.toml turn the ``X-Tenant-Id`` request header
into ``company`` group profiles.
"""

import logging

from fastapi import FastAPI, Header

logging.basicConfig(level=logging.INFO)
log = logging.getLogger("shop")
app = FastAPI()


@app.post("/checkout")
def checkout(seats: int = 1, x_tenant_id: str = Header("unknown")):
    # An ordinary log line that also carries a group update (record conventions).
    log.info(
        "group",
        extra={"group_key": "company", "group_id": x_tenant_id, "$set": {"seats": seats}},
    )
    return {"ok": True, "tenant": x_tenant_id}


@app.get("/health")
def health():
    return "ok"
