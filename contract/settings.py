"""All configuration, read once from `LV_*` environment variables and passed down."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ValueError):
    """A setting has a bad value; the message names the `LV_` variable."""


class Settings(BaseSettings):
    """Every setting of SPEC.md with its documented default (see README, Configuration)."""

    # An empty variable (as compose files often write) means unset.
    model_config = SettingsConfigDict(
        env_prefix="LV_", extra="ignore", frozen=True, env_ignore_empty=True
    )

    database_url: str | None = None
    broker_url: str | None = None
    home: Path = Path("~/.listing-vision")
    models_file: Path | None = None
    model: str = "clip-vit-b32"
    file_roots: Annotated[tuple[Path, ...], NoDecode] = ()
    categories_file: Path | None = None
    flower_user: str | None = None
    flower_password: SecretStr | None = None
    flower_port: int = Field(5555, ge=1, le=65535)

    max_image_bytes: int = Field(20_000_000, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    fetch_timeout: float = Field(15.0, gt=0)
    allowed_private_networks: Annotated[tuple[IPNetwork, ...], NoDecode] = ()

    max_attempts: int = Field(3, ge=1)
    retry_backoff: float = Field(2.0, ge=0)
    task_time_limit: int = Field(300, gt=0)
    visibility_timeout: int = Field(3600, gt=0)
    # Seconds a broker operation (connect, publish, ack) may take: a Redis that accepts and
    # never answers makes `enqueue`, retries and the reconciler fail with an error, not hang.
    broker_timeout: float = Field(10.0, gt=0)
    batch_max_size: int = Field(64, ge=1)
    batch_max_wait_ms: int = Field(20, ge=0)
    # Where resize, crop and normalise run: `tensor` batches them on the model's device,
    # `pil` runs the backend's own transform per image; `auto` is tensor on CUDA, else pil.
    input_path: Literal["auto", "pil", "tensor"] = "auto"
    # Where JPEGs are decoded: `device` leaves them encoded for the model's batch to decode
    # together on its device (nvJPEG on CUDA) and measure there; `pil` decodes each in its job's
    # thread; `auto` is device on CUDA with the tensor input path, else pil.
    decode: Literal["auto", "pil", "device"] = "auto"
    # Processes that decode images for the tensor input path (0: each job's own threads).
    decode_processes: int = Field(0, ge=0, le=64)
    # With decode processes: as many fetch processes fetch and decode the images
    # (docs/architecture.md).
    pool_fetches: bool = False
    worker_concurrency: int | None = Field(None, ge=1)
    # Jobs per message when one `enqueue` call carries several events: a worker claims,
    # analyses and commits a group together (docs/architecture.md). 1: one message per job.
    enqueue_group: int = Field(16, ge=1, le=256)
    run_chunk_size: int | None = Field(None, ge=1, le=10_000)
    # PostgreSQL's maintenance_work_mem for building a model's HNSW index (unset: the server's
    # own); pgvector builds fast only while the graph fits in it (db.embedding_index).
    index_build_memory: str | None = Field(None, pattern=r"^[1-9][0-9]*(kB|MB|GB|TB)$")
    rescore_schedule: str = "0 2 * * *"
    log_level: str = "INFO"
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # The address a worker's metrics listen on: every interface for a deployment's
    # Prometheus; `up` (the embedded default) sets 127.0.0.1 for its workers unless given.
    metrics_host: str = "0.0.0.0"
    # The one exporter per deployment (queue depth, backlog, runs): `listing-vision exporter`.
    exporter_port: int = Field(9808, ge=1, le=65535)
    log_format: Literal["text", "json"] = "text"
    # The optional Milvus mirror of the embeddings (docs/milvus-mirror.md): unset, none; a path,
    # milvus-lite over that directory; `http(s)://`, a Milvus server (token: `user:password`).
    milvus_uri: str | None = None
    milvus_token: SecretStr | None = None
    milvus_timeout: float = Field(10.0, gt=0)

    @field_validator("home", "models_file", "categories_file", mode="after")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("file_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(Path(p).expanduser().resolve() for p in value.split(":") if p.strip())
        return value

    @field_validator("allowed_private_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(
                ipaddress.ip_network(part.strip(), strict=False)
                for part in value.split(",")
                if part.strip()
            )
        return value

    @field_validator("database_url", mode="after")
    @classmethod
    def _known_database_url(cls, value: str | None) -> str | None:
        return check_url(value, DATABASE_SCHEMES, "a PostgreSQL URL")

    @field_validator("broker_url", mode="after")
    @classmethod
    def _known_broker_url(cls, value: str | None) -> str | None:
        return check_url(value, BROKER_SCHEMES, "a Redis URL")

    @field_validator("metrics_host", mode="after")
    @classmethod
    def _an_address(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise ValueError(
                "must be an IP address to listen on (0.0.0.0, 127.0.0.1, ::)"
            ) from None

    @field_validator("milvus_uri", mode="after")
    @classmethod
    def _known_milvus_uri(cls, value: str | None) -> str | None:
        return check_milvus_uri(value)

    @field_validator("rescore_schedule", mode="after")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        return check_schedule(value)

    @field_validator("log_level", mode="after")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @model_validator(mode="after")
    def _visibility_exceeds_time_limit(self) -> Settings:
        # A job still running when the broker's visibility timeout expires is delivered twice.
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError(
                f"LV_VISIBILITY_TIMEOUT ({self.visibility_timeout}) must exceed "
                f"LV_TASK_TIME_LIMIT ({self.task_time_limit})"
            )
        return self

    @model_validator(mode="after")
    def _flower_credentials_complete(self) -> Settings:
        # Flower reads `user:password[,user:password...]`: a half-set pair would start it
        # unauthenticated, and a comma would cut the password into a second, shorter one.
        user = self.flower_user
        password = self.flower_password.get_secret_value() if self.flower_password else None
        if bool(user) != bool(password):
            missing = "LV_FLOWER_PASSWORD" if user else "LV_FLOWER_USER"
            raise ValueError(
                f"{missing} is unset: set LV_FLOWER_USER and LV_FLOWER_PASSWORD together "
                "(or neither, for Flower on 127.0.0.1 without authentication)"
            )
        if user and (":" in user or "," in user):
            raise ValueError("LV_FLOWER_USER must not contain ':' or ','")
        if password and "," in password:
            raise ValueError("LV_FLOWER_PASSWORD must not contain ',' (Flower splits on it)")
        return self

    def with_servers(self, database_url: str | None, broker_url: str | None) -> Settings:
        """These settings with the servers' URLs resolved (the embedded stack's, when unset)."""
        return self.model_copy(update={"database_url": database_url, "broker_url": broker_url})

    @property
    def milvus_lite_path(self) -> Path | None:
        """The milvus-lite data directory `LV_MILVUS_URI` names (None: unset, or a server)."""
        if self.milvus_uri is None or _SERVER_URI.match(self.milvus_uri):
            return None
        return Path(self.milvus_uri).expanduser().resolve()

    def with_milvus_uri(self, uri: str) -> Settings:
        """These settings with the mirror's URI resolved (milvus-lite's file, served by the
        CLI, as its `http://127.0.0.1:port`)."""
        return self.model_copy(update={"milvus_uri": uri})

    def require_database_url(self) -> str:
        """The database URL; a `SettingsError` if it was neither set nor resolved."""
        if self.database_url is None:
            raise SettingsError("LV_DATABASE_URL is not set and no embedded database runs")
        return self.database_url

    def require_broker_url(self) -> str:
        """The broker URL; a `SettingsError` if it was neither set nor resolved."""
        if self.broker_url is None:
            raise SettingsError("LV_BROKER_URL is not set and no embedded broker runs")
        return self.broker_url


def check_schedule(value: str) -> str:
    """A crontab (`minute hour day-of-month month day-of-week`, as beat reads it) or, for tests
    and development, `every N` seconds."""
    from celery.schedules import crontab

    text = " ".join(value.split())
    if _EVERY.fullmatch(text):
        return text
    if len(text.split(" ")) != 5:
        raise ValueError("must be a crontab of 5 fields (e.g. '0 2 * * *') or 'every N' seconds")
    try:
        crontab(**crontab_fields(text))
    except (ValueError, TypeError) as error:
        raise ValueError(f"not a valid crontab ({error})") from None
    return text


# What the engine (psycopg 3) and the broker (kombu's Redis transport) can connect with.
DATABASE_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")


def check_url(value: str | None, schemes: tuple[str, ...], what: str) -> str | None:
    """A URL of one of `schemes` with a readable port, so a typo is an error at start naming
    the setting, not a driver's traceback at the first connection."""
    if value is None:
        return None
    wanted = f"must be {what} ({', '.join(s + '://' for s in schemes)}…)"
    scheme, separator, _ = value.partition("://")
    if not separator or scheme.lower() not in schemes:
        raise ValueError(wanted)
    try:
        urlsplit(value).port  # noqa: B018  (parsing the port is the check)
    except ValueError as error:
        raise ValueError(f"{wanted}: {error}") from None
    return value


