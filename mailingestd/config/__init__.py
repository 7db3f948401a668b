"""Configuration: one TOML file decoded into msgspec Structs, with environment overrides.

Every key has a default, so an empty file is a valid configuration for the embedded store.
Durations are written "30s", "5m", "1h", "2d", "1h30m" (systemd style, or a bare number of
seconds); sizes "64MiB", "10MB", "512KiB" (or a bare number of bytes). A single key is overridden
from the environment with ``MAILINGESTD_<SECTION>_<KEY>`` (for example ``MAILINGESTD_STORE_URL``).
Every problem is reported at once, each naming where the value came from (the file or the
environment variable), the key and what was expected, with the closest known key for a
misspelt one; the commands exit 78 (EX_CONFIG) on them.

The schema (sections, keys, defaults, value types) is ``schema.py``; reading the file and the
environment into a checked ``Config`` is ``loading.py``. Everything is imported from here.
"""

from __future__ import annotations

from .loading import SECTIONS, apply_env, load, read_secret
from .schema import (DEFAULT_CONFIG_PATH, ENV_PREFIX, MAX_BATCH_MESSAGES, AccountConfig, BlobsConfig, ClusterConfig,
                     Config, ConfigError, DaemonConfig, Duration, ImapConfig, LimitsConfig, MetricsConfig,
                     OAuth2Config, QueueConfig, SchedulerConfig, SecretsConfig, ServerLimits, Size, StoreConfig,
                     account_id_problem, canonical_folders, parse_duration, parse_listen, parse_size)

__all__ = [
    "DEFAULT_CONFIG_PATH", "ENV_PREFIX", "MAX_BATCH_MESSAGES", "SECTIONS", "AccountConfig", "BlobsConfig",
    "ClusterConfig", "Config", "ConfigError", "DaemonConfig", "Duration", "ImapConfig", "LimitsConfig",
    "MetricsConfig", "OAuth2Config", "QueueConfig", "SchedulerConfig", "SecretsConfig", "ServerLimits", "Size",
    "StoreConfig", "account_id_problem", "apply_env", "canonical_folders", "load", "parse_duration", "parse_listen",
    "parse_size", "read_secret",
]
