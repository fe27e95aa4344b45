"""When to try a model request again, and after how long: the `openai` SDK's rules.

Kept as the SDK has them, so `provider_max_retries` means what it meant when the SDK
made the requests: retry a timeout, a connection failure, and the statuses 408, 409,
429 and 5xx (unless the server says `x-should-retry: false`); wait what Retry-After
says when it is between 0 and 2 minutes, else 0.5 s doubling up to 8 s, less up to 25%.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Mapping

INITIAL_DELAY_S = 0.5
MAX_DELAY_S = 8.0
MAX_RETRY_AFTER_S = 120.0
_RETRIED_STATUSES = frozenset({408, 409, 429})


def should_retry(status: int, headers: Mapping[str, str]) -> bool:
    """Whether a response with this error status is worth another try."""
    asked = _retry_after_header_s(headers)
    if asked is not None and math.isfinite(asked) and asked > MAX_RETRY_AFTER_S:
        return False
    server_says = headers.get("x-should-retry")
    if server_says in ("true", "false"):
        return server_says == "true"
    return status in _RETRIED_STATUSES or status >= 500


def retry_delay_s(attempt: int, headers: Mapping[str, str] | None) -> float:
    """The wait before try `attempt + 2` (attempt 0 was the first request)."""
    asked = _retry_after_header_s(headers) if headers is not None else None
    if asked is not None and math.isfinite(asked) and 0 < asked <= MAX_RETRY_AFTER_S:
        return asked
    backoff_s = min(INITIAL_DELAY_S * 2.0 ** min(attempt, 1000), MAX_DELAY_S)
    return max(0.0, backoff_s * (1 - 0.25 * random.random()))


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """What the server asked for in seconds, for the caller's own retry; None for a date."""
    for name, per_s in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[name]) / per_s)
        except (KeyError, ValueError):  # absent, or an HTTP date: let the caller choose
            continue
    return None


def _retry_after_header_s(headers: Mapping[str, str]) -> float | None:
    """Retry-After-Ms, then Retry-After as seconds or as an HTTP date."""
    for name, per_s in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            delay_s = float(value)
        except ValueError:
            continue
        if delay_s == math.inf and value.strip().lower() not in ("inf", "+inf", "infinity"):
            return MAX_RETRY_AFTER_S + 1  # an overflowing number is a long wait, not a bad one
        return delay_s / per_s
    value = headers.get("retry-after")
    try:
        date = email.utils.parsedate_tz(value) if value else None
        return None if date is None else float(email.utils.mktime_tz(date) - time.time())
    except (TypeError, ValueError, OverflowError, OSError):
        return None
