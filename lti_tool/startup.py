"""What every Labpool process does before it serves: a closed data folder, the schema
migrated, the tool's signing keys present. `labpool run`, the CLI's commands and the tests
call `prepare`; it imports no Flask."""

from __future__ import annotations

import os
from pathlib import Path

from config.db import transaction
from config.runtime import Runtime, runtime_for
from config.settings import Settings


def prepare(settings: Settings) -> Runtime:
    """Make the data folder, apply migrations and make sure the tool has its keys."""
    from jwks.keys import ensure_keys
    from migrations import upgrade

    protect_data_dir(settings)
    upgrade(settings.database_url)
    rt = runtime_for(settings)
    with transaction(rt.sessions) as session:
        ensure_keys(session, settings.secret_key)
    return rt


def protect_data_dir(settings: Settings) -> None:
    """Files the tool makes are its own (umask 077); the data folder is closed to others:
    0700, or 0711 when root runs students' sandboxes (their user must pass through it to the
    folders bound into the sandbox; nothing in it can be listed, and what is not bound is
    0600/0700)."""
    os.umask(0o077)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.data_dir.chmod(0o711 if os.geteuid() == 0 else 0o700)
    database = settings.database_url.removeprefix("sqlite:///")
    if database != settings.database_url and Path(database).exists():
        Path(database).chmod(0o600)
