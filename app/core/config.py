"""One typed settings object, read from `PREFLOOP_*` environment variables and an optional `.env`.

Defaults give the embedded mode: a SQLite database, a filesystem broker and a media folder, all
under one data dir. Pointing `PREFLOOP_DATABASE_URL` at Postgres and `PREFLOOP_BROKER_URL` at
Redis gives the distributed mode with the same code.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Secrets people paste from examples; refused outside the embedded local mode.
KNOWN_DEFAULT_SECRETS = {"changeme", "change-me", "secret", "prefloop", "dev", ""}


class SettingsError(RuntimeError):
    """A setting has a bad value; the message names the environment variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PREFLOOP_", env_file=".env", extra="ignore", validate_default=True
    )

    environment: Literal["local", "production"] = "local"
    data_dir: Path = Path("prefloop-data")
    database_url: str | None = None
    broker_url: str | None = None
    # Key prefix for every broker key, so several stacks (or test runs) can share one Redis.
    broker_key_prefix: str = ""
    media_dir: Path | None = None
    secret_key: str | None = None
    public_base_url: str = "http://127.0.0.1:8000"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # The first admin, created by `prefloop bootstrap`/`serve` when no admin exists yet. Unset:
    # admin@prefloop.local with a random password printed once.
    admin_email: str | None = None
    admin_password: SecretStr | None = None

    # Jobs: a running job whose heartbeat is older than this is presumed dead and re-queued.
    job_heartbeat_seconds: float = Field(default=5.0, gt=0)
    job_stale_seconds: float = Field(default=60.0, gt=0)
    job_max_attempts: int = Field(default=3, ge=1)
    reaper_interval_seconds: float = Field(default=15.0, gt=0)
    # CPU threads for torch in a worker. Unset: half the cores, so a CPU worker leaves room for
    # the web server and the database (oversubscribed torch threads slow down by 10× or more).
    torch_threads: int | None = Field(default=None, ge=1, le=512)
    # Leaderboards are refitted at most this often while votes come in.
    ratings_refresh_seconds: float = Field(default=60.0, ge=0)
    # Above the longest job: Redis redelivers an unacknowledged message after this.
    broker_visibility_timeout: int = Field(default=12 * 3600, ge=60)

    # Directories a model's `base` or `adapter` may name (comma-separated). Unset: the data
    # dir's models/ and the shipped toy weights. See app.generators.sources.
    model_roots: str | None = None

    # Web
    session_days: int = Field(default=14, ge=1)
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    login_attempts_per_minute: int = Field(default=10, ge=1)
    # Reverse proxies whose X-Forwarded-For is believed (comma-separated addresses or CIDR
    # networks). Unset: none, and the client address is the connection's peer.
    trusted_proxies: str = ""
    # The annotator API's plain requests on asyncpg, past FastAPI and the ORM (Postgres only;
    # app.votes.fast_lane). Off: every request takes the full stack.
    fast_lane: bool = True

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator(
        "database_url", "broker_url", "secret_key", "admin_email", "admin_password", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        import ipaddress

        for part in value.split(","):
            if part.strip():
                ipaddress.ip_network(part.strip(), strict=False)  # ValueError names it
        return value

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:// or postgresql:// URL")
        return value

    # Derived values -------------------------------------------------------------------------
    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            url = self.database_url
            # One driver for Postgres everywhere: psycopg 3.
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
            return url
        return f"sqlite:///{self.resolved_data_dir / 'prefloop.db'}"

    @property
    def is_sqlite(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")

    @property
    def embedded(self) -> bool:
        """True when no external broker is configured: the filesystem transport is used."""
        return self.broker_url is None

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return self.resolved_data_dir / "broker"

    @property
    def resolved_media_dir(self) -> Path:
        return (self.media_dir or self.resolved_data_dir / "media").expanduser().resolve()

    @property
    def resolved_model_roots(self) -> list[Path]:
        if self.model_roots and self.model_roots.strip():
            raw = [p.strip() for p in self.model_roots.split(",") if p.strip()]
            return [Path(p).resolve() for p in raw]
        toy_weights = Path(__file__).resolve().parents[2] / "worker" / "toy" / "weights"
        return [self.resolved_data_dir / "models", toy_weights.resolve()]

    @property
    def cookie_secure(self) -> bool:
        return self.public_base_url.startswith("https://")

    def effective_secret_key(self) -> str:
        """The configured key, or in embedded local mode one generated once into the data dir."""
        if self.secret_key:
            return self.secret_key
        path = self.resolved_data_dir / "secret_key"
        if path.exists():
            return path.read_text().strip()
        from app.core.storage import write_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(48)
        write_atomic(path, key, mode=0o600)
        return key

    def check_production_safety(self) -> None:
        local_embedded = self.environment == "local" and self.is_sqlite
        if local_embedded:
            return
        if self.secret_key is None or self.secret_key.strip().lower() in KNOWN_DEFAULT_SECRETS:
            raise SettingsError(
                "PREFLOOP_SECRET_KEY: a real secret key is required outside the embedded local "
                "mode (generate one with: "
                "python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        if len(self.secret_key) < 16:
            raise SettingsError("PREFLOOP_SECRET_KEY: must be at least 16 characters long")


def load_settings() -> Settings:
    """Build settings from the environment; a bad value raises SettingsError naming the variable."""
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            problems.append(f"PREFLOOP_{field.upper()}: {error['msg']}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
    settings.check_production_safety()
    return settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
