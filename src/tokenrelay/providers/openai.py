"""The `openai` provider: OpenAI or any OpenAI-compatible server, its stream read lean.

The official SDK builds a pydantic object for every streamed chunk, most of a worker's
CPU per chunk. This reads the server-sent events with orjson over tokenrelay's own
kept-alive HTTP/1.1 client (`h1pool`, parsed by llhttp), and keeps the SDK's retry rules
(`provider_max_retries`, Retry-After) and what each failure reports.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import httpx
import orjson

from tokenrelay.errors import ConfigError, ProviderError
from tokenrelay.providers.base import Finish, Item, Prompt, Reasoning, ToolCall
from tokenrelay.providers.h1 import HTTPFailure, HTTPStatusError, HTTPTimeout
from tokenrelay.providers.h1pool import H1Client, Response
from tokenrelay.providers.retry import retry_after_s, retry_delay_s, should_retry
from tokenrelay.providers.sse import SSEDecoder
from tokenrelay.settings import Settings

OPENAI_URL = "https://api.openai.com/v1"
# Local servers (vLLM, Ollama, llama.cpp) ignore the key; sent as the SDK sent it.
NO_KEY = "no-key-needed"
_CONNECT_TIMEOUT_S = 10.0
_KEEPALIVE_S = 5.0  # as the SDK kept them
_DRAIN_S = 0.1  # after [DONE]: read the body's end, so the connection is kept for reuse
_ERROR_BODY_BYTES = 64 * 1024


class OpenAIProvider:
    def __init__(
        self,
        http: H1Client,
        url: str,
        model: str,
        *,
        secret: str | None,
        max_retries: int,
    ) -> None:
        self._http = http
        self._url = url.rstrip("/")
        self._endpoint = f"{self._url}/chat/completions"
        self._model = model
        self._secret = secret
        self._max_retries = max_retries

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
        # One connection per answer in flight, kept between answers; never a wait for the
        # pool, so a slow model cannot turn into a false timeout here.
        http = H1Client(
            {
                "authorization": f"Bearer {key or NO_KEY}",
                "content-type": "application/json",
                "accept": "application/json",
                "user-agent": "tokenrelay",
            },
            connect_timeout_s=_CONNECT_TIMEOUT_S,
            read_timeout_s=read_timeout_s,
            max_idle=settings.worker_concurrency,
            keepalive_s=_KEEPALIVE_S,
            # httpx's: certifi's CAs, or SSL_CERT_FILE / SSL_CERT_DIR as httpx read them.
            ssl_context=httpx.create_ssl_context(),
            proxies=urllib.request.getproxies(),
        )
        return cls(
            http,
            settings.openai_base_url or OPENAI_URL,
            settings.openai_model,
            secret=key,
            max_retries=settings.provider_max_retries,
        )

    @property
    def name(self) -> str:
        return "openai"

    @property
    def model(self) -> str:
        return self._model

    async def stream(self, prompt: Prompt) -> AsyncIterator[str | Finish | Reasoning | ToolCall]:
        response = await self._open(self._request_body(prompt))
        body = _Body(self)
        read = response.read
        try:
            try:
                while data := await read():
                    for item in body.items(data):
                        yield item
                    if body.done:
                        # Read the body's end, so that the connection is kept for reuse.
                        await response.drain(_DRAIN_S)
                        break
            except (HTTPFailure, ValueError) as e:
                raise self._mid_answer(e) from e
        finally:
            # Synchronous, so that a cancelled consumer still hangs up and the server stops
            # generating; a response not read to its end closes its connection.
            response.close()
        yield self._finish(body)

    async def pump(
        self,
        prompt: Prompt,
        take: Callable[[Item], None],
        ready: Callable[[], Awaitable[None]],
    ) -> None:
        """`stream`, pushed: each item goes to `take` as its bytes arrive, called from the
        connection's I/O callback, so the consumer's task is not woken per chunk; this
        returns after the Finish (or raises what `stream` raises, or what `take` raised).
        `ready` is awaited once the model has answered, before the first item."""
        response = await self._open(self._request_body(prompt))
        body = _Body(self)
        taken: Exception | None = None

        def sink(data: bytes) -> bool:
            for item in body.items(data):
                try:
                    take(item)
                except Exception as e:  # the consumer's own: past the provider's handling
                    raise _Taken(e) from None
            return not body.done

        try:
            await ready()
            try:
                response.divert(sink)
                # Diverted, a read returns at the body's end or after [DONE]; an encoded
                # body is read here.
                while not body.done and (data := await response.read()):
                    sink(data)
                if body.done:
                    await response.drain(_DRAIN_S)  # so that the connection is kept
            except _Taken as e:
                taken = e.error
            except (HTTPFailure, ValueError) as e:
                raise self._mid_answer(e) from e
        finally:
            response.close()  # synchronous: see `stream`
        if taken is not None:
            raise taken
        take(self._finish(body))

    async def aclose(self) -> None:
        await self._http.aclose()

    def _request_body(self, prompt: Prompt) -> bytes:
        return orjson.dumps(
            {
                "model": self._model,
                **prompt.options,  # checked by the gateway: sampling options only
                "messages": prompt.chat(),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )

    async def _open(self, body: bytes) -> Response:
        """The streaming response, after the SDK's retries; a failure as `ProviderError`."""
        for attempt in range(self._max_retries + 1):
            last = attempt == self._max_retries
            try:
                response = await self._http.post(self._endpoint, body)
            except HTTPTimeout as e:
                if last:
                    raise self._timeout(e) from e
                delay_s = retry_delay_s(attempt, None)
            except HTTPFailure as e:
                if last:
                    raise self._fail(
                        "connection",
                        f"could not reach the model server at {self._url} ({_say(e)}; "
                        f"{self._retries}); check OPENAI_BASE_URL and that the server is running",
                        retryable=True,
                    ) from e
                delay_s = retry_delay_s(attempt, None)
            else:
                if 200 <= response.status < 300:
                    return response
                if last or not should_retry(response.status, response.headers):
                    raise await self._refused(response)
                delay_s = retry_delay_s(attempt, response.headers)
                await response.read_some(_ERROR_BODY_BYTES)  # read whole: the connection stays
            await asyncio.sleep(delay_s)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _read(self, chunk: Any) -> tuple[str, str | None, tuple[Reasoning | ToolCall, ...]]:
        """The chunk's text, finish reason, and a reasoning model's thoughts and tool calls;
        compatible servers vary, so check the shape."""
        if not isinstance(chunk, dict):
            raise self._fail(
                "malformed",
                f"{self._url} sent a stream chunk that is not an object: {chunk!r:.200}",
            )
        if chunk.get("error"):
            raise self._stream_error(chunk["error"])
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            if choices is None and chunk.get("usage") is not None:
                return "", None, ()  # some servers send the usage chunk with "choices": null
            raise self._fail(
                "malformed", f"{self._url} sent a stream chunk without 'choices': {chunk!r:.200}"
            )
        text, finish = "", None
        extras: tuple[Reasoning | ToolCall, ...] = ()
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if isinstance(content, str):
                    text = text + content if text else content
                # Most deltas hold text alone: three lookups instead of building a list.
                if "reasoning_content" in delta or "reasoning" in delta or "tool_calls" in delta:
                    extras += _extras(delta)
            finish = choice.get("finish_reason") or finish
        return text, finish if isinstance(finish, str) else None, extras

    def _finish(self, body: _Body) -> Finish:
        if body.reason is None:
            raise self._fail(
                "incomplete",
                f"the answer from {self._url} was cut short: the stream ended without a finish "
                "reason; the server or a proxy in between closed it",
                retryable=True,
            )
        usage = body.usage if isinstance(body.usage, dict) else {}
        return Finish(
            body.reason, _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        )

    def _mid_answer(self, e: HTTPFailure | ValueError) -> ProviderError:
        """What a failure while the answer's body is read reports."""
        if isinstance(e, HTTPTimeout):
            return self._timeout(e)
        if isinstance(e, HTTPFailure):
            return self._fail(
                "incomplete",
                f"the connection to {self._url} broke mid-answer ({_say(e)})",
                retryable=True,
            )
        return self._fail(  # a chunk that is not JSON
            "malformed",
            f"{self._url} sent a stream chunk tokenrelay cannot read "
            f"({type(e).__name__}: {e}); is it an OpenAI-compatible server?",
        )

    @property
    def _retries(self) -> str:
        return f"after {self._max_retries} retries"

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

    def _timeout(self, e: HTTPTimeout) -> ProviderError:
        return self._fail(
            "timeout",
            f"{self._url} sent nothing for too long ({self._retries}); it may be overloaded, or "
            "raise TOKENRELAY_FIRST_TOKEN_TIMEOUT_S / TOKENRELAY_STALL_TIMEOUT_S",
            retryable=True,
        )

    def _stream_error(self, error: object) -> ProviderError:
        """An error event inside the stream (the SDK's `APIError`)."""
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(message, str) or not message:
            message = "An error occurred during streaming"
        return self._fail(
            "server", f"the model server at {self._url} failed: {message}", retryable=True
        )

    async def _refused(self, response: Response) -> ProviderError:
        """The error for a status the SDK would not (or no longer) retry, chained to its body."""
        raw = await response.read_some(_ERROR_BODY_BYTES)
        try:
            body = orjson.loads(raw)
        except ValueError:
            body = None
        error = body.get("error", body) if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        status, detail = response.status, f"Error code: {response.status}"
        if isinstance(error.get("message"), str) and error["message"]:
            detail += f" - {error['message']}"
        # The SDK's exception text, kept for the traceback; only redacted text goes further.
        cause = HTTPStatusError(detail)
        failure = self._status_error(status, error, detail, response.headers)
        failure.__cause__ = cause
        return failure

    def _status_error(
        self, status: int, error: dict[str, Any], said: str, headers: Mapping[str, str]
    ) -> ProviderError:
        url, retries = self._url, self._retries
        detail = str(error.get("message") or said)[:300].rstrip(".")
        if status in (401, 403):
            return self._fail(
                "auth",
                f"the model server at {url} refused access ({status}: {detail}); check "
                f"OPENAI_API_KEY and that it may use model {self._model!r}",
            )
        if status == 429 and error.get("code") == "insufficient_quota":
            return self._fail(
                "rate_limit", f"{url} says the quota is used up ({detail}); check the billing"
            )
        if status == 429:
            return self._fail(
                "rate_limit",
                f"rate limited by {url} ({detail}; {retries}); try again later",
                retryable=True,
                retry_after_s=retry_after_s(headers),
            )
        if status >= 500:
            return self._fail(
                "server",
                f"the model server at {url} failed ({status}: {detail}; {retries})",
                retryable=True,
                retry_after_s=retry_after_s(headers),
            )
        return self._fail(
            "bad_request",
            f"the model server at {url} rejected the request for model {self._model!r} "
            f"({status}: {detail}); check OPENAI_MODEL",
        )


