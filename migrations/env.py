"""Alembic environment: the metadata of every package's models, one URL from the caller."""

from __future__ import annotations

from alembic import context

import grading.models  # noqa: F401  (registers tables)
import jwks.models  # noqa: F401
import lti_tool.models  # noqa: F401
import provisioning.models  # noqa: F401
from config.db import Base, engine_for

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = engine_for(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
