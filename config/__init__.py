"""Configuration: settings, logging, the database engine and sessions, Redis."""

from config.settings import Settings, SettingsError, load_settings

__all__ = ["Settings", "SettingsError", "load_settings"]