def check_milvus_uri(value: str | None) -> str | None:
    """`http(s)://host:port` (a Milvus server) or a filesystem path (milvus-lite); any other
    scheme is refused rather than taken for a file name."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        raise ValueError("must be a http:// or https:// Milvus server, or a path (milvus-lite)")
    if _SERVER_URI.match(text):
        return text
    if "://" in text:
        raise ValueError("must be a http:// or https:// Milvus server, or a path (milvus-lite)")
    return text


_SERVER_URI = re.compile(r"https?://", re.IGNORECASE)


def crontab_fields(value: str) -> dict[str, str]:
    """A 5-field crontab in cron's order, as Celery's `crontab` keyword arguments."""
    minute, hour, day_of_month, month, day_of_week = value.split(" ")
    return {
        "minute": minute,
        "hour": hour,
        "day_of_month": day_of_month,
        "month_of_year": month,
        "day_of_week": day_of_week,
    }


def schedule_seconds(value: str) -> float | None:
    """The interval of an `every N` schedule, else None (a crontab)."""
    found = _EVERY.fullmatch(value)
    return float(found.group(1)) if found else None


_EVERY = re.compile(r"every (\d+(?:\.\d+)?)s?")


_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if not field:
            lines.append(f"invalid settings: {message}")
            continue
        got = item.get("input")
        if isinstance(got, str):
            got = _PASSWORD.sub(r"\1***@", got)  # a URL's password is never echoed
        suffix = f" (got {got!r})" if isinstance(got, str | int | float) else ""
        lines.append(f"invalid setting LV_{field.upper()}: {message}{suffix}")
    return "; ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment; a bad value raises `SettingsError` naming it."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None
