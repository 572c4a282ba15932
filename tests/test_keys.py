"""The tool's keys: created on first start, rotated next → active → retired, published
while they may still be in use, private halves encrypted at rest."""

from __future__ import annotations

import json
from datetime import timedelta

import requests
from click.testing import CliRunner
from sqlalchemy import select

from config.db import transaction, utcnow
from jwks.keys import active_signing_key, rotate_keys
from jwks.models import KeyState, ToolKey
from lti_tool.cli import main


def _jwks(tool) -> dict:  # type: ignore[no-untyped-def]
    response = requests.get(f"{tool.url}/lti/jwks.json", timeout=5)
    assert response.status_code == 200
    return response.json()


def _states(rt) -> dict[str, str]:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        return {k.kid: k.state.value for k in session.scalars(select(ToolKey))}


def test_first_start_publishes_an_active_and_a_next_key(tool, rt):
    states = _states(rt)
    published = {k["kid"] for k in _jwks(tool)["keys"]}
    live = {kid for kid, state in states.items() if state in ("active", "next")}
    assert sorted(s for s in states.values() if s != "retired") == ["active", "next"]
    assert live <= published
    for key in _jwks(tool)["keys"]:
        assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig"
        assert "d" not in key and "p" not in key  # never a private part


def test_private_keys_are_encrypted_at_rest(rt):
    with rt.sessions() as session:
        for key in session.scalars(select(ToolKey)):
            assert "PRIVATE KEY" not in key.private_key_encrypted
        signing = active_signing_key(session, rt.settings.secret_key)
    assert signing.private_pem.startswith("-----BEGIN PRIVATE KEY-----")


def test_rotation_activates_next_retires_active_and_keeps_it_published_for_the_grace(tool, rt):
    before = _states(rt)
    old_active = next(k for k, s in before.items() if s == "active")
    old_next = next(k for k, s in before.items() if s == "next")

    result = CliRunner().invoke(main, ["keys", "rotate", "--grace-hours", "1"])
    assert result.exit_code == 0, result.output
    after = _states(rt)
    assert after[old_next] == "active"
    assert after[old_active] == "retired"
    new_next = [k for k, s in after.items() if s == "next"]
    assert len(new_next) == 1 and new_next[0] not in before
    published = {k["kid"] for k in _jwks(tool)["keys"]}
    assert {old_active, old_next, new_next[0]} <= published

    # Once the grace period is over, the retired key is gone from the JWKS.
    with transaction(rt.sessions) as session:
        retired = session.scalars(select(ToolKey).where(ToolKey.kid == old_active)).one()
        retired.expires_at = utcnow() - timedelta(seconds=1)
    assert old_active not in {k["kid"] for k in _jwks(tool)["keys"]}


def test_signing_key_follows_rotation(rt):
    with transaction(rt.sessions) as session:
        before = active_signing_key(session, rt.settings.secret_key).kid
        upcoming = session.scalars(select(ToolKey).where(ToolKey.state == KeyState.next)).one().kid
        rotate_keys(session, rt.settings.secret_key, timedelta(hours=1))
        assert active_signing_key(session, rt.settings.secret_key).kid == upcoming != before


def test_jwks_is_valid_json_for_pyjwt(tool):
    from jwt import PyJWKSet

    keyset = PyJWKSet.from_json(json.dumps(_jwks(tool)))
    assert len(keyset.keys) >= 2
