"""Logging for every Labpool process: one line per event, level from the settings."""

from __future__ import annotations

import logging

from config.settings import Settings


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