class _Body:
    """What an answer's streamed body said so far: its items, finish reason and usage."""

    __slots__ = ("_feed", "_read", "done", "reason", "usage")

    def __init__(self, provider: OpenAIProvider) -> None:
        self._feed = SSEDecoder().feed
        self._read = provider._read
        self.done = False  # [DONE] came: what follows is not read
        self.reason: str | None = None
        self.usage: Any = None

    def items(self, data: bytes) -> Iterator[str | Reasoning | ToolCall]:
        for payload in self._feed(data):
            if payload.startswith(b"[DONE]"):
                self.done = True
                return
            chunk = orjson.loads(payload)
            text, finish, extras = self._read(chunk)
            self.usage = chunk.get("usage") or self.usage
            self.reason = finish or self.reason
            yield from extras
            if text:
                yield text


class _Taken(Exception):
    """Carries what `pump`'s consumer raised out of the I/O callback, untouched."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def _count(value: object) -> int:
    return value if isinstance(value, int) else 0


def _say(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _extras(delta: dict[str, Any]) -> tuple[Reasoning | ToolCall, ...]:
    """A delta's reasoning text (`reasoning_content`, or `reasoning` as some servers name it)
    and tool call pieces."""
    out: list[Reasoning | ToolCall] = []
    thought = delta.get("reasoning_content") or delta.get("reasoning")
    if isinstance(thought, str) and thought:
        out.append(Reasoning(thought))
    calls = delta.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        if not isinstance(call, dict):
            continue
        function: Any = call.get("function")
        function = function if isinstance(function, dict) else {}
        index: Any = call.get("index")
        out.append(
            ToolCall(
                index=index if isinstance(index, int) else 0,
                id=str(call.get("id") or ""),
                name=str(function.get("name") or ""),
                arguments=str(function.get("arguments") or ""),
            )
        )
    return tuple(out)
