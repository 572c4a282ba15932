"""Generate, rotate and publish the tool's RSA keys.

Rotation is next → active → retired: the `next` key is published a whole rotation ahead, so a
platform that caches our JWKS already knows it when it starts signing; a retired key stays
published for a grace period so messages signed just before the rotation still verify.
Private keys are encrypted at rest with a key derived from the tool's secret key.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from jwt.algorithms import RSAAlgorithm
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from config.db import utcnow
from jwks.models import KeyState, ToolKey


class ToolKeyError(Exception):
    """The tool's keys are not in the expected shape."""


def _fernet(secret_key: str) -> Fernet:
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"labpool tool keys"
    ).derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def _new_key(secret_key: str, state: KeyState, now: datetime) -> ToolKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = secrets.token_hex(10)
    jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    jwk.update({"kid": kid, "alg": "RS256", "use": "sig"})
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return ToolKey(
        kid=kid,
        state=state,
        public_jwk=json.dumps(jwk),
        private_key_encrypted=_fernet(secret_key).encrypt(pem).decode(),
        created_at=now,
        activated_at=now if state is KeyState.active else None,
    )


def ensure_keys(session: Session, secret_key: str) -> None:
    """Create the first active key and its successor if the tool has none."""
    states = set(session.scalars(select(ToolKey.state).where(ToolKey.state != KeyState.retired)))
    now = utcnow()
    if KeyState.active not in states:
        session.add(_new_key(secret_key, KeyState.active, now))
    if KeyState.next not in states:
        session.add(_new_key(secret_key, KeyState.next, now))
    session.flush()


def rotate_keys(session: Session, secret_key: str, grace: timedelta) -> ToolKey:
    """Make the next key active, retire the active one (published for `grace`), create a new
    next key. Returns the newly active key."""
    ensure_keys(session, secret_key)
    now = utcnow()
    keys = session.scalars(
        select(ToolKey).where(ToolKey.state != KeyState.retired).with_for_update()
    ).all()
    active = next(k for k in keys if k.state is KeyState.active)
    upcoming = next(k for k in keys if k.state is KeyState.next)
    active.state = KeyState.retired
    active.retired_at = now
    active.expires_at = now + grace
    upcoming.state = KeyState.active
    upcoming.activated_at = now
    session.add(_new_key(secret_key, KeyState.next, now))
    session.flush()
    return upcoming


def published_jwks(session: Session) -> dict:
    """The JWKS: active, next, and retired keys whose grace period has not ended."""
    now = utcnow()
    keys = session.scalars(
        select(ToolKey)
        .where(
            or_(
                ToolKey.state != KeyState.retired,
                ToolKey.expires_at > now,
            )
        )
        .order_by(ToolKey.id)
    ).all()
    return {"keys": [json.loads(k.public_jwk) for k in keys]}


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_pem: str


def active_signing_key(session: Session, secret_key: str) -> SigningKey:
    """The key that signs what the tool sends now (decrypted only here)."""
    key = session.scalars(select(ToolKey).where(ToolKey.state == KeyState.active)).one_or_none()
    if key is None:
        raise ToolKeyError("the tool has no active key; run `labpool keys rotate` or start it once")
    pem = _fernet(secret_key).decrypt(key.private_key_encrypted.encode()).decode()
    return SigningKey(kid=key.kid, private_pem=pem)
