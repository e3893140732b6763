"""Settings, read once from the environment.

Each process builds one ``Settings`` at start-up (``Settings.from_env()``) and passes it down; nothing
else reads the environment. Unset server URLs mean "start the embedded servers" (``market up``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_int(name: str, default: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc


def _env_bool(name: str, default: bool | None) -> bool | None:
    raw = _env(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be 1 or 0 (true or false), got {raw!r}")


def _env_float(name: str, default: float) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from exc


class SettingsError(ValueError):
    """A setting has a value the program cannot use; the message says which and why."""


@dataclass(frozen=True, slots=True)
class StripeSettings:
    """Stripe API access. ``api_base`` points the SDK at localstripe in tests."""

    api_key: str | None = None
    api_base: str | None = None
    webhook_secret: str | None = None

    @property
    def enabled(self) -> bool:
        return self.api_key is not None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a marketplace process may be configured with."""

    data_dir: Path = field(default_factory=lambda: Path(".data").resolve())
    database_url: str | None = None
    nats_url: str | None = None
    nats_user: str | None = None
    nats_password: str | None = None
    nats_creds: str | None = None
    nats_public_url: str | None = None
    """The NATS URL given to enrolling provider nodes, when it differs from the internal one."""
    nats_auth_dir: Path | None = None
    """Where the embedded nats-server's ``auth.conf``, ``nats.pid`` and ``services.json`` live; the
    api re-renders the node users there on enrolment and revocation. Unset: NATS authorization is
    managed outside (production clusters)."""
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    api_url: str | None = None
    log_level: str = "INFO"
    db_pool_size: int = 10
    max_body_bytes: int = 1_048_576
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    first_token_timeout_s: float = 120.0
    accept_timeout_s: float = 2.0
    queue_timeout_s: float = 10.0
    """How long the api waits for a free slot when every node serving the model is busy."""
    api_scheduler: bool | None = None
    """The api process also runs a scheduler replica and places its own jobs there, in-process
    (one NATS hop fewer on the way to a first token); the replica serves other apis' jobs too.
    None (unset): off for ``market api``, on under ``market up``."""
    usage_checkpoint_s: float = 2.0
    """How often the api writes the usage its streams in flight would end with (billed if it dies)."""
    currency: str = "usd"
    reservable_share: float = 0.5
    """Share of the live fleet's sequence slots for a model that reservations may hold together;
    the rest stays for burst and on-demand traffic (see ``api.reservations``)."""
    stripe: StripeSettings = field(default_factory=StripeSettings)

    @classmethod
    def from_env(cls) -> Settings:
        data_dir = Path(_env("MARKET_DATA_DIR", ".data") or ".data").expanduser().resolve()
        return cls(
            data_dir=data_dir,
            database_url=_env("MARKET_DATABASE_URL"),
            nats_url=_env("MARKET_NATS_URL"),
            nats_user=_env("MARKET_NATS_USER"),
            nats_password=_env("MARKET_NATS_PASSWORD"),
            nats_creds=_env("MARKET_NATS_CREDS"),
            nats_public_url=_env("MARKET_NATS_PUBLIC_URL"),
            nats_auth_dir=Path(auth_dir) if (auth_dir := _env("MARKET_NATS_AUTH_DIR")) else None,
            http_host=_env("MARKET_HTTP_HOST", "127.0.0.1") or "127.0.0.1",
            http_port=_env_int("MARKET_HTTP_PORT", 8080),
            api_url=_env("MARKET_API_URL"),
            log_level=(_env("MARKET_LOG_LEVEL", "INFO") or "INFO").upper(),
            db_pool_size=_env_int("MARKET_DB_POOL_SIZE", 10),
            max_body_bytes=_env_int("MARKET_MAX_BODY_BYTES", 1_048_576),
            heartbeat_interval_s=_env_float("MARKET_HEARTBEAT_INTERVAL", 1.0),
            heartbeat_timeout_s=_env_float("MARKET_HEARTBEAT_TIMEOUT", 5.0),
            first_token_timeout_s=_env_float("MARKET_FIRST_TOKEN_TIMEOUT", 120.0),
            accept_timeout_s=_env_float("MARKET_ACCEPT_TIMEOUT", 2.0),
            queue_timeout_s=_env_float("MARKET_QUEUE_TIMEOUT", 10.0),
            usage_checkpoint_s=_env_float("MARKET_USAGE_CHECKPOINT", 2.0),
            api_scheduler=_env_bool("MARKET_API_SCHEDULER", None),
            currency=(_env("MARKET_CURRENCY", "usd") or "usd").lower(),
            reservable_share=_env_float("MARKET_RESERVABLE_SHARE", 0.5),
            stripe=StripeSettings(
                api_key=_env("MARKET_STRIPE_API_KEY"),
                api_base=_env("MARKET_STRIPE_API_BASE"),
                webhook_secret=_env("MARKET_STRIPE_WEBHOOK_SECRET"),
            ),
        )

    def with_servers(self, *, database_url: str | None = None, nats_url: str | None = None) -> Settings:
        """A copy pointing at servers started after the settings were read (embedded mode)."""
        return replace(
            self,
            database_url=database_url or self.database_url,
            nats_url=nats_url or self.nats_url,
        )

    def require_database_url(self) -> str:
        if not self.database_url:
            raise SettingsError("MARKET_DATABASE_URL is not set (or run `market up` for embedded servers)")
        return self.database_url

    def require_nats_url(self) -> str:
        if not self.nats_url:
            raise SettingsError("MARKET_NATS_URL is not set (or run `market up` for embedded servers)")
        return self.nats_url
