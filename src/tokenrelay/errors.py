"""The one root exception and its family."""

from __future__ import annotations


class TokenRelayError(Exception):
    """Root of every error tokenrelay raises on purpose."""


class ConfigError(TokenRelayError, ValueError):
    """A setting is missing or has a value tokenrelay cannot use."""


class InvalidInput(TokenRelayError, ValueError):
    """A client sent something tokenrelay will not accept; the message says what."""


class NotFound(TokenRelayError, LookupError):
    """No question with that id (never existed, or expired)."""


class StoreError(TokenRelayError, RuntimeError):
    """Redis did not do what the data model needs (connection lost, NOGROUP, ...)."""


class Rewound(StoreError):
    """An answer stream ends before entries its worker wrote and Redis acknowledged: a
    failover promoted a replica that had not received them yet. `last_entry_id` is where
    the stream ends now ("" when it holds none of this writer's chain)."""

    def __init__(self, message: str, last_entry_id: str) -> None:
        super().__init__(message)
        self.last_entry_id = last_entry_id


class Overloaded(TokenRelayError, RuntimeError):
    """Too much is queued (in all, or by this caller): the ask is refused, not forgotten.
    `retry_after_s` says when trying again makes sense."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CallerFull(Overloaded):
    """This caller has as many unfinished questions as one caller may."""


class Conflict(TokenRelayError, ValueError):
    """The request contradicts an earlier one (an Idempotency-Key reused for another body)."""


class AnswerTimeout(TokenRelayError, TimeoutError):
    """A whole answer did not finish in time; it goes on, and can be watched."""


class Fenced(TokenRelayError, RuntimeError):
    """This worker's delivery of a request is no longer current: another worker has taken
    over the answer, so this one must not write to it."""


class ProviderError(TokenRelayError, RuntimeError):
    """The model provider failed; `kind` names how, the message says what to do.

    `retryable` marks failures worth another try before the first token
    (rate limits, server errors, connection trouble).
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class EmbeddedServerError(TokenRelayError, RuntimeError):
    """The embedded Valkey could not be started or stopped."""
