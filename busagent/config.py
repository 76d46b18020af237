"""Typed settings: defaults < config file (TOML) < BUSAGENT_* environment < flags."""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any

PROFILES = ("direct", "rabbitmq3", "rabbitmq4", "artemis", "qpid-router")


class ConfigError(ValueError):
    """A setting that cannot be used."""


@dataclass(frozen=True)
class Settings:
    """Everything the agent needs to start."""

    uri: str = "test:///default"
    mode: str = "direct"  # 'direct': listen for AMQP peers; 'broker': connect to a broker
    listen: str = "127.0.0.1:5672"
    broker_urls: tuple[str, ...] = ()
    profile: str = "direct"
    namespace: str = "libvirt"
    host_id: str = ""  # default: the hypervisor's hostname
    workers: int = 8
    credit: int = 500
    max_message_bytes: int = 1 << 20
    log_level: str = "info"
    presence_interval: float = 5.0  # heartbeat period; the heartbeat lives 3 periods
    snapshot_interval: float = 60.0  # periodic full object snapshot
    sample_interval: float = 10.0  # statistics sampler period
    stats_groups: tuple[str, ...] = ()  # domain statistics groups to sample (virsh domstats names); () = all
    job_interval: float = 0.5  # job progress sampling while a long domain operation runs
    metrics_listen: str = "127.0.0.1:9177"  # Prometheus endpoint ('' turns it off)
    dedup_ids: int = 10_000  # write requests remembered by message id (a redelivery gets the first reply)
    dedup_seconds: float = 600.0  # ... for at most this long
    publish_buffer: int = 10_000  # broker mode: published messages kept for resending across a reconnection
    reconnect_max_delay: float = 10.0  # broker mode: cap of the delay between reconnection attempts
    # -- security (README "Security") --------------------------------------------------------
    tls_cert: str = ""  # PEM certificate: direct mode serves amqps with it; broker mode presents it
    tls_key: str = ""  # its PEM private key (a file only its owner may read)
    tls_ca: str = ""  # PEM CA bundle: verifies client certificates (direct) or the broker's (broker)
    tls_client_auth: str = "none"  # direct mode: 'none' | 'required' (client certificates, SASL EXTERNAL)
    tls_verify_hostname: bool = True  # broker mode: the broker's certificate must name its host
    credentials_file: str = ""  # broker mode: TOML with user/password for SASL PLAIN (mode 600)
    max_json_depth: int = 32  # request arguments nested deeper are refused
    max_arg_bytes: int = 1 << 20  # one string argument longer than this is refused
    security: dict[str, Any] = field(default_factory=dict)  # the [security] table: roles, principals
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> Settings:
        if self.mode not in ("direct", "broker"):
            raise ConfigError(f"mode must be 'direct' or 'broker', not {self.mode!r}")
        if self.profile not in PROFILES:
            raise ConfigError(f"profile must be one of {', '.join(PROFILES)}")
        if self.mode == "broker" and not self.broker_urls:
            raise ConfigError("broker mode needs at least one broker URL")
        if self.mode == "direct" and self.profile != "direct":
            raise ConfigError("direct mode uses the 'direct' profile")
        if min(self.presence_interval, self.snapshot_interval, self.sample_interval, self.job_interval) <= 0:
            raise ConfigError("intervals must be positive")
        if self.dedup_ids < 0 or self.dedup_seconds < 0 or self.publish_buffer < 0:
            raise ConfigError("dedup_ids, dedup_seconds and publish_buffer must not be negative")
        if self.reconnect_max_delay <= 0:
            raise ConfigError("reconnect_max_delay must be positive")
        if not 1 <= self.workers <= 256:
            raise ConfigError("workers must be between 1 and 256")
        if self.tls_client_auth not in ("none", "required"):
            raise ConfigError("tls_client_auth must be 'none' or 'required'")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together")
        if self.tls_client_auth != "none" and not self.tls_ca:
            raise ConfigError("verifying client certificates needs tls_ca")
        if self.max_json_depth < 2 or self.max_arg_bytes < 1024:
            raise ConfigError("max_json_depth must be >= 2 and max_arg_bytes >= 1024")
        if self.stats_groups:
            from busagent.sampler import stats_flags  # libvirt's own list of groups
            try:
                stats_flags(self.stats_groups)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if not self.namespace or any(c in self.namespace for c in "/ #*"):
            raise ConfigError("namespace must be a plain word")
        return self


_FILE_KEYS = {  # TOML section.key -> Settings field
    "libvirt.uri": "uri", "bus.mode": "mode", "bus.listen": "listen", "bus.urls": "broker_urls",
    "bus.profile": "profile", "bus.namespace": "namespace", "agent.host_id": "host_id",
    "agent.workers": "workers", "bus.credit": "credit", "limits.max_message_bytes": "max_message_bytes",
    "log.level": "log_level", "agent.presence_interval": "presence_interval",
    "agent.snapshot_interval": "snapshot_interval", "stats.interval": "sample_interval",
    "stats.groups": "stats_groups",
    "agent.job_interval": "job_interval",
    "metrics.listen": "metrics_listen", "agent.dedup_ids": "dedup_ids", "agent.dedup_seconds": "dedup_seconds",
    "bus.publish_buffer": "publish_buffer", "bus.reconnect_max_delay": "reconnect_max_delay",
    "tls.cert": "tls_cert", "tls.key": "tls_key", "tls.ca": "tls_ca", "tls.client_auth": "tls_client_auth",
    "tls.verify_hostname": "tls_verify_hostname", "bus.credentials_file": "credentials_file",
    "limits.max_json_depth": "max_json_depth", "limits.max_arg_bytes": "max_arg_bytes",
}
_TABLES = {"security": "security"}  # whole TOML tables -> Settings field (file only)


def _coerce(name: str, value: Any) -> Any:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        if isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ConfigError(f"{name} must be true or false, not {value!r}")
            return value.lower() in ("1", "true", "yes")
        return bool(value)
    if kind == "dict[str, Any]":
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table")
        return dict(value)
    if kind == "tuple[str, ...]":
        return tuple(value.split(",") if isinstance(value, str) else value)
    return str(value)


def file_values(path: str, keys: dict[str, str], tables: dict[str, str] | None = None) -> dict[str, Any]:
    """The raw values a TOML file gives, by field name (``keys``: ``"section.key"`` -> field;
    ``tables``: a whole table -> field)."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    values: dict[str, Any] = {}
    for dotted, name in keys.items():
        section, key = dotted.split(".")
        if key in doc.get(section, {}):
            values[name] = doc[section][key]
    values.update({name: doc[table] for table, name in (tables or {}).items() if table in doc})
    return values


def load(path: str | None = None, env: dict[str, str] | None = None, **flags: Any) -> Settings:
    """Build validated settings from a TOML file, the environment and flags."""
    values: dict[str, Any] = {}
    path = path or (env or os.environ).get("BUSAGENT_CONFIG")
    if path:
        values = {name: _coerce(name, raw) for name, raw in file_values(path, _FILE_KEYS, _TABLES).items()}
    for f in fields(Settings):
        raw = (env if env is not None else os.environ).get(f"BUSAGENT_{f.name.upper()}")
        if raw is not None and f.name not in ("extra", *_TABLES.values()):
            values[f.name] = _coerce(f.name, raw)
    values.update({k: _coerce(k, v) for k, v in flags.items() if v is not None})
    settings = replace(Settings(), **values)
    if settings.mode == "broker" and settings.profile == "direct" and "profile" not in values:
        settings = replace(settings, profile="rabbitmq3")
    return settings.validate()
