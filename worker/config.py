"""The engine configuration: nine required fields, checked together before anything starts.

Rule: an engine is built only from a complete, consistent EngineConfig. There are no
defaults and no unknown keys, so staging and production cannot drift apart through a
value nobody wrote down; the config and its hash are logged at start (cfg_summary,
config_hash). Values come from a TOML file, and a `FABRIC_<FIELD>` environment variable
overrides the file's value for that field. Every problem is reported at once, one line
each, as a ConfigError naming the field; a pydantic traceback never reaches an operator.
Whether the model exists and fits the device is the engine's check, not this module's.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

ENV_PREFIX = "FABRIC_"

_URL_SCHEMES = ("nats", "tls", "ws", "wss")
# Stream and consumer names become subjects ($JS.API.STREAM.INFO.<name>) and file
# names on the server, so the characters that mean something there are refused.
_NAME_RE = re.compile(r"^[^\s.*>/\\\x00-\x1f\x7f]+$")
_BUILTIN_PREFIX = "builtin:"
_BUILTIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:(0|[1-9][0-9]*))$")
_USERINFO_RE = re.compile(r"(://)[^/?#]*@")
_MAX_SHOWN_VALUE_CHARS = 80


class ConfigError(Exception):
    """The configuration cannot be used; str() has one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"engine config {source}: {p}" for p in problems))


class EngineConfig(BaseModel):
    # strict: 1.5, true and "4096" are not token counts; a TOML typo should fail here.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    nats_url: str  # one or more comma-separated nats://, tls://, ws:// or wss:// URLs
    stream: str  # JetStream stream that holds the jobs
    consumer: str  # durable pull consumer the whole fleet shares
    model: str  # "builtin:<name>" or a checkpoint directory
    device: str  # "cpu", "cuda" or "cuda:N"
    dtype: Literal["bfloat16", "float16", "float32", "fp8"]
    token_budget: int = Field(gt=0)  # high-water mark of in-flight padded tokens
    low_water: int = Field(ge=0)  # admission resumes at or below this
    max_seq_len: int = Field(gt=0)  # longest prompt + generation one job may ask for

    @property
    def servers(self) -> list[str]:
        """nats_url as the list of server URLs the client connects to."""
        return self.nats_url.split(",")

    @field_validator("nats_url")
    @classmethod
    def _check_nats_url(cls, value: str) -> str:
        urls = [part.strip() for part in value.split(",")]
        for url in urls:
            if not url:
                raise ValueError("must be one or more comma-separated URLs (found an empty one)")
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 -- the property is what parses and range-checks it
            except ValueError:
                raise ValueError(
                    "each URL must be well-formed, with a port from 0 to 65535"
                ) from None
            if parts.scheme not in _URL_SCHEMES or not url.startswith(f"{parts.scheme}://"):
                raise ValueError("each URL must start with nats://, tls://, ws:// or wss://")
            if not parts.hostname:
                raise ValueError("each URL must name a host")
        # Normalized so that "a, b" and "a,b" hash alike.
        return ",".join(urls)

    @field_validator("stream", "consumer")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                "must be a non-empty name without whitespace, '.', '*', '>', '/' or '\\'"
            )
        return value

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        if value.startswith(_BUILTIN_PREFIX):
            if not _BUILTIN_RE.match(value.removeprefix(_BUILTIN_PREFIX)):
                raise ValueError("must be builtin:<name> with a name of letters, digits, _ . -")
        elif not value.strip() or value != value.strip() or "\x00" in value:
            raise ValueError(
                "must be builtin:<name> or a checkpoint directory path "
                "(non-empty, no surrounding whitespace)"
            )
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError("must be 'cpu', 'cuda' or 'cuda:N'")
        return value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str, info: ValidationInfo) -> str:
        # float16 matmuls on CPU are emulated or missing, many times slower than
        # float32; bfloat16 has native CPU kernels on current hardware, so it is allowed.
        if value == "float16" and info.data.get("device") == "cpu":
            raise ValueError(
                "float16 is refused on device 'cpu' (slow or unsupported there); "
                "use bfloat16 or float32"
            )
        return value

    @field_validator("low_water")
    @classmethod
    def _check_low_water(cls, value: int, info: ValidationInfo) -> int:
        # Equal marks would make the hysteresis one-in/one-out, the collapse it exists to prevent.
        budget = info.data.get("token_budget")
        if budget is not None and value >= budget:
            raise ValueError(f"must be less than token_budget ({budget})")
        return value

    @field_validator("max_seq_len")
    @classmethod
    def _check_max_seq_len(cls, value: int, info: ValidationInfo) -> int:
        # A job longer than the budget could never be admitted and would wait forever.
        budget = info.data.get("token_budget")
        if budget is not None and value > budget:
            raise ValueError(f"must be at most token_budget ({budget})")
        return value


FIELDS: tuple[str, ...] = tuple(EngineConfig.model_fields)
_INT_FIELDS = frozenset(
    name for name, info in EngineConfig.model_fields.items() if info.annotation is int
)


def load_config(path: str | Path, environ: Mapping[str, str] = os.environ) -> EngineConfig:
    """Read the TOML file at `path`, apply FABRIC_<FIELD> overrides, validate.

    Environment variables for anything but the nine fields (FABRIC_LOG_LEVEL, ...) are
    other options' business and are ignored here.
    """
    source = str(path)
    try:
        with open(path, "rb") as file:
            raw: dict[str, Any] = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None

    from_env: dict[str, str] = {}
    for name in FIELDS:
        var = ENV_PREFIX + name.upper()
        if var in environ:
            value = environ[var]
            from_env[name] = var
            # Env values are strings; an int field takes only a plain decimal, and
            # anything else is left as a string for validation to refuse by name.
            if name in _INT_FIELDS and re.fullmatch(r"\s*-?[0-9]+\s*", value):
                raw[name] = int(value)
            else:
                raw[name] = value

    try:
        return EngineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err, from_env) for err in exc.errors(include_url=False)]
        raise ConfigError(source, problems) from None


def config_hash(cfg: EngineConfig) -> str:
    """12 hex chars identifying the config; secrets are hashed, never shown."""
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def cfg_summary(cfg: EngineConfig) -> dict[str, Any]:
    """The config as a flat dict for the start-up log line, credentials redacted."""
    summary = cfg.model_dump(mode="json")
    summary["nats_url"] = redact_url(cfg.nats_url)
    summary["config_hash"] = config_hash(cfg)
    return summary


def redact_url(url: str) -> str:
    """'nats://user:pass@host:4222' -> 'nats://***@host:4222', for each URL in a list."""
    return ",".join(_USERINFO_RE.sub(r"\1***@", part) for part in url.split(","))


def _describe(err: Any, from_env: Mapping[str, str]) -> str:
    loc = err["loc"]
    field = str(loc[0]) if loc else ""
    kind = err["type"]
    if kind == "missing":
        return f"missing field {field!r}"
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(field, FIELDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown field {field!r} ({hint}the nine fields are: {', '.join(FIELDS)})"
    message = err["msg"].removeprefix("Value error, ")
    if message.startswith("Input should be "):
        message = "must be " + message.removeprefix("Input should be ")
    shown = err["input"]
    if field == "nats_url" and isinstance(shown, str):
        shown = redact_url(shown)
    got = repr(shown)
    if len(got) > _MAX_SHOWN_VALUE_CHARS:
        got = got[: _MAX_SHOWN_VALUE_CHARS - 3] + "..."
    origin = f" from {from_env[field]}" if field in from_env else ""
    return f"{field}: {message} (got {got}{origin})"
