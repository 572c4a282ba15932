"""Labpool's settings: one typed object, from `LABPOOL_*` environment variables and an
optional TOML file (`LABPOOL_CONFIG`, or `labpool.toml` in the working directory).

Precedence: environment variable > TOML file > default. The defaults give the single-server
mode (SQLite and an embedded Redis in the data folder, the `local` backend, plain http on
127.0.0.1:8080). A public URL with https means production: then the database URL, the Redis
URL and the secret key must be given, and a missing one stops the start with a message that
names the variable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("./var")
    public_url: str = "http://127.0.0.1:8080"
    database_url: str = ""  # default: SQLite in the data folder
    redis_url: str = ""  # default: an embedded Redis in the data folder
    secret_key: str = ""  # default (plain http only): generated once into the data folder
    backend: str = "local"
    # host:port the tool itself binds (`labpool run`); default: the public URL's. Set it when
    # nginx owns the public address.
    listen: str = ""
    # How many proxies in front of the tool set X-Forwarded-* (werkzeug's ProxyFix).
    proxy_count: int = 0
    # Clock skew allowed on the id_token's iat/exp (Moodle's tokens live 60 s).
    jwt_leeway_s: int = 10
    # How long the platform's JWKS is cached before it is fetched again.
    platform_jwks_ttl_s: int = 3600
    # Requests per client address and window (0: no limit). A classroom often shares one
    # public address (NAT), so these fit a class of 300 opening the activity in one minute,
    # twice each (a framed login that checks cookies costs two).
    rate_limit_window_s: int = 60
    login_rate_limit: int = 1200
    launch_rate_limit: int = 1200
    teacher_action_rate_limit: int = 120
    # How long a retired tool key is still published after a rotation.
    key_grace_s: int = 7 * 24 * 3600
    # Machines that are not ready after this long are marked as failed.
    machine_start_timeout_s: int = 120
    # The openstack backend: the clouds.yaml entry (or OS_CLIENT_CONFIG_FILE's) to use.
    openstack_cloud: str = "openstack"
    # Addresses (or CIDRs) that may reach a cloud machine's IDE port: the nginx host(s) and
    # the workers (they check each IDE's health), as the machines see them on their network.
    # Comma- or space-separated; the environment's security group admits these alone.
    proxy_addresses: tuple[str, ...] = ()
    openstack_api_timeout_s: int = 30
    # A cloud machine whose IDE has not answered by then is replaced.
    cloud_start_timeout_s: int = 900
    # Servers being created at once, per cloud; and how long a server the database does not
    # know may live before the reconciler deletes it.
    max_concurrent_creates: int = 20
    orphan_grace_s: int = 300
    reconcile_interval_s: int = 15
    idle_check_interval_s: int = 60
    roster_sync_interval_s: int = 3600
    # Machines failing in a row before a pool backs off creating more.
    max_consecutive_failures: int = 5
    # IDEs are reached through the authenticating nginx proxy at the public URL
    # (`labpool nginx-config`); off: single-server mode sends browsers straight to the IDE.
    ide_proxy: bool = False
    # Lifetime of the signed cookie that lets a browser through to one machine.
    ide_cookie_max_age_s: int = 4 * 3600
    # The local backend: the Python environment its IDEs run on (default: DATA_DIR/ide-env,
    # made by `labpool ide-env`), and the group nginx's workers run in (they open the IDEs'
    # sockets).
    ide_env: Path | None = None
    proxy_group: str = "www-data"
    web_workers: int = 2
    # Autograde jobs graded at once: `labpool run` starts this many grading workers, each
    # with its own sandbox uid (grading.grader_sandbox.grading_slot). Default: the CPUs.
    grading_workers: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    queue_name: str = "labpool"
    log_level: str = "INFO"
    # "json" (one object per line) or "text"; default: json when the public URL is https.
    log_format: str = ""
    # A bearer token that lets Prometheus read /metrics from anywhere; without it only a
    # client on the host itself (loopback, not through a proxy) may.
    metrics_token: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_production(self) -> bool:
        return self.public_url.startswith("https://")

    @property
    def listen_host(self) -> str:
        if self.listen:
            return self.listen.rpartition(":")[0] or "127.0.0.1"
        return urlsplit(self.public_url).hostname or "127.0.0.1"

    @property
    def listen_port(self) -> int:
        if self.listen:
            return int(self.listen.rpartition(":")[2])
        parts = urlsplit(self.public_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    def url(self, path: str) -> str:
        """An absolute public URL for a path of the tool."""
        return self.public_url.rstrip("/") + path

    @property
    def ide_env_dir(self) -> Path:
        return (self.ide_env or self.data_dir / "ide-env").resolve()

    @property
    def uses_embedded_redis(self) -> bool:
        return not self.redis_url

    @property
    def embedded_redis_socket(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or f"unix://{self.embedded_redis_socket.resolve()}"


_FIELDS = {f.name for f in dataclasses.fields(Settings) if f.name != "extra"}
_PARSERS = {
    "data_dir": Path,
    "ide_env": Path,
    "proxy_count": int,
    "jwt_leeway_s": int,
    "platform_jwks_ttl_s": int,
    "rate_limit_window_s": int,
    "login_rate_limit": int,
    "launch_rate_limit": int,
    "teacher_action_rate_limit": int,
    "key_grace_s": int,
    "machine_start_timeout_s": int,
    "web_workers": int,
    "grading_workers": int,
    "ide_proxy": lambda v: v if isinstance(v, bool) else _bool(v),
    "ide_cookie_max_age_s": int,
    "openstack_api_timeout_s": int,
    "proxy_addresses": lambda v: _addresses(v),
    "cloud_start_timeout_s": int,
    "max_concurrent_creates": int,
    "orphan_grace_s": int,
    "reconcile_interval_s": int,
    "idle_check_interval_s": int,
    "roster_sync_interval_s": int,
    "max_consecutive_failures": int,
}


def _addresses(value: Any) -> tuple[str, ...]:
    """IP addresses or CIDRs (a TOML list or a comma/space-separated string), normalized;
    a bare address is one host (/32, /128)."""
    items = value if isinstance(value, list | tuple) else str(value).replace(",", " ").split()
    networks = [ipaddress.ip_network(str(item).strip(), strict=False) for item in items]
    if any(n.prefixlen == 0 for n in networks):
        raise ValueError("a /0 admits everyone")
    return tuple(str(n) for n in networks)


def _bool(value: str) -> bool:
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


def env_name(field_name: str) -> str:
    return "LABPOOL_" + field_name.upper()


MIN_SECRET_KEY = 32


def _file_key(key: str) -> str:
    key = key.lower()
    return key.removeprefix("labpool_")


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the environment and the optional TOML file.

    Raises SettingsError naming the variable when a value is malformed or a production
    setting is missing.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}

    config_path = environ.get("LABPOOL_CONFIG")
    if config_path or Path("labpool.toml").exists():
        path = Path(config_path or "labpool.toml")
        try:
            with path.open("rb") as fh:
                file_values = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"LABPOOL_CONFIG: cannot read {path}: {exc}") from exc
        # Keys as the README lists them (DATABASE_URL, or LABPOOL_DATABASE_URL as in the
        # environment) or in lowercase: one setting, however it is spelled.
        file_values = {_file_key(k): v for k, v in file_values.items()}
        unknown = set(file_values) - set(_FIELDS)
        if unknown:
            raise SettingsError(f"{path}: unknown settings {sorted(unknown)}")
        values.update(file_values)

    for name in _FIELDS:
        if env_name(name) in environ:
            values[name] = environ[env_name(name)]

    for name, raw in list(values.items()):
        parser = _PARSERS.get(name)
        if parser is not None:
            try:
                values[name] = parser(raw)
            except (TypeError, ValueError) as exc:
                raise SettingsError(f"{env_name(name)}: not a valid value: {raw!r}") from exc

    settings = Settings(**values)
    return _complete(settings)


def _complete(settings: Settings) -> Settings:
    parts = urlsplit(settings.public_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(
            f"LABPOOL_PUBLIC_URL: must be an http(s) URL, got {settings.public_url!r}"
        )
    if settings.listen and not settings.listen.rpartition(":")[2].isdigit():
        raise SettingsError(f"LABPOOL_LISTEN: host:port, got {settings.listen!r}")
    if settings.rate_limit_window_s < 1:
        raise SettingsError(
            f"LABPOOL_RATE_LIMIT_WINDOW_S: at least 1, got {settings.rate_limit_window_s}"
        )
    for name in ("login_rate_limit", "launch_rate_limit", "teacher_action_rate_limit"):
        if getattr(settings, name) < 0:
            raise SettingsError(
                f"{env_name(name)}: 0 (no limit) or more, got {getattr(settings, name)}"
            )
    if settings.grading_workers < 1:
        raise SettingsError(f"LABPOOL_GRADING_WORKERS: at least 1, got {settings.grading_workers}")
    if settings.log_format not in ("", "json", "text"):
        raise SettingsError(f"LABPOOL_LOG_FORMAT: 'json' or 'text', got {settings.log_format!r}")
    if settings.backend not in ("local", "openstack"):
        raise SettingsError(f"LABPOOL_BACKEND: 'local' or 'openstack', got {settings.backend!r}")

    if settings.is_production:
        for name in ("database_url", "redis_url", "secret_key"):
            if not getattr(settings, name):
                raise SettingsError(
                    f"{env_name(name)} is required when LABPOOL_PUBLIC_URL is https "
                    "(production); set it in the environment or the TOML file"
                )
        if len(settings.secret_key) < MIN_SECRET_KEY:
            raise SettingsError(
                f"LABPOOL_SECRET_KEY: at least {MIN_SECRET_KEY} characters in production (it "
                "signs sessions and IDE cookies); make one with "
                '`python3 -c "import secrets; print(secrets.token_urlsafe(48))"`'
            )
        return settings

    data_dir = settings.data_dir
    changes: dict[str, Any] = {}
    if not settings.database_url:
        changes["database_url"] = f"sqlite:///{(data_dir / 'labpool.db').resolve()}"
    if not settings.secret_key:
        changes["secret_key"] = _local_secret_key(data_dir)
    return dataclasses.replace(settings, **changes)


def _local_secret_key(data_dir: Path) -> str:
    """The single-server secret: generated once, kept in the data folder (mode 0600)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "secret_key"
    if not path.exists():
        # Written aside, then linked into place: a process starting at the same moment never
        # reads a half-written key, and the first one to link wins.
        tmp = path.with_name(f".secret_key.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
        try:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()
