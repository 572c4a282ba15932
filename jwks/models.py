"""The tool's own signing keys, as rows (after hypothesis/lms `models/rsa_key.py`)."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Enum, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from config.db import Base, UTCDateTime, utcnow


class KeyState(enum.StrEnum):
    next = "next"  # published, not yet used to sign: platforms learn it before it is needed
    active = "active"  # signs everything the tool sends
    retired = "retired"  # published until `expires_at`, then gone


class ToolKey(Base):
    __tablename__ = "tool_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    kid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[KeyState] = mapped_column(Enum(KeyState, native_enum=False, length=16))
    public_jwk: Mapped[str] = mapped_column(Text)  # JSON
    private_key_encrypted: Mapped[str] = mapped_column(Text)  # Fernet token of the PEM
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
