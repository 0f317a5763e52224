"""Standard Webhooks signing of outgoing events (the `standardwebhooks` library does the HMAC).

Each try carries the event's one `webhook-id` (the receiver's dedupe key across retries), the try's
own `webhook-timestamp` (receivers refuse stale ones) and `webhook-signature: v1,<base64 HMAC-SHA256>`
over `{id}.{timestamp}.{body}` with the creator key's signing secret (`whsec_...`).
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime

from standardwebhooks.webhooks import Webhook

USER_AGENT = "ferry-webhooks/1"


def new_webhook_id() -> str:
    """`msg_<32 hex>`: unique per event, kept across its retries."""
    return f"msg_{uuid.uuid4().hex}"


def signed_headers(secret: str, webhook_id: str, timestamp: datetime, body: str) -> dict[str, str]:
    """The headers of one delivery try of `body` (the exact JSON text sent)."""
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": webhook_id,
        "webhook-timestamp": str(math.floor(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, timestamp, body),
    }
