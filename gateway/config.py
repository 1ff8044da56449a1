"""The relay's configuration: one upstream per provider (with an optional backup address) and timeouts.

It is data, read from YAML (``load_config``) or built in code::

    upstreams:
      - provider: openai
        channel: openai-official
        base_url: https://api.openai.com
        backup_url: https://openai-backup.example.com   # tried on connect failure, timeout or HTTP 524
        api_key_env: OPENAI_API_KEY
      - provider: anthropic
        channel: anthropic-official
        base_url: https://api.anthropic.com
        api_key_env: ANTHROPIC_API_KEY
    connect_timeout_seconds: 10
    read_timeout_seconds: 300
    max_body_bytes: 33554432       # 32 MiB: a larger request body is answered 413 as soon as it passes that
    body_timeout_seconds: 30       # the longest a client may take to send its whole body (408 after)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pricing.yaml_source import YamlDocument, load_yaml, read_yaml_file

Provider = Literal["openai", "anthropic"]
#: The largest request body the relay reads: the providers' own limit (Anthropic's Messages API: 32 MB,
#: https://docs.claude.com/en/api/errors, "Request size limits"); images in base64 make big bodies.
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
#: The longest a client may take to send its whole body: a client that trickles or stalls it holds a
#: connection and a worker for nothing. 32 MiB in 30 s needs about 9 Mbit/s; raise it for slow links.
DEFAULT_BODY_TIMEOUT_SECONDS = 30.0


class ConfigError(ValueError):
    """A gateway configuration that cannot be used; the message names the file and the field."""


class Upstream(BaseModel):
    """Where one provider's requests go, under which channel name, with which credential."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: Provider
    channel: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
    base_url: str
    backup_url: str | None = None
    #: The upstream credential: given here (tests) or, better, read from this environment variable.
    api_key: str | None = Field(default=None, repr=False)
    api_key_env: str | None = None
    #: Channel name recorded for requests served by the backup address (default: ``<channel>-backup``).
    backup_channel: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")

    @field_validator("base_url", "backup_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return None if value is None else value.rstrip("/")

    @model_validator(mode="after")
    def _one_credential(self) -> "Upstream":
        if (self.api_key is None) == (self.api_key_env is None):
            raise ValueError("give exactly one of api_key or api_key_env")
        return self

    def credential(self) -> str:
        """The upstream API key (from the environment when configured so)."""
        if self.api_key is not None:
            return self.api_key
        value = os.environ.get(self.api_key_env or "")
        if not value:
            raise ConfigError(f"upstream {self.channel}: environment variable {self.api_key_env} is not set")
        return value

    def addresses(self) -> list[tuple[str, str]]:
        """(base URL, channel) in the order they are tried: the main address, then the backup."""
        tried = [(self.base_url, self.channel)]
        if self.backup_url is not None:
            tried.append((self.backup_url, self.backup_channel or f"{self.channel}-backup"))
        return tried


class GatewayConfig(BaseModel):
    """The relay's settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    upstreams: tuple[Upstream, ...]
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    #: Longest wait for the upstream's first byte and between two chunks of its answer.
    read_timeout_seconds: float = Field(default=300.0, gt=0)
    #: Largest request body read (413 past it); the longest wait for the whole body (408 past it).
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, gt=0)
    body_timeout_seconds: float = Field(default=DEFAULT_BODY_TIMEOUT_SECONDS, gt=0)

    @field_validator("upstreams")
    @classmethod
    def _one_per_provider(cls, value: tuple[Upstream, ...]) -> tuple[Upstream, ...]:
        providers = [u.provider for u in value]
        if len(set(providers)) != len(providers):
            raise ValueError("one upstream per provider")
        return value

    def upstream(self, provider: str) -> Upstream | None:
        """The upstream serving ``provider``, if one is configured."""
        return next((u for u in self.upstreams if u.provider == provider), None)


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a gateway YAML file; ``ConfigError`` names the file (and line) and each bad field.

    The file is read within the price table's limits (``pricing.yaml_source``: size, nesting, alias
    expansion), so a hostile file is refused before it can exhaust memory or the stack.
    """
    try:
        document = load_yaml(read_yaml_file(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: {getattr(exc, 'problem', None) or exc}") from None
    if document.duplicates:  # YAML would keep the last of two base_url: lines silently
        (keys, line), *_ = document.duplicates
        raise ConfigError(f"{path}:{line}: {'.'.join(map(str, keys))}: duplicate key")
    try:
        config = GatewayConfig.model_validate(document.data)
    except ValidationError as exc:
        raise ConfigError("; ".join(_problem(path, document, e) for e in exc.errors())) from None
    for upstream in config.upstreams:
        upstream.credential()  # a missing environment variable is an error at start, not at the first request
    return config


def _problem(path: str | Path, document: YamlDocument, error: Any) -> str:
    """One validation error as ``file:line: field: problem`` (the line of the field, or of its nearest parent)."""
    location = tuple(error["loc"])
    line = document.line_of(location)
    return f"{path}{f':{line}' if line is not None else ''}: {'.'.join(map(str, location)) or '$'}: {error['msg']}"
