"""Checks a botvisor webhook's signature (receiver side). Use the raw body, as received."""
import hashlib
import hmac
import time


def verify(secret: str, headers: dict, raw_body: bytes, max_age_s: int = 300) -> bool:
    ts = headers["X-Botvisor-Timestamp"]
    if abs(time.time() - int(ts)) > max_age_s:  # refuse replays of old deliveries
        return False
    mac = hmac.new(secret.encode(), ts.encode() + b"." + raw_body, hashlib.sha256)
    return hmac.compare_digest("v1=" + mac.hexdigest(), headers["X-Botvisor-Signature"])
    # Then deduplicate on headers["X-Botvisor-Event-Id"]: a delivery can be retried.
