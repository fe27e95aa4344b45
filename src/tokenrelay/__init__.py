"""tokenrelay: stream LLM answers to browsers and programs through Redis Streams."""

from tokenrelay.client import Client
from tokenrelay.errors import ConfigError, InvalidInput, NotFound, ProviderError, TokenRelayError
from tokenrelay.settings import Settings, load_settings

__all__ = [
    "Client",
    "ConfigError",
    "InvalidInput",
    "NotFound",
    "ProviderError",
    "Settings",
    "TokenRelayError",
    "load_settings",
]
__version__ = "0.1.0"
