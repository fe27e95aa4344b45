"""Who may ask, watch and cancel: optional API keys, answer ownership, a per-client rate limit.

With `TOKENRELAY_API_KEYS` unset, anyone who reaches the gateway may ask, and an
answer is reachable by whoever knows its unguessable 128-bit id. With keys set,
every ask, watch and cancel needs one as a bearer token (HTTP `Authorization`,
Socket.IO `auth: {token}` or the same header), and an answer belongs to the key
that asked it: other keys are told it does not exist. Redis stores only a short
fingerprint of the key, never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from tokenrelay.errors import NotFound, TokenRelayError
from tokenrelay.settings import Settings

# Clients remembered by the rate limiter; the least recently seen are forgotten first.
MAX_TRACKED_CLIENTS = 100_000


class Unauthorized(TokenRelayError, PermissionError):
    """No API key, or one the gateway does not know. The message never repeats the key."""


class RateLimited(TokenRelayError):
    """Too many questions from one client; `retry_after_s` says when the next is allowed."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: `owner` is the key's fingerprint ("" without keys), `client` the
    identity the rate limit counts (the key, else the IP address)."""

    owner: str
    client: str


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def socket_token(auth: object, environ: Mapping[str, object]) -> str | None:
    """The token a Socket.IO client sent: `auth: {token}` on connect, else the header."""
    if isinstance(auth, Mapping):
        token = auth.get("token")
        if isinstance(token, str) and token:
            return token
    header = environ.get("HTTP_AUTHORIZATION")
    return bearer(header if isinstance(header, str) else None)


def socket_address(environ: Mapping[str, object]) -> str:
    # engineio's ASGI environ always says 127.0.0.1; the ASGI scope has the peer.
    scope = environ.get("asgi.scope")
    client = scope.get("client") if isinstance(scope, Mapping) else None
    if isinstance(client, list | tuple) and client:
        return str(client[0])
    return "unknown"


class RateLimiter:
    """A token bucket per client: `per_min` questions a minute, bursts up to `per_min`."""

    def __init__(self, per_min: int) -> None:
        self.per_min = per_min
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str, now: float | None = None) -> None:
        if self.per_min <= 0:
            return
        now = time.monotonic() if now is None else now
        rate_per_s = self.per_min / 60.0
        tokens, then = self._buckets.pop(client, (float(self.per_min), now))
        tokens = min(float(self.per_min), tokens + (now - then) * rate_per_s)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            wait_s = math.ceil((1.0 - tokens) / rate_per_s)
            raise RateLimited(
                f"rate limit: at most {self.per_min} questions a minute per client; "
                f"try again in {wait_s} s",
                wait_s,
            )
        self._buckets[client] = (tokens - 1.0, now)
        while len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._buckets.popitem(last=False)


class Access:
    """The gateway's access rules, shared by HTTP and Socket.IO."""

    def __init__(self, settings: Settings) -> None:
        self._keys = {
            fingerprint(k.get_secret_value()): k.get_secret_value() for k in settings.api_keys
        }
        self.limiter = RateLimiter(settings.rate_limit_per_min)

    @property
    def keys_required(self) -> bool:
        return bool(self._keys)

    def caller(self, token: str | None, address: str) -> Caller:
        """Who presents `token` from `address`; Unauthorized when keys are on and it is wrong."""
        if not self._keys:
            return Caller("", f"ip:{address}")
        if token is None:
            raise Unauthorized(
                "an API key is required: send 'Authorization: Bearer <key>' "
                "(Socket.IO: connect with auth {token: <key>})"
            )
        presented = fingerprint(token)
        known = self._keys.get(presented)
        # Compare the whole key too, in constant time: the fingerprint only finds the candidate.
        if known is None or not hmac.compare_digest(known.encode(), token.encode()):
            raise Unauthorized("that API key is not valid for this server")
        return Caller(presented, f"key:{presented}")

    def admit_question(self, caller: Caller) -> None:
        """Count one question against the caller's rate limit; RateLimited when over it."""
        self.limiter.take(caller.client)

    def check_record(self, question_id: str, owner: str, caller: Caller) -> None:
        """NotFound unless `caller` may see this answer (`owner` as its record says); other
        keys' answers do not exist."""
        if self._keys and owner and not hmac.compare_digest(owner, caller.owner):
            raise NotFound(f"no question with id {question_id!r} (never asked, or expired)")

    def history_owner(self, caller: Caller) -> str | None:
        """Whose questions the history lists: the caller's with keys on, else everyone's."""
        return caller.owner if self._keys else None
