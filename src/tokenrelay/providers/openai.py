"""The `openai` provider: the official SDK, against OpenAI or any OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import anyio
import openai
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk

from tokenrelay.errors import ConfigError, ProviderError
from tokenrelay.providers.base import Finish, Prompt
from tokenrelay.settings import Settings

OPENAI_URL = "https://api.openai.com/v1"
# Local servers (vLLM, Ollama, llama.cpp) ignore the key, but the SDK insists on one.
NO_KEY = "no-key-needed"
_CONNECT_TIMEOUT_S = 10.0


class OpenAIProvider:
    def __init__(self, client: openai.AsyncOpenAI, model: str, *, secret: str | None) -> None:
        self._client = client
        self._model = model
        self._url = str(client.base_url).rstrip("/")
        self._secret = secret

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIProvider:
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        if not key and not settings.openai_base_url:
            raise ConfigError(
                "the openai provider needs OPENAI_API_KEY, or OPENAI_BASE_URL for an "
                "OpenAI-compatible server that needs no key"
            )
        # A backstop at the larger limit: the caller enforces the first-token and stall deadlines.
        read_timeout_s = max(settings.first_token_timeout_s, settings.stall_timeout_s)
        client = openai.AsyncOpenAI(
            api_key=key or NO_KEY,
            base_url=settings.openai_base_url or OPENAI_URL,
            max_retries=settings.provider_max_retries,
            timeout=openai.Timeout(read_timeout_s, connect=_CONNECT_TIMEOUT_S),
        )
        return cls(client, settings.openai_model, secret=key)

    @property
    def name(self) -> str:
        return "openai"

    @property
    def model(self) -> str:
        return self._model

    async def stream(self, prompt: Prompt) -> AsyncIterator[str | Finish]:
        try:
            chunks = await self._client.chat.completions.create(
                model=self._model,
                messages=[
                    {"role": "system", "content": prompt.system},
                    {"role": "user", "content": prompt.question},
                ],
                stream=True,
                stream_options={"include_usage": True},
            )
        except openai.OpenAIError as e:
            raise self._error(e, started=False) from e
        reason: str | None = None
        usage: CompletionUsage | None = None
        try:
            async for chunk in chunks:
                text, finish = self._read(chunk)
                usage = getattr(chunk, "usage", None) or usage
                reason = finish or reason
                if text:
                    yield text
        except (openai.OpenAIError, ValueError) as e:  # ValueError: a chunk that is not JSON
            raise self._error(e, started=True) from e
        finally:
            # Shielded so that a cancelled consumer still hangs up and the server stops generating.
            with anyio.CancelScope(shield=True):
                await chunks.close()
        if reason is None:
            raise self._fail(
                "incomplete",
                f"the answer from {self._url} was cut short: the stream ended without a finish "
                "reason; the server or a proxy in between closed it",
                retryable=True,
            )
        prompt_tokens = getattr(usage, "prompt_tokens", 0)
        completion_tokens = getattr(usage, "completion_tokens", 0)
        yield Finish(reason, prompt_tokens, completion_tokens)

    async def aclose(self) -> None:
        await self._client.close()

    def _read(self, chunk: ChatCompletionChunk) -> tuple[str, str | None]:
        """The chunk's text and finish reason; compatible servers vary, so check the shape."""
        choices = getattr(chunk, "choices", None)
        if choices is None and getattr(chunk, "usage", None) is not None:
            return "", None  # some servers send the usage chunk with "choices": null
        if not isinstance(choices, list):
            raise self._fail(
                "malformed", f"{self._url} sent a stream chunk without 'choices': {chunk!r:.200}"
            )
        text, finish = "", None
        for choice in choices:
            content = getattr(getattr(choice, "delta", None), "content", None)
            text += content if isinstance(content, str) else ""
            finish = getattr(choice, "finish_reason", None) or finish
        return text, finish

    def _fail(
        self,
        kind: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ) -> ProviderError:
        if self._secret:  # servers may echo the key back; never pass it on
            message = message.replace(self._secret, "***")
        return ProviderError(kind, message, retryable=retryable, retry_after_s=retry_after_s)

    def _error(self, e: Exception, *, started: bool) -> ProviderError:
        url, retries = self._url, f"after {self._client.max_retries} retries"
        if isinstance(e, openai.APITimeoutError):
            return self._fail(
                "timeout",
                f"{url} sent nothing for too long ({retries}); it may be overloaded, or raise "
                "TOKENRELAY_FIRST_TOKEN_TIMEOUT_S / TOKENRELAY_STALL_TIMEOUT_S",
                retryable=True,
            )
        if isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e
            if started:
                return self._fail(
                    "incomplete",
                    f"the connection to {url} broke mid-answer ({cause})",
                    retryable=True,
                )
            return self._fail(
                "connection",
                f"could not reach the model server at {url} ({cause}; {retries}); check "
                "OPENAI_BASE_URL and that the server is running",
                retryable=True,
            )
        if isinstance(e, openai.APIStatusError):
            return self._status_error(e)
        if isinstance(e, ValueError | openai.APIResponseValidationError):
            return self._fail(
                "malformed",
                f"{url} sent a stream chunk tokenrelay cannot read ({type(e).__name__}: {e}); "
                "is it an OpenAI-compatible server?",
            )
        # An error event inside the stream, or anything else the SDK raises.
        return self._fail("server", f"the model server at {url} failed: {e}", retryable=True)

    def _status_error(self, e: openai.APIStatusError) -> ProviderError:
        url, status, retries = self._url, e.status_code, f"after {self._client.max_retries} retries"
        body = e.body if isinstance(e.body, dict) else {}
        detail = str(body.get("message") or e.message)[:300].rstrip(".")
        if status in (401, 403):
            return self._fail(
                "auth",
                f"the model server at {url} refused access ({status}: {detail}); check "
                f"OPENAI_API_KEY and that it may use model {self._model!r}",
            )
        if status == 429 and e.code == "insufficient_quota":
            return self._fail(
                "rate_limit", f"{url} says the quota is used up ({detail}); check the billing"
            )
        if status == 429:
            return self._fail(
                "rate_limit",
                f"rate limited by {url} ({detail}; {retries}); try again later",
                retryable=True,
                retry_after_s=_retry_after_s(e.response.headers),
            )
        if status >= 500:
            return self._fail(
                "server",
                f"the model server at {url} failed ({status}: {detail}; {retries})",
                retryable=True,
                retry_after_s=_retry_after_s(e.response.headers),
            )
        return self._fail(
            "bad_request",
            f"the model server at {url} rejected the request for model {self._model!r} "
            f"({status}: {detail}); check OPENAI_MODEL",
        )


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    for name, per_s in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[name]) / per_s)
        except (KeyError, ValueError):  # absent, or an HTTP date: let the caller choose
            continue
    return None
