"""Settings of the serving layer: one object, every field documented where it is defined.

Read from the ``serve:`` section of the pipeline config (``headrace.yaml``) or
built in code. ``headrace serve`` and ``headrace run --serve`` pass one
:class:`ServeSettings` to :func:`headrace.serve.app.create_app`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from headrace.errors import ConfigError
from headrace.serve.tiles import Dashboard, default_dashboards


class SqlSettings(BaseModel):
    """Limits of the ad-hoc SQL endpoint (``POST /api/sql``)."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(
        default=10.0, gt=0, description="A query running longer is interrupted."
    )
    row_limit: int = Field(
        default=10_000, gt=0, description="Rows returned at most; the rest is cut."
    )
    memory_limit: str | None = Field(
        default=None,
        description="DuckDB memory_limit for the store instance (e.g. '2GB'). DuckDB's limit is "
        "per database instance, so in embedded mode it also bounds the engine; None keeps "
        "DuckDB's default.",
    )
    threads: int | None = Field(
        default=None,
        gt=0,
        description="DuckDB threads for the store instance; None keeps the default.",
    )
    max_concurrent: int = Field(
        default=2, gt=0, description="SQL queries running at once; more wait for a free slot."
    )
    queue_timeout_s: float = Field(
        default=5.0, gt=0, description="How long a query waits for a free slot before a 503."
    )
    max_result_bytes: int = Field(
        default=64 * 1024 * 1024,
        gt=0,
        description="A result larger than this in memory (Arrow bytes) is refused; it is "
        "read in small batches, so a huge result is stopped early.",
    )
    max_query_chars: int = Field(default=20_000, gt=0, description="Longer SQL texts are refused.")


class LiveSettings(BaseModel):
    """Server-sent events: how often tiles are recomputed and pushed."""

    model_config = ConfigDict(extra="forbid")

    min_interval_s: float = Field(
        default=0.25,
        ge=0,
        description="At most one recomputation of a view per this interval; store versions "
        "committed meanwhile are coalesced into the next one.",
    )
    idle_refresh_s: float = Field(
        default=30.0,
        gt=0,
        description="Recompute views even without a new store version this often, so that "
        "relative time ranges (last hour) slide forward.",
    )
    heartbeat_s: float = Field(
        default=15.0, gt=0, description="SSE comment sent when nothing else is."
    )
    poll_s: float = Field(
        default=0.5,
        gt=0,
        description="Standalone (read-only) mode: how often headrace.position is polled for a "
        "new version.",
    )
    max_viewers: int = Field(default=5_000, gt=0, description="Concurrent SSE connections at most.")
    compute_workers: int = Field(
        default=2,
        gt=0,
        description="Threads that run tile queries (each with its own DuckDB cursor). Live "
        "refreshes use all but one of them, so a dashboard being opened never waits behind "
        "refreshes. 2 suits 2 cores: more read threads take CPU from the store writer, whose "
        "freshness the viewers see (docs/latency.md); on more cores, more may pay.",
    )
    tile_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A tile query running longer is interrupted and shows an error.",
    )
    tile_row_limit: int = Field(default=5_000, gt=0, description="Rows a tile returns at most.")
    view_grace_s: float = Field(
        default=60.0,
        ge=0,
        description="A view nobody watches is kept (with its last result) this long, so "
        "reconnecting viewers and repeated loads reuse it.",
    )


class AuthSettings(BaseModel):
    """Users, sessions and tokens."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True,
        description="Require a login / API token. When False every request acts as an admin, "
        "which is only allowed on a loopback address.",
    )
    users_file: Path | None = Field(
        default=None,
        description="SQLite file holding users, API tokens and sessions; default: "
        "'<store>.users.sqlite' beside the store file.",
    )
    session_ttl_s: int = Field(
        default=12 * 3600, gt=0, description="A login session lasts this long."
    )
    cookie_secure: bool = Field(
        default=False, description="Mark cookies Secure (set it when served over HTTPS)."
    )


class AccountSettings(BaseModel):
    """Where the account page finds an account, its transactions, alerts and health."""

    model_config = ConfigDict(extra="forbid")

    table: str = Field(default="mirror.accounts", description="schema.table of accounts.")
    key: str = Field(default="id", description="The account id column of that table.")
    transactions_table: str = Field(
        default="mirror.transactions", description="schema.table of the account's transactions."
    )
    account_column: str = Field(
        default="account_id", description="Account id column of transactions."
    )
    time_column: str = Field(
        default="created_at", description="Time column to order transactions by."
    )
    limit: int = Field(default=50, gt=0, le=1000, description="Recent transactions shown.")


class ServeSettings(BaseModel):
    """Everything the serving layer needs, in one object."""

    model_config = ConfigDict(extra="forbid")

    store: Path = Field(Path("headrace.duckdb"), description="The DuckDB store file.")
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8321, ge=0, le=65535, description="TCP port (0 picks a free one).")
    max_body_bytes: int = Field(
        default=256 * 1024, gt=0, description="Larger request bodies get a 413."
    )
    masked_columns: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per role, glob patterns 'schema.table.column' of columns that role sees "
        "masked everywhere (dashboards, API, SQL), e.g. {'viewer': ['*.transactions.ip', "
        "'mirror.cards.number']}. 'mirror.x.c' also covers 'history.x.c' when written as "
        "'*.x.c'.",
    )
    dashboards: list[Dashboard] = Field(
        default_factory=default_dashboards,
        description="Dashboards shown in the UI; the first one is the home page.",
    )
    account: AccountSettings = Field(default_factory=AccountSettings)
    metrics_public: bool = Field(
        default=True,
        description="Serve /metrics without authentication (it shows counts and table names, "
        "no data); set False to require a token.",
    )
    sql: SqlSettings = Field(default_factory=SqlSettings)
    live: LiveSettings = Field(default_factory=LiveSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)

    @property
    def users_path(self) -> Path:
        """Where users, tokens and sessions are kept."""
        if self.auth.users_file is not None:
            return self.auth.users_file
        return self.store.with_name(self.store.name + ".users.sqlite")

    def dashboard(self, name: str) -> Dashboard | None:
        """The dashboard called ``name``, if configured."""
        return next((d for d in self.dashboards if d.name == name), None)


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_serve_settings(path: Path, **overrides: Any) -> ServeSettings:
    """Read the ``serve:`` section of a YAML config file and apply ``overrides``."""
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", "check the path and the YAML") from exc
    section = document.get("serve", document) if isinstance(document, dict) else {}
    data = {**section, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return ServeSettings.model_validate(data)
    except ValueError as exc:
        raise ConfigError(
            f"invalid serve settings in {path}: {exc}", "fix the fields named"
        ) from exc
