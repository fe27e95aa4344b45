"""The `langchain` provider: any LangChain Runnable, streamed with `astream` as the seed did.

TOKENRELAY_LANGCHAIN_RUNNABLE names it as `package.module:attr` (a function there is
called once to build it). A chat model gets tokenrelay's prompt as messages; any other
runnable, e.g. the seed's `ChatPromptTemplate | ChatOpenAI | StrOutputParser`, gets
`{"topic": ..., "question": ...}`. It may stream strings or message chunks.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import AsyncIterator
from typing import Any

import openai
from pydantic import SecretStr

from tokenrelay.errors import ConfigError, ProviderError
from tokenrelay.providers.base import Finish, Prompt
from tokenrelay.settings import Settings, env_name

try:  # the extra is optional: say how to install it instead of failing at import
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import (
        AIMessage,
        BaseMessage,
        BaseMessageChunk,
        HumanMessage,
        SystemMessage,
    )
    from langchain_core.runnables import Runnable
except ImportError:  # pragma: no cover - exercised only without the extra
    Runnable = None  # type: ignore[assignment,misc]

_SETTING = env_name("langchain_runnable")
# Keys shaped like OpenAI's, in case a server echoes one the runnable holds where we cannot see.
_KEY_PATTERN = re.compile(r"\bsk-[A-Za-z0-9_-]{8,}")


def _resolve(path: str) -> Any:
    """The object at `package.module:attr` (imported, not yet called)."""
    if Runnable is None:
        raise ConfigError(
            "the langchain provider needs LangChain: pip install 'tokenrelay[langchain]'"
        )
    module_name, _, attr = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"invalid setting {_SETTING}: cannot load {path!r} ({e})") from e
    return target


def check_setting(settings: Settings) -> None:
    """Fail at start-up, in one line, when the runnable cannot be found."""
    if not settings.langchain_runnable:
        raise ConfigError(
            f"the langchain provider needs {_SETTING}=package.module:attr, naming a "
            "Runnable such as prompt | ChatOpenAI() | StrOutputParser()"
        )
    target = _resolve(settings.langchain_runnable)
    if not isinstance(target, Runnable) and not callable(target):
        raise _not_runnable(settings.langchain_runnable, target)


def _not_runnable(path: str, target: object) -> ConfigError:
    return ConfigError(
        f"invalid setting {_SETTING}: {path!r} is a {type(target).__name__}, not a "
        "LangChain Runnable (or a function returning one)"
    )


def load_runnable(path: str) -> Runnable[Any, Any]:
    """The Runnable at `package.module:attr`; ConfigError saying what is wrong."""
    target = _resolve(path)
    if not isinstance(target, Runnable) and callable(target):
        target = target()  # a factory, so the module need not build clients at import
    if not isinstance(target, Runnable):
        raise _not_runnable(path, target)
    return target


def _steps(runnable: Runnable[Any, Any]) -> list[Any]:
    steps = getattr(runnable, "steps", None) or [runnable]
    return [getattr(step, "bound", step) for step in steps]  # a RunnableBinding wraps its model


def _secrets(runnable: Runnable[Any, Any]) -> list[str]:
    """The secret fields (API keys) of the runnable's steps, to keep them out of messages."""
    found = []
    for step in _steps(runnable):
        for value in getattr(step, "__dict__", {}).values():
            if isinstance(value, SecretStr) and value.get_secret_value():
                found.append(value.get_secret_value())
    return found


def _model_name(runnable: Runnable[Any, Any]) -> str:
    """The first model name found in the runnable or its steps (a chain's model)."""
    for step in _steps(runnable):
        for attr in ("model_name", "model"):
            value = getattr(step, attr, None)
            if isinstance(value, str) and value:
                return value
    return type(runnable).__name__


class LangChainProvider:
    def __init__(self, runnable: Runnable[Any, Any], *, secret: str | None = None) -> None:
        self._runnable = runnable
        self._model = _model_name(runnable)
        self._chat = isinstance(runnable, BaseChatModel)
        self._secrets = [k for k in (secret, *_secrets(runnable)) if k]

    @classmethod
    def from_settings(cls, settings: Settings) -> LangChainProvider:
        check_setting(settings)
        assert settings.langchain_runnable is not None
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return cls(load_runnable(settings.langchain_runnable), secret=key)

    @property
    def name(self) -> str:
        return "langchain"

    @property
    def continues(self) -> bool:
        """A chat model is given a cut-off answer to continue; a chain takes only topic and
        question, so its answer is regenerated instead."""
        return self._chat

    @property
    def model(self) -> str:
        return self._model

    def _bound(self, prompt: Prompt) -> Runnable[Any, Any]:
        """The runnable with the asker's sampling options (a chat model takes them as
        call arguments; a chain has no place for them)."""
        if not prompt.options:
            return self._runnable
        if not self._chat:
            raise ProviderError(
                "bad_request",
                "this LangChain runnable is a chain: it takes no sampling options "
                f"({', '.join(sorted(prompt.options))})",
            )
        return self._runnable.bind(**prompt.options)

    async def stream(self, prompt: Prompt) -> AsyncIterator[str | Finish]:
        if self._chat:
            given: Any = [_message(m) for m in prompt.chat()]
        else:
            given = {"topic": prompt.topic, "question": prompt.question}
        reason, prompt_tokens, completion_tokens = "stop", 0, 0
        try:
            async for item in self._bound(prompt).astream(given):
                if isinstance(item, BaseMessageChunk):
                    usage = getattr(item, "usage_metadata", None) or {}
                    prompt_tokens += int(usage.get("input_tokens", 0))
                    completion_tokens += int(usage.get("output_tokens", 0))
                    reason = str(item.response_metadata.get("finish_reason") or reason)
                    text = str(item.text)
                else:
                    text = item if isinstance(item, str) else str(item)
                if text:
                    yield text
        except ProviderError:
            raise
        except Exception as e:
            raise self._error(e) from e
        yield Finish(reason, prompt_tokens, completion_tokens)

    async def aclose(self) -> None:
        return None

    def _error(self, e: Exception) -> ProviderError:
        """OpenAI SDK failures (langchain-openai raises them) keep their kind."""
        detail = f"{type(e).__name__}: {e}"[:400]
        for secret in self._secrets:  # servers may echo the key back; never pass it on
            detail = detail.replace(secret, "***")
        detail = _KEY_PATTERN.sub("sk-***", detail)
        if isinstance(e, openai.APITimeoutError):
            return ProviderError("timeout", f"the model timed out ({detail})")
        if isinstance(e, openai.APIConnectionError):
            return ProviderError("connection", f"could not reach the model server ({detail})")
        if isinstance(e, openai.APIStatusError):
            status = e.status_code
            kind = (
                "auth"
                if status in (401, 403)
                else "rate_limit"
                if status == 429
                else "server"
                if status >= 500
                else "bad_request"
            )
            return ProviderError(kind, f"the model server refused ({status}): {detail}")
        return ProviderError("langchain", f"the LangChain runnable failed: {detail}")


def _message(message: dict[str, str]) -> BaseMessage:
    role, content = message["role"], message["content"]
    if role == "system":
        return SystemMessage(content)
    if role == "assistant":
        return AIMessage(content)
    return HumanMessage(content)
